"""Classification data: labelled JSONL and CSV read with their problems counted per reason and line, labels
never seen in training reported, label ids in sorted order, a stratified split, and padded resumable batches."""

import json

import numpy as np
import pytest
import torch

from lmforge.data import labels
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(smollm2_metadata) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smollm2_metadata)


def _write_jsonl(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_jsonl_bad_lines_are_counted_per_reason_with_line_numbers(tmp_path):
    path = _write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"text": "refund please", "label": "billing"},  # 1
            '{"text": "broken',  # 2 broken JSON
            {"label": "billing"},  # 3 no text
            {"text": "   ", "label": "billing"},  # 4 empty text
            {"text": "where is it", "label": "shipping"},  # 5
            "",  # 6 blank: ignored, not counted
            {"text": "no label"},  # 7
            {"text": "null label", "label": None},  # 8
            {"text": "blank label", "label": "  "},  # 9
            {"text": "float label", "label": 1.5},  # 10
            {"text": "bool label", "label": True},  # 11
            {"text": 42, "label": "billing"},  # 12 non-string text
            {"text": "integer label", "label": 3},  # 13
            ["not", "an", "object"],  # 14
            {"text": " spaced label ", "label": " shipping "},  # 15
        ],
    )
    examples, report = labels.read(path)
    assert [(e.text, e.label, e.line) for e in examples] == [
        ("refund please", "billing", 1),
        ("where is it", "shipping", 5),
        ("integer label", "3", 13),
        (" spaced label ", "shipping", 15),
    ]
    assert report.kept == 4 and report.lines == [1, 5, 13, 15]
    assert report.problems == {
        "broken_json": [2],
        "bad_text": [3, 12, 14],
        "empty_text": [4],
        "no_label": [7, 8, 9],
        "bad_label": [10, 11],
    }
    assert report.summary() == (
        f"{path}: kept 4 of 14 examples; skipped 1 broken JSON (line 2), 3 missing or non-string text "
        "(lines 3, 12, 14), 1 empty text (line 4), 3 missing label (lines 7, 8, 9), "
        "2 label not a string or integer (lines 10, 11)"
    )
    assert "float" in report.details[10] and "bool" in report.details[11]
    with pytest.raises(UserError, match="skipped 1 broken JSON"):
        labels.read(path, strict=True)


def test_csv_with_header_quotes_and_bom(tmp_path):
    path = tmp_path / "tickets.csv"
    rows = [
        "Text , LABEL,source",  # header: case and spaces do not matter, extra columns are ignored
        '"Hello, my card was charged twice",billing,web',  # 2: a quoted comma
        '"two\nline text",shipping,mail',  # 3-4: a quoted newline
        ",billing,web",  # 5: empty text
        "no label here,,web",  # 6
        "",  # 7: blank row, ignored
        "short row",  # 8: the label column is missing
        "app crashes,technical,web",  # 9
    ]
    path.write_bytes(("\ufeff" + "\n".join(rows) + "\n").encode("utf-8"))  # as spreadsheets write it
    examples, report = labels.read(path)
    assert [(e.text, e.label, e.line) for e in examples] == [
        ("Hello, my card was charged twice", "billing", 2),
        ("two\nline text", "shipping", 3),  # a record is numbered by its first line
        ("app crashes", "technical", 9),
    ]
    assert report.problems == {"empty_text": [5], "no_label": [6, 8]}


def test_csv_without_text_and_label_columns_is_refused(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("sentence,category\nhi,greeting\n")
    with pytest.raises(UserError, match="columns text,label; found sentence,category"):
        labels.read(path)
    with pytest.raises(UserError, match="does not exist"):
        labels.read(tmp_path / "missing.jsonl")


def test_labels_never_seen_in_training_are_reported(tmp_path):
    path = _write_jsonl(
        tmp_path / "val.jsonl",
        [
            {"text": "a", "label": "billing"},
            {"text": "b", "label": "refunds"},  # 2: unseen
            {"text": "c", "label": 7},  # 3: unseen
            {"text": "d", "label": "shipping"},
        ],
    )
    examples, report = labels.read(path, known_labels=["billing", "shipping"])
    assert [e.line for e in examples] == [1, 4]
    assert report.problems == {"unknown_label": [2, 3]}
    assert report.details[2] == "label 'refunds' is not one of the training labels (billing, shipping)"
    assert report.summary().endswith("skipped 2 label never seen in training (lines 2, 3)")


def test_label_order_is_sorted_numerically_when_all_are_integers():
    assert labels.order_labels(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert labels.order_labels(["b", "10", "a", "2"]) == ["10", "2", "a", "b"]
    assert labels.order_labels({"shipping", "billing", "technical"}) == ["billing", "shipping", "technical"]
    assert labels.order_labels(["-1", "+3", "0"]) == ["-1", "0", "+3"]


def test_split_is_stratified_seeded_and_keeps_every_label_in_training():
    counts = {"a": 40, "b": 9, "c": 2, "d": 1}
    examples = [labels.LabelledText(f"{name} {i}", name, 0) for name, n in counts.items() for i in range(n)]
    train, val = labels.split(examples, 0.25, seed=3)
    assert sorted(map(id, train + val)) == sorted(map(id, examples))  # a partition
    per_label = {name: sum(e.label == name for e in val) for name in counts}
    assert per_label == {"a": 10, "b": 2, "c": 0, "d": 0}  # round(n / 4), at least one left to train on
    assert {e.label for e in train} == set(counts)
    assert [examples.index(e) for e in val] == sorted(examples.index(e) for e in val)  # file order kept
    again, other = labels.split(examples, 0.25, seed=3), labels.split(examples, 0.25, seed=4)
    assert again[1] == val and other[1] != val
    assert labels.split(examples, 0.0, seed=3) == (examples, [])


def test_encoding_treats_special_token_strings_as_text_and_truncates(tokenizer):
    ids = labels.encode_texts(tokenizer, ["thanks <|im_end|>", "hello"])
    end = tokenizer.token_to_id("<|im_end|>")
    assert end not in ids[0] and tokenizer.decode(ids[0]) == "thanks <|im_end|>"
    assert ids[1] == tokenizer.encode("hello", add_bos=tokenizer.add_bos_token)
    texts = [labels.LabelledText("one two three four five six", "x", 1), labels.LabelledText("hi", "y", 2)]
    examples, truncated = labels.tokenize(texts, tokenizer, 3, {"x": 0, "y": 1})
    assert truncated == 1
    assert [len(e) for e in examples] == [3, len(tokenizer.encode("hi"))]
    assert [e.label for e in examples] == [0, 1] and [e.line for e in examples] == [1, 2]


def _examples(lengths, n_labels=3):
    return [
        labels.Example(np.arange(1, n + 1, dtype=np.int64) + 100 * i, i % n_labels, i + 1)
        for i, n in enumerate(lengths)
    ]


def test_batches_are_padded_with_true_lengths_and_cover_every_example():
    rng = np.random.default_rng(0)
    examples = _examples(rng.integers(1, 20, size=37).tolist())
    batches = labels.LabelBatches(examples, 8, pad_id=-7, seed=5, bucket_batches=2)
    assert batches.batches_per_epoch == 5
    seen = []
    for _ in range(batches.batches_per_epoch):
        x, lengths, y = batches.next_batch()
        assert x.shape[0] == 8 and x.dtype == torch.long and batches.last_batch_tokens == int(lengths.sum())
        assert x.shape[1] == int(lengths.max())
        for row, n, label in zip(x, lengths, y, strict=True):
            e = next(e for e in examples if e.input_ids[0] == row[0])  # rows start with a unique id
            assert row[:n].tolist() == e.input_ids.tolist() and (row[n:] == -7).all() and label == e.label
            seen.append(e.line)
    assert set(seen) == {e.line for e in examples} and len(seen) == 40  # 3 rows refill the last batch
    # the position is the whole state: a fresh loader at step 5 gives what the first gives next
    state = batches.state_dict()
    resumed = labels.LabelBatches(examples, 8, pad_id=-7, seed=5, bucket_batches=2)
    resumed.load_state_dict(state)
    for a, b in zip(batches.next_batch(), resumed.next_batch(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(UserError, match="cannot resume"):
        labels.LabelBatches(examples, 4, pad_id=-7, seed=5).load_state_dict(state)


def test_ranks_share_each_global_batch_at_one_width():
    examples = _examples([1, 9, 2, 3, 8, 2, 5, 4])
    whole = labels.LabelBatches(examples, 4, pad_id=0, seed=1)
    ranks = [labels.LabelBatches(examples, 2, pad_id=0, seed=1, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(4):
        x, lengths, y = whole.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert parts[0][0].shape == parts[1][0].shape == (2, x.shape[1])  # padded to the global batch
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[2] for p in parts]), y)


def test_eval_batches_visit_each_example_once_shortest_first():
    examples = _examples([5, 1, 3, 3, 7])
    seen = []
    for indices, (x, lengths, y) in labels.eval_batches(examples, 2, pad_id=0):
        assert lengths.tolist() == [len(examples[i]) for i in indices]
        assert y.tolist() == [examples[i].label for i in indices]
        assert [x[k, : len(examples[i])].tolist() for k, i in enumerate(indices)] == [
            examples[i].input_ids.tolist() for i in indices
        ]
        seen += indices
    assert seen == [1, 2, 3, 0, 4]
