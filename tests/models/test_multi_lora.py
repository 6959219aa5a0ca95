"""Serving several LoRA adapters at once (MultiLoRA) against its slow twins: each adapter applied alone to its
rows (LoraLinear), the merged weights, the untouched base (rows of no adapter), and PEFT's own mixed-adapter
batch (`adapter_names=`) on a transformers Llama."""

import json

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import UserError
from lmforge.models.config import config_from_hf
from lmforge.models.convert import hf_to_lmforge
from lmforge.models.gpt import build_model
from lmforge.models.layers import Linear
from lmforge.models.lora import (
    LoraConfig,
    LoraLinear,
    MultiLoRA,
    MultiLoRALinear,
    _ActiveRows,
    _segments,
    apply_lora,
    load_adapter,
    merge_lora,
    save_adapter,
)
from tests.models.test_lora import CFG, VOCAB

TOL = 1e-5  # fp32, max abs difference


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model(CFG).eval()


def _ids(seed=1, shape=(3, 20)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _adapter(folder, cfg: LoraConfig, seed: int, model_seed=0):
    """A PEFT adapter folder with random, non-zero A and B (B = 0 would make every adapter the base)."""
    model = apply_lora(_model(model_seed), cfg, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.weight.normal_(0.0, 0.2, generator=gen)
    save_adapter(model, folder, cfg, "tiny")
    return folder


CFG_A = LoraConfig(r=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"))
CFG_B = LoraConfig(r=2, alpha=6.0, target_modules=("q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"))


@pytest.fixture
def folders(tmp_path):
    return _adapter(tmp_path / "a", CFG_A, seed=10), _adapter(tmp_path / "b", CFG_B, seed=20)


# ------------------------------------------------------------------------------------------- one layer


@pytest.mark.parametrize(
    "slots",
    [
        [0, 1, -1, 1, 0, 0, -1, 1, 0, 1, -1, 0],  # interleaved: gathered rows
        [0, 0, 0, 0, 1, 1, 1, 1, 1, -1, -1, -1],  # consecutive: slices
        [1] * 12,
        [-1] * 12,
    ],
    ids=["interleaved", "segments", "one-adapter", "none"],
)
def test_layer_equals_each_adapter_alone_and_merged(slots):
    torch.manual_seed(0)
    base = Linear(48, 40)
    # the scales of a trained adapter: A Kaiming-like, B small, base outputs of order 1
    adapters = [
        (torch.randn(4, 48) / 48**0.5, 0.1 * torch.randn(40, 4), 2.0),
        (torch.randn(3, 48) / 48**0.5, 0.1 * torch.randn(40, 3), 0.5),
    ]
    layer = MultiLoRALinear(base, _ActiveRows())
    for slot, (a, b, s) in enumerate(adapters):
        layer.add_adapter(slot, a, b, s)
    x = torch.randn(len(slots), 48)
    index = torch.tensor(slots)
    layer.active.segments = _segments(index, x.device)
    with torch.no_grad():
        out = layer(x)
        base_out = base(x)
        merged_weights = [base.weight + s * b @ a for a, b, s in adapters]
    none = index == -1
    assert torch.equal(out[none], base_out[none])  # rows of no adapter: the base, bit for bit
    for slot, (a, b, s) in enumerate(adapters):
        rows = index == slot
        if not rows.any():
            continue
        alone = base_out[rows] + s * (x[rows] @ a.T) @ b.T
        merged = F.linear(x[rows], merged_weights[slot], base.bias)
        assert max_diff(out[rows], alone) <= TOL
        assert max_diff(out[rows], merged) <= TOL
        assert max_diff(out[rows], base_out[rows]) > 1e-3  # the adapter did something


# ------------------------------------------------------------------------------------------- a model


def test_no_adapter_no_swap_and_identity_outside_activate(folders):
    model = _model()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids)
    loras = MultiLoRA(model)
    assert type(model.layers[0].self_attn.q_proj) is Linear  # nothing swapped until an adapter loads
    loras.add("a", folders[0])
    assert isinstance(model.layers[0].self_attn.q_proj, MultiLoRALinear)
    assert type(model.layers[0].self_attn.k_proj) is Linear  # adapter a leaves k_proj alone
    with torch.no_grad():
        assert torch.equal(model(ids), ref)  # outside activate(): the base model
        with loras.activate([-1] * ids.numel()):
            assert torch.equal(model(ids), ref)
        with loras.activate([0] * ids.numel()):
            assert max_diff(model(ids), ref) > 1e-2
        assert torch.equal(model(ids), ref)  # activate() resets on exit


def test_model_rows_equal_each_adapter_alone_and_merged(folders):
    """Row 0 under adapter a, row 1 under b, row 2 under none, in one forward pass."""
    ids = _ids(shape=(3, 20))
    served = _model()
    loras = MultiLoRA(served)
    assert (loras.add("a", folders[0]), loras.add("b", folders[1])) == (0, 1)
    slots = torch.tensor([0, 1, -1]).repeat_interleave(20)  # (B*T,) in the flattened (B, T) order
    with torch.no_grad():
        with loras.activate(slots):
            out = served(ids)
        base = _model()(ids)
        assert torch.equal(out[2], base[2])
        for row, folder in enumerate(folders):
            alone = _model()
            load_adapter(alone, folder)
            ref = alone(ids[row : row + 1])[0]
            merged = merge_lora(alone)(ids[row : row + 1])[0]
            assert max_diff(out[row], ref) <= TOL
            assert max_diff(out[row], merged) <= TOL
            assert max_diff(out[row], base[row]) > 1e-2
    assert not any(isinstance(m, LoraLinear) for m in served.modules())


def test_adapter_errors_are_user_errors_and_leave_the_model_untouched(folders, tmp_path):
    model = _model()
    loras = MultiLoRA(model)
    for bad in ("", "a:b", "-x", "a b", "é"):
        with pytest.raises(UserError, match="letters, digits"):
            loras.add(bad, folders[0])
    other = _adapter(tmp_path / "other", LoraConfig(r=2), seed=3)
    meta = json.loads((other / "adapter_config.json").read_text())
    meta["r"] = 3
    (other / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="has shape"):
        loras.add("other", other)
    head = _adapter(tmp_path / "head", LoraConfig(r=2, target_modules=("q_proj", "lm_head")), seed=4)
    with pytest.raises(UserError, match="lm_head"):
        loras.add("head", head)
    assert loras.names == [] and not any(isinstance(m, MultiLoRALinear) for m in model.modules())
    loras.add("a", folders[0])
    with pytest.raises(UserError, match="already loaded"):
        loras.add("a", folders[1])
    with pytest.raises(UserError, match="no LoRA adapter named 'zz'.*loaded: a"):
        loras.slot("zz")
    with pytest.raises(UserError, match="already has LoRA"):
        apply_lora(model, LoraConfig())


# ------------------------------------------------------------------------------------------- PEFT

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def test_matches_peft_mixed_adapter_batch(tmp_path):
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
    ).eval()
    hf.save_pretrained(tmp_path / "hf")
    ref = peft.get_peft_model(
        hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]), "one"
    )
    ref.add_adapter(
        "two", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["k_proj", "o_proj", "down_proj"])
    )
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    ref.save_pretrained(tmp_path / "adapters")  # one folder per adapter: adapters/one/, adapters/two/
    ref.eval()

    cfg = config_from_hf(json.loads((tmp_path / "hf" / "config.json").read_text()))
    from safetensors.torch import load_file

    ours = build_model(cfg, hf_to_lmforge(load_file(tmp_path / "hf" / "model.safetensors"), cfg))
    loras = MultiLoRA(ours)
    loras.add("one", tmp_path / "adapters" / "one")
    loras.add("two", tmp_path / "adapters" / "two")
    ids = _ids(7, (4, 16))
    names = ["two", "__base__", "one", "two"]
    with torch.no_grad():
        expected = ref(input_ids=ids, adapter_names=names).logits
        with loras.activate(torch.tensor([1, -1, 0, 1]).repeat_interleave(16)):
            out = ours(ids)
    assert max_diff(out, expected) <= 1e-4 * expected.abs().max().item()
    assert max_diff(expected[0], expected[1]) > 1e-3 and max_diff(expected[2], expected[1]) > 1e-3
