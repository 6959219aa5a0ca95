"""Fine-tuning data: the assistant-token loss mask (tokenize_conversation) on SmolLM2's template, reading
OpenAI fine-tuning JSONL with its problems counted, and the padded, length-bucketed, resumable batches."""

import json

import numpy as np
import pytest
import torch

from lmforge.data import chat_format, sft
from lmforge.errors import UserError

SYSTEM = {"role": "system", "content": "You are terse."}
TURNS = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3 + 3?\nShow work."},
    {"role": "assistant", "content": " Six: 3 + 3 = 6.\n\nDone "},
]


def _assistant_text(messages):
    return "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")


@pytest.mark.parametrize("messages", [TURNS, [SYSTEM, *TURNS], TURNS[:2], [SYSTEM, *TURNS[:2], TURNS[2]]])
def test_mask_covers_exactly_the_assistant_turns(smollm2, messages):
    tok = smollm2.tokenizer
    ids, mask = chat_format.tokenize_conversation(tok, messages)
    assert len(ids) == len(mask)
    assert ids == tok.encode(tok.apply_chat_template(messages))  # the same ids as the whole render
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == _assistant_text(messages)
    # the header tokens are not trained: each trained run starts right after "<|im_start|>assistant\n"
    starts = [k for k in range(len(ids)) if mask[k] and (k == 0 or not mask[k - 1])]
    assert len(starts) == sum(m["role"] == "assistant" for m in messages)
    for k in starts:
        assert tok.decode(ids[:k]).endswith("<|im_start|>assistant\n")


def test_offset_fallback_agrees_with_incremental(smollm2):
    tok = smollm2.tokenizer
    messages = [SYSTEM, *TURNS]
    ids, mask = chat_format.tokenize_conversation(tok, messages)
    fallback = chat_format._mask_from_offsets(tok, messages, tok.apply_chat_template(messages), ids)
    assert fallback == mask


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


GOOD = {"messages": TURNS[:2]}


def test_bad_lines_are_counted_with_line_numbers(tmp_path):
    path = _write(
        tmp_path / "chat.jsonl",
        [
            GOOD,  # 1
            '{"messages": [',  # 2 broken JSON
            {"messages": [{"role": "wizard", "content": "hi"}, TURNS[1]]},  # 3
            "",  # 4 blank: ignored
            {"messages": [{"role": "user"}, TURNS[1]]},  # 5 missing content
            {"messages": [{"role": "user", "content": 7}, TURNS[1]]},  # 6 non-string content
            {"messages": [TURNS[0]]},  # 7 no assistant
            {"prompt": "x"},  # 8 not the chat format
            GOOD,  # 9
            "not json",  # 10
        ],
    )
    conversations, report = sft.read_jsonl(path)
    assert len(conversations) == 2 and report.kept == 2 and report.lines == [1, 9]
    assert report.problems == {
        "broken_json": [2, 10],
        "unknown_role": [3],
        "bad_content": [5, 6],
        "no_assistant": [7],
        "no_messages": [8],
    }
    summary = report.summary()
    assert summary.startswith(f"{path}: kept 2 of 9 conversations; skipped 2 broken JSON (lines 2, 10)")
    assert "1 unknown role (line 3)" in summary and "2 missing or non-string content (lines 5, 6)" in summary
    assert "'wizard'" in report.details[3]
    with pytest.raises(UserError, match="broken JSON"):
        sft.read_jsonl(path, strict=True)


def test_no_usable_line_is_an_error(tmp_path):
    with pytest.raises(UserError, match="no usable conversations.*1 no assistant message"):
        sft.read_jsonl(_write(tmp_path / "x.jsonl", [{"messages": [TURNS[0]]}]))
    with pytest.raises(UserError, match="does not exist"):
        sft.read_jsonl(tmp_path / "missing.jsonl")


def test_split_is_deterministic_and_disjoint():
    items = list(range(50))
    train, val = sft.split(items, 0.2, seed=3)
    assert (train, val) == sft.split(items, 0.2, seed=3)
    assert len(val) == 10 and sorted(train + val) == items
    assert sft.split(items, 0.2, seed=4)[1] != val
    assert sft.split([1, 2], 0.01, seed=0)[1] != []  # at least one validation conversation
    assert sft.split(items, 0.0, seed=0) == (items, [])


def test_targets_are_shifted_mask_and_truncation_keeps_alignment(smollm2):
    tok = smollm2.tokenizer
    ids, mask = chat_format.tokenize_conversation(tok, [SYSTEM, *TURNS])
    full = sft.make_example(ids, mask, seq_len=10_000)
    assert len(full) == len(ids) - 1
    for t in range(len(full)):
        assert full.targets[t] == (ids[t + 1] if mask[t + 1] else sft.IGNORE_INDEX)
    cut = len(ids) - 5
    short = sft.make_example(ids, mask, seq_len=cut)
    assert len(short) == cut
    np.testing.assert_array_equal(short.input_ids, full.input_ids[:cut])
    np.testing.assert_array_equal(short.targets, full.targets[:cut])
    report = sft.ReadReport("x", kept=1)
    assert sft.tokenize([[SYSTEM, *TURNS]], tok, seq_len=8, report=report, lines=[7]) == []
    assert report.problems == {"too_long": [7]} and report.kept == 0


def _examples(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        length = int(rng.integers(3, 20))
        targets = np.full(length, sft.IGNORE_INDEX)
        targets[length // 2 :] = k
        out.append(sft.Example(np.full(length, k, dtype=np.int64), targets))
    return out


def test_batches_pad_right_sort_by_length_and_cover_each_epoch():
    examples = _examples(23)
    loader = sft.SFTBatches(examples, 4, pad_id=-7, seed=1, bucket_batches=3)
    assert loader.batches_per_epoch == 6
    seen, padding = [], 0
    for _ in range(6):
        x, y = loader.next_batch()
        assert x.shape == y.shape and x.shape[0] == 4
        for row in range(4):
            k = int(x[row, 0])
            n = len(examples[k])
            assert (x[row, :n] == k).all() and (x[row, n:] == -7).all() and (y[row, n:] == -100).all()
            assert torch.equal(y[row, :n], torch.from_numpy(examples[k].targets))
            seen.append(k)
        padding += int((x == -7).sum())
        assert loader.last_batch_tokens == int((x != -7).sum())  # what the loop logs: padding excluded
    assert set(seen) == set(range(23))  # every conversation once (one repeated to fill the last batch)
    unbucketed = sft.SFTBatches(examples, 4, pad_id=-7, seed=1, bucket_batches=1)
    assert padding < sum(int((unbucketed.next_batch()[0] == -7).sum()) for _ in range(6))


def test_batches_are_deterministic_resumable_and_split_over_ranks():
    examples = _examples(30)
    a = sft.SFTBatches(examples, 3, pad_id=0, seed=5)
    first = [a.next_batch() for _ in range(25)]  # more than two epochs
    b = sft.SFTBatches(examples, 3, pad_id=0, seed=5)
    b.load_state_dict(sft.SFTBatches(examples, 3, pad_id=0, seed=5).state_dict() | {"step": 10})
    for want in first[10:]:
        got = b.next_batch()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(UserError, match="cannot resume"):
        sft.SFTBatches(examples, 3, pad_id=0, seed=6).load_state_dict(a.state_dict())
    # two ranks of batch 3 together hold the one-process global batch of 6
    whole = sft.SFTBatches(examples, 6, pad_id=0, seed=5).batch(4)
    halves = [sft.SFTBatches(examples, 3, pad_id=0, seed=5, rank=r, world_size=2).batch(4) for r in (0, 1)]
    assert torch.equal(torch.cat([h[0] for h in halves]), whole[0])
    assert torch.equal(torch.cat([h[1] for h in halves]), whole[1])
    # each rank reports the real tokens of its own rows; together they are the global batch's
    ranks = [sft.SFTBatches(examples, 3, pad_id=-7, seed=5, rank=r, world_size=2) for r in (0, 1)]
    real = [int((loader.next_batch()[0] != -7).sum()) for loader in ranks]
    assert [loader.last_batch_tokens for loader in ranks] == real
    assert sum(real) == int((sft.SFTBatches(examples, 6, pad_id=-7, seed=5).batch(0)[0] != -7).sum())


def test_eval_batches_cover_every_example_once():
    examples = _examples(11)
    rows = [int(x[r, 0]) for x, _ in sft.eval_batches(examples, 4, pad_id=0) for r in range(len(x))]
    assert sorted(rows) == list(range(11))
