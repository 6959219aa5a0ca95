"""Our model vs transformers on small randomly initialised GPT-2, Llama (GQA, untied) and Qwen2 (qkv
biases, tied) models: same weights, logits within 1e-4 relative, with and without the paged KV cache."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lmforge.models.config import config_from_hf
from lmforge.models.convert import hf_to_lmforge
from lmforge.models.gpt import build_model
from lmforge.models.kv_cache import CacheBatch, KVCache

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
