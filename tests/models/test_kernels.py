"""The fused C kernels (lmforge/models/kernels.py) against the PyTorch ops they replace, and the engine with and
without them on the default model."""

import logging
import platform
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.engine import EngineConfig, LLMEngine
from lmforge.engine.types import SamplingParams
from lmforge.models import kernels
from lmforge.models.gpt import build_model

BUILDABLE = platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= kernels._cpu_flags()
HAVE_CC = shutil.which("cc") or shutil.which("gcc")


@pytest.fixture(scope="module")
def lib():
    if not (BUILDABLE and HAVE_CC):
        pytest.skip(f"the kernels need x86-64 with AVX2 and FMA and a C compiler ({platform.machine()})")
    return kernels.lib()


def test_the_kernels_build_and_load_where_they_can(lib):
    # a machine with the CPU and the compiler must get them: None here would silently mean the slow path
    assert lib is not None


@pytest.mark.parametrize("rows,dim", [(1, 8), (16, 576), (37, 1024)])
def test_rms_norm_matches_pytorch(lib, rows, dim):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, dim, generator=g) * 3
    w = torch.randn(dim, generator=g)
    torch.testing.assert_close(
        kernels.rms_norm(x, w, 1e-5), F.rms_norm(x, (dim,), w, 1e-5), rtol=1e-5, atol=1e-5
    )


def test_silu_mul_matches_pytorch_including_extreme_values(lib):
    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(16, 2 * 1536, generator=g) * 6
    gate_up[0, :8] = torch.tensor([-200.0, -88.0, -30.0, -1e-6, 0.0, 1e-6, 30.0, 200.0])
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_mul(gate_up), F.silu(gate) * up, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("hd", [16, 64, 128])
def test_rope_in_place_matches_apply_rope(lib, hd):
    from lmforge.models.layers import apply_rope, rope_cos_sin

    g = torch.Generator().manual_seed(hd)
    n, heads = 13, 12
    qkv = torch.randn(n, heads + 3, hd, generator=g)  # rotate the first 12 heads of each row, leave the rest
    positions = torch.randint(0, 30_000, (n,), generator=g)
    inv_freq = 1.0 / (10_000 ** (torch.arange(0, hd, 2).float() / hd))
    cos, sin = rope_cos_sin(inv_freq, positions, torch.float32)
    expected, untouched = apply_rope(qkv[:, :heads], cos, sin), qkv[:, heads:].clone()
    out = kernels.rope_(qkv[:, :heads], cos, sin)
    assert out.data_ptr() == qkv.data_ptr()
    torch.testing.assert_close(qkv[:, :heads], expected, rtol=1e-6, atol=1e-5)
    assert torch.equal(qkv[:, heads:], untouched)


def reference_attention(q, k, v, k_dense, v_dense, order, last, first):
    """The same computation spelled out per row and kv head, on copies."""
    k_dense, v_dense = k_dense.clone(), v_dense.clone()
    nkv, hd = k_dense.shape[1], k_dense.shape[3]
    group = q.shape[1] // nkv
    out = {}
    for r, t in enumerate(order.tolist()):
        k_dense[r, :, last[r]], v_dense[r, :, last[r]] = k[t], v[t]
        lo, hi = int(first[r]), int(last[r]) + 1
        heads = []
        for h in range(nkv):
            qh = q[t, h * group : (h + 1) * group].double()
            att = torch.softmax(qh @ k_dense[r, h, lo:hi].double().T / hd**0.5, dim=-1)
            heads.append(att @ v_dense[r, h, lo:hi].double())
        out[t] = torch.cat(heads).float()
    return out, k_dense, v_dense


@pytest.mark.parametrize(
    "nkv,group,hd,window,q_scale",
    [
        (3, 3, 64, None, 1.0),
        (1, 4, 128, None, 1.0),
        (2, 1, 32, None, 1.0),
        (3, 3, 64, 9, 1.0),
        (2, 2, 72, None, 1.0),
        (3, 3, 64, None, 30.0),  # peaked scores: most softmax weights underflow to 0 (exp's clamp)
    ],
    ids=["smollm2", "mqa-128", "mha-32", "window", "hd-72", "peaked"],
)
def test_dense_decode_attention_matches_a_spelled_out_reference(lib, nkv, group, hd, window, q_scale):
    g = torch.Generator().manual_seed(hd + group)
    rows, cap, n_tokens = 7, 160, 11  # 7 decode rows among 11 flat-batch tokens (the others: prefill rows)
    nh = nkv * group
    qkv = torch.randn(n_tokens, nh + 2 * nkv, hd, generator=g)  # the fused product: q, k, v side by side
    qkv[:, :nh] *= q_scale
    q, k, v = qkv[:, :nh], qkv[:, nh : nh + nkv], qkv[:, nh + nkv :]
    k_dense = torch.randn(rows, nkv, cap, hd, generator=g)
    v_dense = torch.randn(rows, nkv, cap, hd, generator=g)
    order = torch.randperm(n_tokens, generator=g)[:rows]
    ctx = torch.tensor([1, 2, 8, 9, 63, 150, 160])  # 1 position, tails of every length mod 8, a full row
    last = ctx - 1
    first = torch.zeros_like(last) if window is None else (ctx - window).clamp(min=0)
    y = torch.full((n_tokens, nh, hd), 7.0)
    expected, k_ref, v_ref = reference_attention(q, k, v, k_dense, v_dense, order, last, first)
    kernels.dense_decode_attention(q, k, v, k_dense, v_dense, order, last, first, int(ctx.max()), y)
    for t in range(n_tokens):
        if t in expected:
            torch.testing.assert_close(y[t], expected[t], rtol=1e-5, atol=1e-5)
        else:
            assert (y[t] == 7.0).all()  # a prefill token's row is left to the prefill's attention
    assert torch.equal(k_dense, k_ref) and torch.equal(v_dense, v_ref)  # the new keys/values appended exactly


def test_dense_decode_attention_lets_a_nan_through(lib):
    """A NaN in a row's cached keys makes that row's output NaN, as in PyTorch: corruption is not hidden."""
    nkv, group, hd, cap = 1, 2, 16, 32
    q, k, v = (torch.randn(2, n, hd) for n in (group, nkv, nkv))
    k_dense, v_dense = torch.randn(2, nkv, cap, hd), torch.randn(2, nkv, cap, hd)
    k_dense[0, 0, 3, 5] = float("nan")
    order, last, first = torch.tensor([0, 1]), torch.tensor([9, 9]), torch.tensor([0, 0])
    y = torch.empty(2, group, hd)
    kernels.dense_decode_attention(q, k, v, k_dense, v_dense, order, last, first, 10, y)
    assert y[0].isnan().all() and y[1].isfinite().all()


def test_the_layers_use_the_kernels_only_where_they_apply(lib, monkeypatch):
    """Inside packed_weights(fused_kernels=True), with autograd off, on conforming tensors; else PyTorch's ops
    (the same values)."""
    from lmforge.models import layers

    calls = []
    real = kernels.rms_norm
    monkeypatch.setattr(kernels, "rms_norm", lambda *a: (calls.append(1), real(*a))[1])

    def uses_kernel(dim, x, fused=True, grad=False, packed=True):
        norm = layers.RMSNorm(dim, 1e-5)
        with torch.no_grad():
            norm.weight.normal_()
        calls.clear()
        with torch.set_grad_enabled(grad):
            if packed:
                with layers.packed_weights(fused_kernels=fused):
                    out = norm(x)
            else:
                out = norm(x)
        torch.testing.assert_close(out, F.rms_norm(x, (dim,), norm.weight, 1e-5), rtol=1e-5, atol=1e-5)
        return len(calls) == 1

    assert uses_kernel(64, torch.randn(5, 64))
    assert uses_kernel(64, torch.randn(64, 5).t().contiguous())
    assert not uses_kernel(64, torch.randn(64, 5).t())  # not contiguous
    assert not uses_kernel(60, torch.randn(5, 60))  # rows of 60 floats: not a multiple of 8
    assert not uses_kernel(64, torch.randn(5, 64), fused=False)  # packed_weights()'s default
    assert not uses_kernel(64, torch.randn(5, 64), packed=False)  # outside packed_weights()
    assert not uses_kernel(64, torch.randn(5, 64), grad=True)  # training: autograd needs the ops


def test_engine_with_and_without_the_kernels(lib, smollm2, monkeypatch):
    """The default model's 12 sequences, arriving a few steps apart and decoded together: the same greedy tokens,
    and log-probabilities within fp32 rounding of each other."""
    prompts = [
        smollm2.tokenizer.encode(f"Question {i}: what is {i} + {2 * i}? Answer briefly.") for i in range(12)
    ]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
    assert lib is not None
    calls = []
    real = kernels.dense_decode_attention
    monkeypatch.setattr(
        kernels, "dense_decode_attention", lambda *a: (calls.append(a[-1].shape[0]), real(*a))[1]
    )
    runs = []
    for fused in (True, False):
        model = build_model(smollm2.model.config, smollm2.model.state_dict())
        engine = LLMEngine(model, EngineConfig(kv_cache_mb=64, dense_decode_mb=64, fused_kernels=fused))
        assert engine.fused_kernels is fused
        got = {f"r{i}": [] for i in range(len(prompts))}
        step = 0
        while step < 3 * len(prompts) or engine.has_unfinished:
            if step % 3 == 0 and step // 3 < len(prompts):  # one arrives every third step: mixed steps
                engine.add_request(f"r{step // 3}", prompts[step // 3], params)
            for out in engine.step():
                got[out.request_id] += [(lp.token_id, lp.logprob) for lp in out.new_logprobs]
            step += 1
        runs.append(got)
        if fused:  # the dense kernel ran, in all-decode steps and beside prefills (y made by the caller)
            assert len(calls) > 24 * 30 and len(set(calls)) > 1
        else:
            assert not calls
        calls.clear()
    with_kernels, without = runs
    for rid in with_kernels:
        assert [t for t, _ in with_kernels[rid]] == [t for t, _ in without[rid]], rid
        for (_, a), (_, b) in zip(with_kernels[rid], without[rid], strict=True):
            assert a == pytest.approx(b, abs=1e-3)


def test_unavailable_kernels_mean_the_pytorch_ops(monkeypatch, tmp_path, caplog):
    """A compiler that fails (or none, or LMFORGE_KERNELS=0): lib() is None, said once in the log, and
    packed_weights() runs the PyTorch ops."""
    from lmforge.models import layers

    failing = tmp_path / "cc"
    failing.write_text(
        "#!/bin/sh\n[ \"$1\" = --version ] && echo fake-cc 1.0 && exit 0\necho 'no such luck' >&2\nexit 1\n"
    )
    failing.chmod(0o755)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setenv("CC", str(failing))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    if BUILDABLE:
        with caplog.at_level(logging.WARNING, logger="lmforge.models.kernels"):
            assert kernels.lib() is None
            assert kernels.lib() is None
        assert "failed: no such luck" in caplog.text
        assert len(caplog.records) == 1  # said once, not on every step
        assert not list(Path(tmp_path / "cache").rglob("*.so"))  # nothing half-built left behind
        assert not list(Path(tmp_path / "cache").rglob("*.tmp"))
    assert kernels.lib() is None
    with layers.packed_weights(fused_kernels=True):
        assert layers._runtime.kernels is False
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setenv("LMFORGE_KERNELS", "0")
    monkeypatch.delenv("CC")
    assert kernels.lib() is None
