"""Several LoRA adapters served in one continuous batch, against their slow twins: each request run alone, and
single-sequence generation with the adapter merged into the weights."""

import asyncio
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.engine import AsyncEngine, EngineConfig, LLMEngine
from lmforge.engine.generate import generate
from lmforge.engine.types import SamplingParams
from lmforge.errors import UserError
from lmforge.models.gpt import GPT, build_model
from tests.engine.conftest import random_prompts

PEFT_PREFIX = "base_model.model.model."


def write_adapter(
    model: GPT, folder: Path, targets: tuple[str, ...], *, r: int, seed: int, std: float
) -> Path:
    """A PEFT adapter folder for `model` written by hand (not by lmforge): random A (Kaiming-like) and B."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            a = torch.randn(r, m.in_features, generator=gen) / m.in_features**0.5
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (
                torch.randn(m.out_features, r, generator=gen) * std
            )
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(targets)}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def merged_model(model: GPT, folder: Path) -> GPT:
    """The base with W + B A * alpha / r folded into each adapted weight (new tensors; the others are shared)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    tensors = load_file(folder / "adapter_model.safetensors")
    sd = dict(model.state_dict())
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            name = key[len(PEFT_PREFIX) : -len(".lora_A.weight")]
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            sd[f"{name}.weight"] = sd[f"{name}.weight"] + scaling * (b @ a)
    return build_model(model.config, sd).eval()


def alone(model, prompt, params, eos_ids=frozenset()):
    return [t.id for t in generate(model, prompt, params, eos_ids=eos_ids)]


# ------------------------------------------------------------------------------------------- a tiny Llama


@pytest.fixture(scope="module")
def tiny_adapters(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    a = write_adapter(tiny, root / "a", ("q_proj", "v_proj", "down_proj"), r=4, seed=1, std=1.0)
    b = write_adapter(tiny, root / "b", ("k_proj", "o_proj", "gate_proj", "up_proj"), r=2, seed=2, std=1.0)
    return {"a": a, "b": b}


@pytest.fixture(scope="module")
def tiny_merged(tiny, tiny_adapters):
    return {None: tiny, **{name: merged_model(tiny, folder) for name, folder in tiny_adapters.items()}}


def lora_engine(model, adapters, config):
    engine = LLMEngine(model, config)
    for name, folder in adapters.items():
        engine.add_lora(name, folder)
    return engine


@pytest.mark.parametrize(
    "config",
    [
        EngineConfig(kv_cache_mb=4),
        EngineConfig(kv_cache_mb=4, max_num_batched_tokens=16),  # chunked prefill alongside decodes
        EngineConfig(kv_cache_mb=0.05, block_size=4),  # 400 slots for ~1,100 tokens: preemption
    ],
    ids=["plain", "chunked", "preempting"],
)
def test_mixed_adapter_batch_equals_merged_alone(config, tiny_adapters, tiny_merged):
    # the engine gets its own copy of the base: adding adapters swaps its layers
    base = build_model(tiny_merged[None].config, tiny_merged[None].state_dict()).eval()
    engine = lora_engine(base, tiny_adapters, config)
    prompts = random_prompts(12, seed=1)
    loras = ["a", "b", None] * 4
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    outs = engine.generate(prompts, params, loras)
    refs = [alone(tiny_merged[lora], p, params) for p, lora in zip(prompts, loras, strict=True)]
    assert outs == refs
    # each adapter changed its requests' outputs (so the comparison above can fail)
    for i in range(2):
        assert refs[i] != alone(tiny_merged[None], prompts[i], params)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    if config.kv_cache_mb < 0.1:
        assert engine.scheduler.num_preemptions > 0


def test_prefix_cache_is_never_shared_across_adapters(tiny, tiny_adapters, tiny_merged):
    base = build_model(tiny.config, tiny.state_dict()).eval()
    engine = lora_engine(base, tiny_adapters, EngineConfig(kv_cache_mb=4, block_size=4))
    prompt = random_prompts(1, seed=3, lo=40, hi=40)[0]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    def run(rid, lora, salt=""):
        engine.add_request(rid, prompt, params, salt=salt, lora=lora)
        outs = []
        while engine.has_unfinished:
            outs += engine.step()
        return [t for o in outs for t in o.new_token_ids], outs[-1].num_cached_tokens

    assert run("base", None) == (alone(tiny, prompt, params), 0)
    assert run("a1", "a") == (alone(tiny_merged["a"], prompt, params), 0)  # not the base's blocks
    assert run("b1", "b") == (alone(tiny_merged["b"], prompt, params), 0)  # nor a's
    assert run("a2", "a") == (alone(tiny_merged["a"], prompt, params), 36)  # a's own, within its salt
    assert run("a3", "a", salt="tenant-2")[1] == 0
    assert run("base2", None)[1] == 36
    with pytest.raises(ValueError, match="NUL"):
        engine.add_request("x", prompt, params, salt="t\x00lora:a")


def test_unknown_adapter_is_user_error(tiny, tiny_adapters):
    plain = LLMEngine(tiny, EngineConfig(kv_cache_mb=1))
    with pytest.raises(UserError, match="no LoRA adapter named 'a'.*loaded: none"):
        plain.add_request("r", [1, 2, 3], SamplingParams(), lora="a")
    assert plain.lora_names == () and type(tiny.layers[0].self_attn.q_proj).__name__ == "Linear"
    engine = lora_engine(
        build_model(tiny.config, tiny.state_dict()), tiny_adapters, EngineConfig(kv_cache_mb=1)
    )
    assert engine.lora_names == ("a", "b")
    with pytest.raises(UserError, match="no LoRA adapter named 'c'.*loaded: a, b"):
        engine.add_request("r", [1, 2, 3], SamplingParams(), lora="c")
    with pytest.raises(UserError, match="already loaded"):
        engine.add_lora("a", tiny_adapters["b"])
    assert not engine.has_unfinished


def test_async_engine_serves_adapters_side_by_side(tiny, tiny_adapters, tiny_merged):
    async def main():
        base = build_model(tiny.config, tiny.state_dict()).eval()
        engine = AsyncEngine(lora_engine(base, tiny_adapters, EngineConfig(kv_cache_mb=4)), "tiny")
        assert engine.model_info().loras == ("a", "b")
        engine.start()
        prompt = random_prompts(1, seed=5)[0]
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

        async def tokens(rid, lora):
            outs = [o async for o in engine.generate(prompt, params, rid, lora=lora)]
            return [t for o in outs for t in o.new_token_ids]

        got = await asyncio.gather(tokens("r1", "a"), tokens("r2", "b"), tokens("r3", None))
        assert got == [alone(tiny_merged[k], prompt, params) for k in ("a", "b", None)]
        with pytest.raises(UserError, match="no LoRA adapter named 'zz'"):
            await engine.generate(prompt, params, "r4", lora="zz").__anext__()
        await engine.shutdown(drain_timeout=1)

    asyncio.run(main())


# ------------------------------------------------------------------------------------------- the default model


@pytest.fixture(scope="module")
def smol_adapters(smollm2, tmp_path_factory):
    # Scales chosen so that each adapter changes every answer below while the greedy paths keep a top-1 / top-2
    # logit margin of at least 0.03 (rounding differences between batched and merged are ~1e-5).
    root = tmp_path_factory.mktemp("smol-adapters")
    model = smollm2.model
    return {
        "a": write_adapter(model, root / "a", ("q_proj", "v_proj", "gate_proj"), r=8, seed=1, std=0.05),
        "b": write_adapter(model, root / "b", ("o_proj", "up_proj", "down_proj"), r=4, seed=3, std=0.2),
    }


def test_default_model_mixed_batch_equals_alone_and_merged(smollm2, smol_adapters):
    tok, eos = smollm2.tokenizer, smollm2.eos_ids
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "List three fruits."]
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True))
               for q in questions]  # fmt: skip
    params = SamplingParams(max_tokens=24, temperature=0)
    # the engine's model shares the fixture's tensors; only its own module tree gets swapped layers
    served = build_model(smollm2.model.config, smollm2.model.state_dict()).eval()
    engine = LLMEngine(served, EngineConfig(kv_cache_mb=64), eos_ids=eos)
    for name, folder in smol_adapters.items():
        engine.add_lora(name, folder)
    models = {None: smollm2.model, **{k: merged_model(smollm2.model, f) for k, f in smol_adapters.items()}}
    reference = {
        (i, lora): alone(models[lora], p, params, eos) for i, p in enumerate(prompts) for lora in models
    }

    # every prompt under every adapter and none, all nine in one batch
    pairs = [(i, lora) for lora in ("a", "b", None) for i in range(3)]
    batched = engine.generate([prompts[i] for i, _ in pairs], params, [lora for _, lora in pairs])
    assert batched == [reference[pair] for pair in pairs]
    for i, lora in [(0, "a"), (1, "b")]:  # and the engine serving one request alone
        assert engine.generate([prompts[i]], params, [lora]) == [reference[i, lora]]
    # every adapter changed every answer, so equal outputs are no accident of adapters doing nothing
    assert all(reference[i, lora] != reference[i, None] for i in range(3) for lora in ("a", "b"))
