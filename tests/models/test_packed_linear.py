"""layers.Linear's oneDNN-packed inference path and the Fused q/k/v and gate/up products: the same results as
F.linear up to fp32 rounding, used only inside packed_weights() with autograd off, and never once a weight has
changed since packing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.models.config import ModelConfig
from lmforge.models.gpt import build_model
from lmforge.models.layers import PACKED_MAX_ROWS, Linear, pack_linears, packed_weights

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN"
)


def linear(bias: bool) -> Linear:
    torch.manual_seed(0)
    layer = Linear(576, 1536, bias=bias)
    assert layer.pack()
    return layer


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 576), (16, 576), (PACKED_MAX_ROWS, 576), (2, 7, 576)])
def test_packed_products_equal_f_linear_to_fp32_rounding(bias, shape):
    layer = linear(bias)
    x = torch.randn(shape)
    ref = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    with torch.inference_mode(), packed_weights():
        y = layer(x)
    assert y.shape == (*shape[:-1], 1536) and y.dtype == torch.float32
    # |y| ~ 10 here; fp32 sums of 576 products are good to ~1e-5 relative
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)


def test_outside_the_block_a_packed_layer_computes_exactly_as_before():
    layer = linear(bias=True)
    x = torch.randn(16, 576)
    unpacked = Linear(576, 1536, bias=True)
    unpacked.load_state_dict(layer.state_dict())
    with torch.inference_mode():
        assert torch.equal(layer(x), unpacked(x))  # the W @ x^T path, bit for bit
        with packed_weights():
            packed = layer(x)
        assert torch.equal(layer(x), unpacked(x))  # the block restored the flag
    assert not torch.equal(packed, unpacked(x).detach())  # so the test sees the packed path at all


def test_a_changed_weight_is_never_served_from_a_stale_copy():
    layer = linear(bias=False)
    x = torch.randn(4, 576)
    with torch.no_grad():
        layer.weight.mul_(2)  # in place: the version counter moves
    with torch.inference_mode(), packed_weights():
        assert torch.equal(layer(x), (layer.weight @ x.t()).t())
    layer.weight = torch.nn.Parameter(torch.randn(1536, 576))  # replaced: a different tensor
    with torch.inference_mode(), packed_weights():
        assert torch.equal(layer(x), (layer.weight @ x.t()).t())
    assert pack_linears(layer) == 1
    layer.weight.data = torch.randn(1536, 576)  # new storage, no version bump (what module.to() does)
    with torch.inference_mode(), packed_weights():
        assert torch.equal(layer(x), (layer.weight @ x.t()).t())
    assert pack_linears(layer) == 1  # repacked from the new weight, which is now used
    with torch.inference_mode(), packed_weights():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-4)


def test_autograd_and_big_batches_take_the_dense_path():
    layer = linear(bias=False)
    x = torch.randn(PACKED_MAX_ROWS + 1, 576)
    with torch.inference_mode(), packed_weights():
        assert torch.equal(layer(x), F.linear(x, layer.weight))
    with packed_weights():
        y = layer(x[:4].requires_grad_())
        y.sum().backward()
    torch.testing.assert_close(layer.weight.grad, x[:4].sum(0).expand(1536, 576))


def test_only_cpu_fp32_weights_are_packed():
    assert not Linear(8, 8).to(torch.bfloat16).pack()
    assert Linear(8, 8).pack()


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_a_packed_model_matches_the_unpacked_one_and_fuses_its_projections(qkv_bias):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=128, max_seq_len=64,
        qkv_bias=qkv_bias,
    )  # fmt: skip
    model = build_model(cfg)
    ids = torch.randint(0, 97, (3, 11))
    with torch.inference_mode():
        ref = model(ids)
    # q, k, v, gate, up fused per layer; o, down and the head alone (tied: the head is the embedding)
    assert pack_linears(model) == 7 * cfg.n_layer + 1
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert attn._qkv is not None and mlp._gate_up is not None and attn.q_proj._packed is None
    assert attn.o_proj._packed is not None
    with torch.inference_mode(), packed_weights():
        torch.testing.assert_close(model(ids), ref, rtol=1e-5, atol=1e-5)
        assert attn._qkv.applies(torch.zeros(4, 64), (attn.q_proj, attn.k_proj, attn.v_proj))
    # a weight changed after packing: that layer's fused copy is not used, the result follows the new weight
    with torch.no_grad():
        attn.k_proj.weight.mul_(-1)
        ref = model(ids)
    with torch.inference_mode(), packed_weights():
        assert not attn._qkv.applies(torch.zeros(4, 64), (attn.q_proj, attn.k_proj, attn.v_proj))
        torch.testing.assert_close(model(ids), ref, rtol=1e-5, atol=1e-5)
    assert pack_linears(model) == 7 * cfg.n_layer + 1  # refreshed
    with torch.inference_mode(), packed_weights():
        assert attn._qkv.applies(torch.zeros(4, 64), (attn.q_proj, attn.k_proj, attn.v_proj))
        torch.testing.assert_close(model(ids), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", ["module", "parameter", "storage", "bias"])
def test_a_fused_copy_is_not_used_once_a_projection_or_its_parameters_are_replaced(change):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=97, n_layer=1, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=128, qkv_bias=True
    )
    model = build_model(cfg)
    pack_linears(model)
    attn, ids = model.layers[0].self_attn, torch.randint(0, 97, (2, 9))
    projections = lambda: (attn.q_proj, attn.k_proj, attn.v_proj)  # noqa: E731 - read after the change
    with torch.inference_mode(), packed_weights():
        assert attn._qkv.applies(torch.zeros(4, 64), projections())
    with torch.no_grad():
        if change == "module":  # what wrapping a projection (LoRA) does
            attn.v_proj = Linear(64, attn.v_proj.out_features, bias=True)
        elif change == "parameter":
            attn.v_proj.weight = torch.nn.Parameter(torch.randn_like(attn.v_proj.weight))
        elif change == "storage":  # no version bump: what module.to() does
            attn.v_proj.weight.data = torch.randn_like(attn.v_proj.weight)
        else:
            attn.v_proj.bias = torch.nn.Parameter(torch.randn_like(attn.v_proj.bias))
        ref = model(ids)
    with torch.inference_mode(), packed_weights():
        assert not attn._qkv.applies(torch.zeros(4, 64), projections())
        torch.testing.assert_close(model(ids), ref, rtol=1e-5, atol=1e-5)
