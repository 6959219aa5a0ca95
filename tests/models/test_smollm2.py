"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) in lmforge vs transformers' GGUF loader."""

import json

import pytest
import torch

from lmforge import checkpoint
from lmforge.engine.generate import generate
from lmforge.engine.types import SamplingParams
from tests.models.test_parity import assert_close

PROMPT = "The history of the printing press begins in"


@pytest.fixture(scope="module")
def prompt_ids(smollm2):
    return smollm2.tokenizer.encode(PROMPT)


def test_config_from_gguf(smollm2):
    cfg = smollm2.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.n_embd, cfg.intermediate_size) == (
        30,
        9,
        3,
        576,
        1536,
    )
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0 and cfg.vocab_size == 49152


def test_logits_match_transformers(smollm2, smollm2_hf, prompt_ids):
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        ref = smollm2_hf(ids).logits
        out = smollm2.model(ids)
    assert_close(out, ref)


def test_greedy_with_cache_equals_recompute_200_tokens(smollm2, prompt_ids):
    """Each of 200 greedy tokens decoded over the KV cache is the argmax of a full causal forward without one.
    One forward over the whole sequence checks every step: causal, so position t sees exactly the tokens that
    recomputing at step t would (200 forwards of growing length took 80 s for the same check)."""
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    cached = [t.id for t in generate(smollm2.model, prompt_ids, params)]
    assert len(cached) == 200
    with torch.inference_mode():
        logits = smollm2.model(torch.tensor([prompt_ids + cached[:-1]]))[0, len(prompt_ids) - 1 :]
    assert logits.argmax(-1).tolist() == cached


def test_greedy_equals_transformers_generate(smollm2, smollm2_hf, prompt_ids):
    params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    ours = [t.id for t in generate(smollm2.model, prompt_ids, params)]
    with torch.no_grad():
        ref = smollm2_hf.generate(
            torch.tensor([prompt_ids]), max_new_tokens=128, min_new_tokens=128, do_sample=False
        )[0, len(prompt_ids) :].tolist()
    assert ours == ref


def test_saved_folder_loads_in_transformers(smollm2, tmp_path, prompt_ids):
    transformers = pytest.importorskip("transformers")
    folder = checkpoint.save(tmp_path / "smol", smollm2.model, smollm2.tokenizer, metrics={"note": "test"})
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert {"generation_config.json", "lmforge.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf_tok.encode(PROMPT, add_special_tokens=False) == prompt_ids
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        assert_close(smollm2.model(ids), hf(ids).logits, rtol=1e-5)
    # and back into lmforge: same logits, same metadata
    again = checkpoint.load(folder)
    with torch.no_grad():
        assert torch.equal(again.model(ids), smollm2.model(ids))
    assert json.loads((folder / "lmforge.json").read_text())["metrics"] == {"note": "test"}
    assert again.eos_ids == smollm2.eos_ids


def test_sharded_save_round_trip(smollm2, tmp_path, prompt_ids):
    folder = checkpoint.save(
        tmp_path / "sharded", smollm2.model, smollm2.tokenizer, max_shard_bytes=100_000_000
    )
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").exists()
    again = checkpoint.load(folder)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        assert torch.equal(again.model(ids), smollm2.model(ids))


def test_seeded_sampling_is_reproducible(smollm2, prompt_ids):
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True)
    a = [t.id for t in generate(smollm2.model, prompt_ids, params)]
    b = [t.id for t in generate(smollm2.model, prompt_ids, params)]
    c = [t.id for t in generate(smollm2.model, prompt_ids, SamplingParams(**{**params.__dict__, "seed": 99}))]
    assert a == b and a != c
