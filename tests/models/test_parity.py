"""Our model vs transformers on small randomly initialised GPT-2, Llama (GQA, untied) and Qwen2 (qkv
biases, tied) models: same weights, logits within 1e-4 relative, with and without the paged KV cache."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lmforge.models.config import config_from_hf
from lmforge.models.convert import hf_to_lmforge
from lmforge.models.gpt import build_model
from lmforge.models.kv_cache import CacheBatch, DenseDecode, KVCache, SeqSlice

transformers = pytest.importorskip("transformers")

VOCAB = 257


# the tiny shape every decoder below shares (GPT-2 aside)
TINY = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4
)


def _hf_models():
    torch.manual_seed(0)
    llama3_rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    return {
        "gpt2": transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2, n_head=4)
        ),
        "llama": transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                **TINY,
                num_key_value_heads=2,
                max_position_embeddings=128,
                tie_word_embeddings=False,
                rope_theta=500000.0,
            )
        ),
        "llama3-rope": transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                **TINY, num_key_value_heads=1, max_position_embeddings=256, rope_scaling=llama3_rope
            )
        ),
        "qwen2": transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(
                **TINY, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True
            )
        ),
        "mistral": transformers.MistralForCausalLM(
            transformers.MistralConfig(
                **TINY, num_key_value_heads=2, max_position_embeddings=128, sliding_window=None
            )
        ),
        "mistral-window": transformers.MistralForCausalLM(
            transformers.MistralConfig(
                **TINY, num_key_value_heads=2, max_position_embeddings=128, sliding_window=8
            )
        ),
    }


def load_ours(folder):
    cfg = config_from_hf(json.loads((folder / "config.json").read_text()))
    sd = hf_to_lmforge(load_file(folder / "model.safetensors"), cfg)
    return build_model(cfg, sd)


def assert_close(ours, ref, rtol=1e-4):
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    mean = (ours - ref).abs().mean().item()
    assert err <= rtol * scale, f"max abs err {err:.3g} (mean {mean:.3g}) vs scale {scale:.3g}"


@pytest.fixture(scope="module", params=["gpt2", "llama", "llama3-rope", "qwen2", "mistral", "mistral-window"])
def pair(request, tmp_path_factory):
    hf = _hf_models()[request.param].eval()
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return hf, load_ours(folder)


def test_logits_match_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids)
    assert_close(out, ref)


def test_paged_cache_matches_full_forward(pair):
    """Chunked prefill + decode of three interleaved sequences through a paged cache with shuffled
    blocks equals the plain causal forward of each sequence."""
    hf, ours = pair
    cfg = ours.config
    gen = torch.Generator().manual_seed(2)
    lens = [37, 5, 20]
    seqs = [torch.randint(0, VOCAB, (n,), generator=gen) for n in lens]
    with torch.no_grad():
        refs = [hf(s[None]).logits[0] for s in seqs]
    cache = KVCache(cfg, num_blocks=20, block_size=4)
    perm = torch.randperm(20, generator=gen).tolist()
    tables = [perm[0:10], perm[10:12], perm[12:17]]  # non-contiguous blocks
    done = [0, 0, 0]
    chunk = [16, 5, 1]  # seq 0 in 16-token chunks, seq 1 at once, seq 2 token by token
    outs = [[], [], []]
    with torch.no_grad():
        while any(d < n for d, n in zip(done, lens, strict=True)):
            live = [i for i in range(3) if done[i] < lens[i]]
            new = [min(chunk[i], lens[i] - done[i]) for i in live]
            ids = torch.cat([seqs[i][done[i] : done[i] + k] for i, k in zip(live, new, strict=True)])
            pos = torch.cat([torch.arange(done[i], done[i] + k) for i, k in zip(live, new, strict=True)])
            batch = CacheBatch.build(
                [tables[i] for i in live], [done[i] for i in live], new, cache.block_size
            )
            logits = ours(ids, positions=pos, cache=cache, batch=batch)
            start = 0
            for i, k in zip(live, new, strict=True):
                outs[i].append(logits[start : start + k])
                start += k
                done[i] += k
    for out, ref in zip(outs, refs, strict=True):
        assert_close(torch.cat(out), ref)


def test_batched_decodes_match_full_forward(pair):
    """Sequences of different lengths decoding together (the padded decode path, with its window mask where
    the model has one) equal the plain causal forward of each sequence."""
    hf, ours = pair
    gen = torch.Generator().manual_seed(3)
    lens, prompt = [30, 14, 23], [9, 3, 17]
    seqs = [torch.randint(0, VOCAB, (n,), generator=gen) for n in lens]
    with torch.no_grad():
        refs = [hf(s[None]).logits[0] for s in seqs]
    cache, window = KVCache(ours.config, num_blocks=24, block_size=4), ours.config.sliding_window
    perm = torch.randperm(24, generator=gen).tolist()
    tables = [perm[0:8], perm[8:12], perm[12:18]]
    with torch.no_grad():
        for i in range(3):  # each prompt alone
            batch = CacheBatch.build([tables[i]], [0], [prompt[i]], 4, sliding_window=window)
            ours(seqs[i][: prompt[i]], positions=torch.arange(prompt[i]), cache=cache, batch=batch)
        done, outs = list(prompt), [[], [], []]
        while live := [i for i in range(3) if done[i] < lens[i]]:  # then one token each, all together
            cached = [done[i] for i in live]
            batch = CacheBatch.build(
                [tables[i] for i in live], cached, [1] * len(live), 4, sliding_window=window
            )
            ids = torch.stack([seqs[i][done[i]] for i in live])
            logits = ours(ids, positions=torch.tensor(cached), cache=cache, batch=batch)
            for row, i in enumerate(live):
                outs[i].append(logits[row])
                done[i] += 1
    for i in range(3):
        assert_close(torch.stack(outs[i]), refs[i][prompt[i] :])


@pytest.mark.parametrize("room", ["roomy", "tight"])
def test_dense_decode_copy_matches_full_forward(pair, room):
    """Decodes attending the dense copy (DenseDecode) equal the plain causal forward of each sequence while the
    batch changes under it: a sequence joins with its prompt prefilled beside the decodes, others finish and
    their rows are refilled by moved sequences, the copy grows with the contexts; and, tight, once the
    contexts outgrow the copy's limit the step goes back to gathering from the paged cache."""
    hf, ours = pair
    cfg = ours.config
    gen = torch.Generator().manual_seed(4)
    lens, prompt, joins = [100, 40, 75, 60, 52], [9, 3, 17, 30, 5], [0, 0, 0, 12, 30]
    seqs = [torch.randint(0, VOCAB, (n,), generator=gen) for n in lens]
    with torch.no_grad():
        refs = [hf(s[None]).logits[0] for s in seqs]
    cache, window = KVCache(cfg, num_blocks=96, block_size=4), cfg.sliding_window
    per_token = KVCache.bytes_per_token(cfg)
    dense = DenseDecode(cache, 2**30 if room == "roomy" else 192 * per_token)
    perm, tables = torch.randperm(96, generator=gen).tolist(), []
    for n in lens:  # scattered blocks
        tables.append(perm[: -(-n // 4)])
        perm = perm[-(-n // 4) :]
    done, outs, used, step = [0] * 5, [[] for _ in range(5)], [], 0
    with torch.no_grad():
        while live := [i for i in range(5) if joins[i] <= step and done[i] < lens[i]]:
            new = [prompt[i] if done[i] == 0 else 1 for i in live]
            batch = CacheBatch.build(
                [tables[i] for i in live], [done[i] for i in live], new, 4, sliding_window=window
            )
            dense.plan([i for i, n in zip(live, new, strict=True) if n == 1], batch)
            used.append((new.count(1), batch.dense is not None))
            assert dense.nbytes <= dense.limit_bytes
            ids = torch.cat([seqs[i][done[i] : done[i] + n] for i, n in zip(live, new, strict=True)])
            pos = torch.cat([torch.arange(done[i], done[i] + n) for i, n in zip(live, new, strict=True)])
            logits = ours(ids, positions=pos, cache=cache, batch=batch)
            start = 0
            for i, n in zip(live, new, strict=True):
                outs[i].append(logits[start : start + n])
                start += n
                done[i] += n
            step += 1
    for out, ref in zip(outs, refs, strict=True):
        assert_close(torch.cat(out), ref)
    if room == "roomy":  # every step with two or more decodes used the copy, which grew past 64 positions
        assert all(on == (decodes >= 2) for decodes, on in used)
        assert dense.shape[1] >= 100 and dense.nbytes >= dense.shape[0] * dense.shape[1] * per_token
    else:  # 192 row-positions: the copy while the decodes' rows x longest context fit, else the gather
        off_on = sum(a[0] >= 2 and not a[1] and b[1] for a, b in zip(used, used[1:], strict=False))
        assert (5, False) in used and (4, True) in used and off_on >= 2  # back on after each gathering spell


@pytest.mark.parametrize("pair", ["mistral-window"], indirect=True)
def test_a_batch_built_without_the_models_window_is_refused(pair):
    _, ours = pair
    batch = CacheBatch.build([[0, 1], [2, 3]], [5, 6], [1, 1], 4)  # two decodes, no window
    with pytest.raises(ValueError, match="sliding window"):
        ours(
            torch.tensor([1, 2]),
            positions=torch.tensor([5, 6]),
            cache=KVCache(ours.config, 4, 4),
            batch=batch,
        )


def test_incomplete_config_is_a_user_error():
    from lmforge.errors import UserError

    with pytest.raises(UserError, match="lacks 'vocab_size'"):
        config_from_hf({"model_type": "llama", "hidden_size": 64})
    with pytest.raises(UserError, match="unsupported model_type 'bert'"):
        config_from_hf({"model_type": "bert"})


def test_cache_batch_views_only_truly_consecutive_blocks():
    # first and last slot 15 apart over 16 tokens, yet blocks 1 and 2 are swapped: must gather, not view
    swapped = CacheBatch.build([[0, 2, 1, 3]], [15], [1], block_size=4).decode_single
    assert not swapped.contiguous
    assert swapped.slots.tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15]
    assert CacheBatch.build([[4, 5, 6]], [9], [1], block_size=4).decode_single.contiguous


def test_dense_decode_keeps_rows_and_copies_in_only_joiners_and_movers():
    """A sequence decoding step after step keeps its row (no copy); a finished one's row is taken by the
    sequence in the row past the new batch size (copied in again); one whose context did not advance by
    exactly one token since (recomputed after preemption) is copied in again."""
    cfg = config_from_hf({"model_type": "llama", **TINY, "num_key_value_heads": 2})
    cache = KVCache(cfg, num_blocks=16, block_size=4)
    dense = DenseDecode(cache, 2**20)
    copied = []
    copy_in = dense._copy_in
    dense._copy_in = lambda rows, slots: (copied.append(sorted(rows)), copy_in(rows, slots))
    tables = {s: [2 * i, 2 * i + 1, 8 + i] for i, s in enumerate("abcd")}

    def step(ctx):  # ctx: sequence -> its context length this step (one new token each)
        batch = CacheBatch.build([tables[s] for s in ctx], [n - 1 for n in ctx.values()], [1] * len(ctx), 4)
        dense.plan(list(ctx), batch)
        assert batch.dense is not None
        rows = [dense.rows[s] for s in ctx]
        assert batch.dense.order.tolist() == sorted(range(len(ctx)), key=lambda j: rows[j])
        return dict(dense.rows)

    assert step({"a": 5, "b": 6, "c": 7, "d": 8}) == {"a": 0, "b": 1, "c": 2, "d": 3}
    assert step({"a": 6, "c": 8, "d": 9}) == {"a": 0, "c": 2, "d": 1}  # b finished: d moves into its row
    assert step({"a": 7, "c": 9, "d": 10}) == {"a": 0, "c": 2, "d": 1}
    # a recomputed: same row, copied again
    assert step({"a": 5, "c": 10, "d": 11}) == {"a": 0, "c": 2, "d": 1}
    assert copied == [[0, 1, 2, 3], [1], [0]]
    # one decode: the single-sequence path, rows forgotten
    batch = CacheBatch.build([tables["c"]], [10], [1], 4)
    dense.plan(["c"], batch)
    assert batch.dense is None and dense.rows == {}


def test_dense_decode_lays_out_rows_and_positions_within_its_limit_and_keeps_its_memory():
    """The copy is laid out for each batch within the limit: 8 rows of 128 positions, then 12 of 85 (more rows
    in the same memory: every row is copied in again, from the paged cache), then 2 rows of 100 after 16 of 60
    (fewer, longer rows). A batch over the limit gathers, and its memory stays for the next batch that fits:
    no reallocation at the limit's edge. Every row equals the paged cache at its sequence's slots."""
    cfg = config_from_hf({"model_type": "llama", **TINY, "num_key_value_heads": 2})
    cache = KVCache(cfg, num_blocks=600, block_size=4)
    gen = torch.Generator().manual_seed(5)
    for t in cache.k + cache.v:
        t.copy_(torch.randn(t.shape, generator=gen))
    per_position = KVCache.bytes_per_token(cfg)
    dense = DenseDecode(cache, 1024 * per_position)  # 1,024 row-positions
    tables = {s: list(range(i * 30, i * 30 + 30)) for i, s in enumerate("abcdefghijklmnopq")}
    copied = []
    copy_in = dense._copy_in
    dense._copy_in = lambda rows, slots: (copied.append(sorted(rows)), copy_in(rows, slots))

    def step(ctx):
        batch = CacheBatch.build([tables[s] for s in ctx], [n - 1 for n in ctx.values()], [1] * len(ctx), 4)
        dense.plan(list(ctx), batch)
        assert dense.nbytes <= dense.limit_bytes
        if batch.dense is None:
            return False
        for s, n in ctx.items():  # the context before this step's token (the layers append that one)
            slots = torch.tensor([tables[s][p // 4] * 4 + p % 4 for p in range(n - 1)])
            for i in range(cfg.n_layer):
                assert torch.equal(dense.k[i][dense.rows[s], :, : n - 1], cache.k[i][:, slots])
                assert torch.equal(dense.v[i][dense.rows[s], :, : n - 1], cache.v[i][:, slots])
        return True

    assert step({"a": 70, "b": 100}) and dense.shape == (8, 128)
    assert step({"a": 71, **{s: 60 for s in "cdefghijklm"}})  # 16 x 71 is over the limit, 12 x 85 is not
    assert dense.shape == (12, 85) and copied == [[0, 1], list(range(12))]
    memory = [t.data_ptr() for t in dense.k + dense.v]
    sixteen = {s: 60 for s in "abcdefghijklmnop"}
    assert step(sixteen) and dense.shape == (16, 64)
    assert not step({**{s: 61 for s in sixteen}, "q": 61})  # 17 x 61 is over: gather, the memory kept
    assert step({"a": 100, "b": 100}) and dense.shape == (8, 128)  # fewer, longer rows fit again
    assert [t.data_ptr() for t in dense.k + dense.v] == memory and dense.nbytes == 1024 * per_position


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_mask_spelled_out(dtype):
    """SeqSlice.mask: query i of t new tokens (position ctx - t + i) sees key j iff j <= its position and, with a
    window w, its position - j < w; 0 where it sees, -inf elsewhere. None where plain causal attention is the
    same (no cached prefix, no window), and made once per window and dtype (every layer shares it)."""
    for t, ctx, window in [(5, 5, None), (5, 5, 3), (4, 11, None), (4, 11, 3), (1, 9, 4), (7, 20, 8)]:
        seq = SeqSlice(0, t, ctx, torch.arange(ctx), contiguous=True)
        mask = seq.mask(window, dtype)
        if t == ctx and window is None:
            assert mask is None
            continue
        ref = torch.tensor(
            [
                [0.0 if j <= ctx - t + i and (window is None or ctx - t + i - j < window) else float("-inf")
                 for j in range(ctx)]
                for i in range(t)
            ],
            dtype=dtype,
        )  # fmt: skip
        assert mask.dtype == dtype and torch.equal(mask, ref)
        assert seq.mask(window, dtype) is mask
