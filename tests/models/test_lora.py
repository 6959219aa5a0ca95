"""LoRA against independent references: the base model (B = 0), the merged model (one weight, no adapter
path), and PEFT on a transformers Llama (GQA) in both directions of the adapter file format."""

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from lmforge.errors import UserError
from lmforge.models.config import ModelConfig, config_from_hf
from lmforge.models.convert import hf_to_lmforge
from lmforge.models.gpt import build_model
from lmforge.models.layers import Linear
from lmforge.models.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    save_adapter,
)

VOCAB = 97
CFG = ModelConfig(
    arch="llama",
    vocab_size=VOCAB,
    n_layer=2,
    n_head=4,
    n_kv_head=2,
    n_embd=32,
    intermediate_size=64,
    max_seq_len=64,
)


def assert_close(ours, ref, rtol):
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    mean = (ours - ref).abs().mean().item()
    assert err <= rtol * scale, f"max abs err {err:.3g} (mean {mean:.3g}) vs scale {scale:.3g}"


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model(CFG)


def _ids(seed=1, shape=(3, 20)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _train(model, steps=5, lr=1e-2, seed=3):
    """A few AdamW steps on random next-token data, LoRA parameters only."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for step in range(steps):
        ids = _ids(seed + step, (4, 16))
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def test_init_logits_equal_base_exactly():
    base = _model().eval()
    ids = _ids()
    with torch.no_grad():
        ref = base(ids)
        adapted = apply_lora(base, LoraConfig(r=4, dropout=0.1), generator=torch.Generator().manual_seed(0))
        assert not any(m.training for m in adapted.modules())  # the model's eval mode is kept
        out = adapted(ids)
    assert torch.equal(out, ref), f"max diff {(out - ref).abs().max().item():.3g}"


def test_targets_follow_peft_matching():
    m = apply_lora(_model(), LoraConfig(target_modules=("q_proj", "mlp.down_proj")))
    wrapped = {n for n, mod in m.named_modules() if isinstance(mod, LoraLinear)}
    assert wrapped == {f"layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "mlp.down_proj")}
    # a regex must match the whole name (ours or HF's)
    m = apply_lora(_model(), LoraConfig(target_modules=(r"model\.layers\.1\.self_attn\.(k|v)_proj",)))
    wrapped = {n for n, mod in m.named_modules() if isinstance(mod, LoraLinear)}
    assert wrapped == {"layers.1.self_attn.k_proj", "layers.1.self_attn.v_proj"}
    with pytest.raises(UserError, match="match no Linear"):
        apply_lora(_model(), LoraConfig(target_modules=("proj",)))  # not a full last component
    with pytest.raises(UserError, match="already has LoRA"):
        apply_lora(m, LoraConfig())


def test_train_only_lora_then_merge_matches():
    model = _model()
    base_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = LoraConfig(
        r=4, alpha=8.0, dropout=0.1, target_modules=("q_proj", "v_proj", "o_proj", "gate_proj", "lm_head")
    )
    apply_lora(model, cfg, generator=torch.Generator().manual_seed(0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for step in range(5):
        ids = _ids(10 + step, (4, 16))
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad == trainable
        opt.step()
    model.eval()

    for n, p in model.named_parameters():
        if n not in trainable:
            orig = n.replace(".base_layer.", ".")
            assert torch.equal(p, base_params[orig]), f"base parameter {orig} changed"
    assert any(m.lora_B.weight.abs().max() > 0 for m in model.modules() if isinstance(m, LoraLinear))

    ids = _ids(99)
    with torch.no_grad():
        ref = model(ids)
        merged = merge_lora(model)(ids)
        base_out = build_model(CFG, base_params)(ids)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert type(model.layers[0].self_attn.q_proj) is Linear
    assert set(dict(model.named_parameters())) == set(base_params)
    assert_close(merged, ref, 1e-5)
    assert (merged - base_out).abs().max() > 1e-3  # the adapter did change the model


def test_save_load_roundtrip_is_atomic_and_exact(tmp_path):
    model = _train(apply_lora(_model(), LoraConfig(r=4, target_modules=("q_proj", "up_proj"))))
    folder = tmp_path / "adapter"
    save_adapter(model, folder, LoraConfig(r=4, target_modules=("q_proj", "up_proj")), "tiny-llama")
    save_adapter(
        model, folder, LoraConfig(r=4, target_modules=("q_proj", "up_proj")), "tiny-llama"
    )  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    meta = json.loads((folder / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["task_type"] == "CAUSAL_LM" and meta["r"] == 4
    assert meta["target_modules"] == ["q_proj", "up_proj"] and meta["base_model_name_or_path"] == "tiny-llama"
    keys = set(load_file(folder / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert keys == set(lora_state_dict(model))

    fresh = _model()
    cfg = load_adapter(fresh, folder)
    assert cfg == LoraConfig(r=4, target_modules=("q_proj", "up_proj"))
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


# ------------------------------------------------------------------------------------------- PEFT

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        )
    )
    folder = tmp_path_factory.mktemp("hf-llama")
    hf.save_pretrained(folder)
    return folder


def _load_hf(folder):
    return transformers.LlamaForCausalLM.from_pretrained(folder).eval()


def _load_ours(folder):
    cfg = config_from_hf(json.loads((folder / "config.json").read_text()))
    return build_model(cfg, hf_to_lmforge(load_file(folder / "model.safetensors"), cfg))


def test_peft_loads_our_adapter(hf_folder, tmp_path):
    cfg = LoraConfig(r=4, alpha=12.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))
    ours = _train(apply_lora(_load_ours(hf_folder), cfg, generator=torch.Generator().manual_seed(0)))
    save_adapter(ours, tmp_path / "adapter", cfg, str(hf_folder))
    ref_model = peft.PeftModel.from_pretrained(_load_hf(hf_folder), tmp_path / "adapter").eval()
    ids = _ids(5, (2, 24))
    with torch.no_grad():
        ref = ref_model(ids).logits
        out = ours(ids)
        base = _load_hf(hf_folder)(ids).logits
    assert (ref - base).abs().max() > 1e-3  # PEFT really applied a non-zero adapter
    assert_close(out, ref, 1e-4)


def test_peft_loads_our_regex_adapter(hf_folder, tmp_path):
    cfg = LoraConfig(r=2, target_modules=(r".*\.1\.mlp\.(up|gate)_proj",))
    ours = _train(apply_lora(_load_ours(hf_folder), cfg))
    save_adapter(ours, tmp_path / "adapter", cfg, str(hf_folder))
    ref_model = peft.PeftModel.from_pretrained(_load_hf(hf_folder), tmp_path / "adapter").eval()
    ids = _ids(6, (2, 24))
    with torch.no_grad():
        assert_close(ours(ids), ref_model(ids).logits, 1e-4)


def test_we_load_peft_adapter(hf_folder, tmp_path):
    torch.manual_seed(1)
    peft_cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.05,
        target_modules=["q_proj", "v_proj", "up_proj"],
        task_type="CAUSAL_LM",
    )
    ref_model = peft.get_peft_model(_load_hf(hf_folder), peft_cfg)
    with torch.no_grad():
        for name, p in ref_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    ref_model.save_pretrained(tmp_path / "adapter")
    ref_model.eval()

    ours = _load_ours(hf_folder)
    cfg = load_adapter(ours, tmp_path / "adapter")
    assert cfg.r == 4 and cfg.alpha == 8 and set(cfg.target_modules) == {"q_proj", "v_proj", "up_proj"}
    ids = _ids(7, (2, 24))
    with torch.no_grad():
        ref = ref_model(ids).logits
        out = ours(ids)
        assert_close(out, ref, 1e-4)
        assert_close(merge_lora(ours)(ids), ref, 1e-4)


# ------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def adapter_folder(tmp_path):
    cfg = LoraConfig(r=4)
    save_adapter(apply_lora(_model(), cfg), tmp_path / "adapter", cfg, "tiny")
    return tmp_path / "adapter"


def test_missing_config_is_user_error(adapter_folder):
    (adapter_folder / "adapter_config.json").unlink()
    with pytest.raises(UserError, match="adapter_config.json is missing"):
        load_adapter(_model(), adapter_folder)


def test_missing_or_corrupt_weights_is_user_error(adapter_folder):
    path = adapter_folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError, match="truncated or not a safetensors"):
        load_adapter(_model(), adapter_folder)
    path.unlink()
    with pytest.raises(UserError, match="is missing"):
        load_adapter(_model(), adapter_folder)


def test_bad_config_json_is_user_error(adapter_folder):
    (adapter_folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_adapter(_model(), adapter_folder)


def test_shape_mismatch_is_user_error_and_leaves_model_untouched(adapter_folder):
    meta = json.loads((adapter_folder / "adapter_config.json").read_text())
    meta["r"] = 8  # the weights are rank 4
    (adapter_folder / "adapter_config.json").write_text(json.dumps(meta))
    model = _model()
    with pytest.raises(UserError, match="has shape"):
        load_adapter(model, adapter_folder)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    meta["r"] = 4
    (adapter_folder / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="different base model"):
        load_adapter(build_model(dataclasses.replace(CFG, n_embd=64)), adapter_folder)


def test_mismatched_targets_is_user_error(adapter_folder):
    meta = json.loads((adapter_folder / "adapter_config.json").read_text())
    meta["target_modules"] = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]
    (adapter_folder / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="missing"):
        load_adapter(_model(), adapter_folder)


def test_unsupported_peft_options_are_user_errors(adapter_folder):
    meta = json.loads((adapter_folder / "adapter_config.json").read_text())
    (adapter_folder / "adapter_config.json").write_text(json.dumps({**meta, "use_dora": True}))
    with pytest.raises(UserError, match="use_dora"):
        load_adapter(_model(), adapter_folder)


def test_tied_lm_head_and_gpt2_save_are_refused(tmp_path):
    tied = build_model(dataclasses.replace(CFG, tie_embeddings=True))
    with pytest.raises(UserError, match="tied"):
        apply_lora(tied, LoraConfig(target_modules=("lm_head",)))
    from lmforge.models.config import gpt2_config

    gpt2 = apply_lora(
        build_model(gpt2_config(vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16, max_seq_len=32)),
        LoraConfig(),
    )
    with pytest.raises(UserError, match="not 'gpt2'"):
        save_adapter(gpt2, tmp_path / "a", LoraConfig(), "gpt2")


def test_bad_lora_config_is_user_error():
    with pytest.raises(UserError):
        LoraConfig(r=0)
    with pytest.raises(UserError):
        LoraConfig(dropout=1.0)
    with pytest.raises(UserError):
        LoraConfig(target_modules=("q_proj(",))
    assert LoraConfig(target_modules=["q_proj"]).target_modules == ("q_proj",)
    copy.deepcopy(LoraConfig())
