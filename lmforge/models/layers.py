"""Leaf layers of the decoder: norms, rotary embeddings, attention, MLPs.

References: HF transformers `modeling_llama.py` / `modeling_gpt2.py` (numerics and weight names),
LitGPT `model.py` (one class for many families), vLLM (flattened-token attention over a paged cache).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models import kernels
from lmforge.models.config import ModelConfig
from lmforge.models.kv_cache import CacheBatch, SeqSlice

# Past this many rows (prefill chunks) MKL's sgemm is as fast as oneDNN's packed kernel or faster (SmolLM2, whole
# forward: 32 rows 121 -> 96 ms packed, 128 rows 281 -> 271 ms, 256 rows 531 -> 536 ms, 512 rows 1170 -> 1268 ms).
PACKED_MAX_ROWS = 128


class Linear(nn.Linear):
    """nn.Linear with two inference paths for the engine's few-row products on the CPU.

    - `pack()` keeps a oneDNN copy of the weight in its blocked layout (what PyTorch's inductor does for CPU
      linears), used inside `packed_weights()` while autograd is off. Skinny products are compute-bound here,
      not memory-bound (the 2-core dev machine streams 33 GB/s, but MKL's sgemm reaches ~9 GB/s of weights at 16
      rows), and oneDNN's packed kernel does 20-35% better: SmolLM2's 1536x576 projection x 30 layers at 16 rows
      9.9 ms instead of 13.8, at 1 row 5.3 instead of 8.2. It costs a second copy of the weights in memory, and
      its sums run in another order (logits differ by ~1e-4, fp32 rounding).
    - Unpacked, a handful of rows (batched decode: 2..64) run as W @ x^T, which MKL does faster than F.linear's
      transposed operands (the 49152x576 head at 16 rows: 14 ms instead of 21 ms).

    Whole engine decode steps of SmolLM2, packed with q/k/v and gate/up fused (bench/decode_step.py): 1.14x
    faster at 16 sequences, 1.27x at 1.
    """

    _packed: tuple[tuple, torch.Tensor] | None = None  # (_state of the weight packed from, the copy)

    def pack(self) -> bool:
        """Make (or refresh) the oneDNN copy of the weight; False where there is none to make (not fp32 on the
        CPU, or a PyTorch without oneDNN). The copy is dropped from use as soon as the weight changes."""
        if not self.pack_eligible():
            self._packed = None
            return False
        with torch.no_grad():
            # 16: the row count oneDNN picks its blocking for (a decode batch); any row count runs on it
            self._packed = (
                _state(self.weight),
                torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 16),
            )
        return True

    def pack_eligible(self) -> bool:
        w = self.weight
        cpu_fp32 = w.device.type == "cpu" and w.dtype == torch.float32 and not w.is_inference()
        return cpu_fp32 and torch.backends.mkldnn.is_available()

    def packed_current(self) -> bool:
        """There is a packed copy and it was made from the present weight."""
        # _parameters, not self.weight: nn.Module.__getattr__ costs more than the check (121 products a step)
        return self._packed is not None and _unchanged(self._packed[0], self._parameters.get("weight"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _packed_path(x) and self.packed_current():
            bias = self._parameters.get("bias")
            return torch.ops.mkldnn._linear_pointwise(x, self._packed[1], bias, "none", [], "")
        if x.dim() == 2 and 1 < x.shape[0] <= 64:
            y = (self.weight @ x.t()).t().contiguous()
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


def _state(t: torch.Tensor) -> tuple:
    """What identifies a tensor's present values: the object, its in-place version and its storage (`.data =`
    and `module.to()` swap storage without a version bump)."""
    return t, t._version, t.data_ptr()


def _unchanged(state: tuple, t: torch.Tensor | None) -> bool:
    return state[0] is t and state[1] == t._version and state[2] == t.data_ptr()


class Fused:
    """One packed product for the Linears that read the same input (q, k, v; gate, up): one oneDNN call with
    the weights side by side instead of one per Linear (SmolLM2 x 30 layers at 16 rows: q,k,v 8.0 -> 6.6 ms,
    gate,up 19.4 -> 18.1 ms; at 1 row 4.9 -> 3.2 and 9.1 -> 7.9 ms)."""

    def __init__(self, linears: Sequence[Linear]):
        self.linears = tuple(linears)
        self.sizes = [m.out_features for m in linears]
        # every parameter as it was when packed: the copy is stale once one is replaced or changed
        self.params = [(m, name, _state(p)) for m in linears for name, p in m.named_parameters(recurse=False)]
        with torch.no_grad():
            weight = torch.cat([m.weight for m in linears])
            self.bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)

    @staticmethod
    def refresh(fused: Fused | None, linears: Sequence[nn.Module], fuse: bool) -> Fused | None:
        """`fused` while it is current for `linears`, else a new Fused of them, or None where they cannot be
        fused (not all plain packable Linears, mixed biases) or `fuse` is False."""
        if fused is not None and fused.current(linears):
            return fused
        fusable = all(type(m) is Linear and m.pack_eligible() for m in linears)
        return Fused(linears) if fuse and fusable and len({m.bias is None for m in linears}) == 1 else None

    def current(self, linears: Sequence[nn.Module]) -> bool:
        """Made from these very modules (none swapped, e.g. for LoRA) and their present parameters."""
        # plain loops and _parameters: twice a layer every step, where generators and getattr cost ~9 us a call
        for a, b in zip(linears, self.linears, strict=True):
            if a is not b:
                return False
        for m, name, state in self.params:
            if not _unchanged(state, m._parameters.get(name)):
                return False
        return True

    def applies(self, x: torch.Tensor, linears: Sequence[nn.Module]) -> bool:
        """This product of `x` may use the fused copy."""
        return _packed_path(x) and self.current(linears)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """All the products, side by side in the last dimension."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: nn.Module, *, fuse: bool = True) -> int:
    """Pack `model` for the engine: q/k/v and gate/up as Fused products where they are plain Linears (unless
    `fuse` is False: a benchmark's baseline), every other Linear on its own (one packed copy per weight); what
    is packed already stays. How many Linears are packed, fused or alone."""
    fused: set[int] = set()
    for m in model.modules():
        if isinstance(m, (Attention, MLP)):
            fused |= {id(linear) for linear in m.pack_fused(fuse)}
    count = len(fused)
    for m in model.modules():
        if not isinstance(m, Linear):
            continue
        if id(m) in fused:
            m._packed = None  # served by its Fused copy: no second packed copy
        elif m.packed_current():
            count += 1
        else:
            count += m.pack()
    return count


def _packed_path(x: torch.Tensor) -> bool:
    """Whether a product of `x` runs on packed weights: inside packed_weights(), autograd off, few rows."""
    return _runtime.packed and x.numel() <= PACKED_MAX_ROWS * x.shape[-1] and not torch.is_grad_enabled()


class _Runtime(threading.local):
    packed = False
    kernels = False  # the fused C kernels (models/kernels.py) for norms, SwiGLU and dense decode attention


_runtime = _Runtime()


@contextmanager
def packed_weights(fused_kernels: bool = False) -> Iterator[None]:
    """Use the packed copies (on this thread, inside the block), and with `fused_kernels` the C kernels where
    they load (fp32 CPU models only: the caller says so): the engine's steps and generate() run in one.
    Everywhere else a packed model computes exactly as an unpacked one (the same weights, the same logits)."""
    before = _runtime.packed, _runtime.kernels
    _runtime.packed, _runtime.kernels = True, fused_kernels and kernels.lib() is not None
    try:
        yield
    finally:
        _runtime.packed, _runtime.kernels = before


def _use_kernels() -> bool:
    """The fused C kernels apply: inside packed_weights(fused_kernels=True) where they load, and with autograd off
    (they write outputs that autograd cannot see). Each layer then checks only its tensors' shapes."""
    return _runtime.kernels and not torch.is_grad_enabled()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op; same values as the spelled-out form below
            if _use_kernels() and kernels.fits_rows(x, self.weight):
                return kernels.rms_norm(x, self.weight, self.eps)  # one pass instead of six ops
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in fp32 whatever the model dtype, as Llama does.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.norm_bias)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) in fp32, with linear or Llama-3.1 scaling applied."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if cfg.rope_type == "linear":
        inv_freq = inv_freq / cfg.rope_factor
    elif cfg.rope_type == "llama3":
        factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old_len = cfg.rope_original_max_seq_len
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (*positions.shape, 1, head_dim), ready to broadcast over heads; sin's first half is
    negated, so that apply_rope rotates by swapping halves (one op fewer per layer than negating them)."""
    freqs = positions.float()[..., None] * inv_freq  # (..., hd/2)
    cos, sin = freqs.cos(), freqs.sin()
    cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
    return cos[..., None, :].to(dtype), sin[..., None, :].to(dtype)  # (..., 1, hd)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., n_heads, head_dim) in HF's half-split convention (not interleaved pairs):
    x * cos + cat(-x2, x1) * sin, with the sign carried by rope_cos_sin's sin."""
    half = x.shape[-1] // 2
    return torch.addcmul(x * cos, torch.cat((x[..., half:], x[..., :half]), dim=-1), sin)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.use_rope = cfg.pos_embedding == "rope"
        self.sliding_window = cfg.sliding_window
        self.dropout = cfg.dropout
        self.q_proj = Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.attn_out_bias)
        self._qkv: Fused | None = None

    def pack_fused(self, fuse: bool = True) -> tuple[Linear, ...]:
        """Make (or drop) the Fused q/k/v copy; the Linears it serves."""
        self._qkv = Fused.refresh(self._qkv, (self.q_proj, self.k_proj, self.v_proj), fuse)
        return () if self._qkv is None else self._qkv.linears

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        batch: CacheBatch | None = None,
    ) -> torch.Tensor:
        """x is (B, T, C) without a cache, or (N, C) — the flat new tokens of a CacheBatch — with one."""
        lead = x.shape[:-1]
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        if self._qkv is not None and self._qkv.applies(x, (self.q_proj, self.k_proj, self.v_proj)):
            qkv = self._qkv(x).view(*lead, nh + 2 * nkv, hs)
            qk, v = qkv[..., : nh + nkv, :], qkv[..., nh + nkv :, :]
            if rope is not None and _use_kernels() and x.dim() == 2 and hs % 16 == 0:
                qk = kernels.rope_(qk, *rope)  # in place: qkv is this step's own product
            elif rope is not None:  # q and k side by side: one rotation
                qk = apply_rope(qk, *rope)
            q, k = qk[..., :nh, :], qk[..., nh:, :]
        else:
            q = self.q_proj(x).view(*lead, nh, hs)
            k = self.k_proj(x).view(*lead, nkv, hs)
            v = self.v_proj(x).view(*lead, nkv, hs)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is None:
            y = self._attend_causal(q, k, v)  # (B, T, nh, hs)
        else:
            y = self._attend_cached(q, k, v, cache, batch)  # (N, nh, hs)
        return self.o_proj(y.reshape(*lead, self.n_head * self.head_dim))

    def _attend_causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs)
        T = q.shape[2]
        mask = None
        if self.sliding_window is not None and T > self.sliding_window:
            i = torch.arange(T, device=q.device)
            mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < self.sliding_window)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )
        return y.transpose(1, 2)  # (B, T, nh, hs)

    def _attend_cached(self, q, k, v, cache, batch: CacheBatch) -> torch.Tensor:
        k_cache, v_cache, *dense = cache  # (nkv, slots, hs) each, then the dense copies if batch.dense
        k_cache.index_copy_(1, batch.slot_mapping, k.transpose(0, 1))
        v_cache.index_copy_(1, batch.slot_mapping, v.transpose(0, 1))
        if not batch.prefills and batch.decode_single is None and batch.decode_rows is not None:
            if dense:
                return self._attend_dense(q, k, v, *dense, batch)
            return self._attend_decodes(q, k_cache, v_cache, batch)  # every row a decode: no scatter into y
        y = torch.empty_like(q)  # (N, nh, hs)
        for seq in batch.prefills:
            y[seq.start : seq.end] = self._attend_seq(q[seq.start : seq.end], k_cache, v_cache, seq)
        if batch.decode_single is not None:
            seq = batch.decode_single
            y[seq.start] = self._attend_seq(q[seq.start : seq.end], k_cache, v_cache, seq)[0]
        elif dense:
            y = self._attend_dense(q, k, v, *dense, batch, y)
        elif batch.decode_rows is not None:
            y[batch.decode_rows] = self._attend_decodes(q[batch.decode_rows], k_cache, v_cache, batch)
        return y

    def _check_window(self, batch: CacheBatch) -> None:
        if batch.sliding_window != self.sliding_window:  # the decodes' padding mask is the window's
            raise ValueError(
                f"a CacheBatch built for sliding window {batch.sliding_window} attends a layer "
                f"with sliding window {self.sliding_window}"
            )

    def _attend_decodes(self, q: torch.Tensor, k_cache, v_cache, batch: CacheBatch) -> torch.Tensor:
        """The decode sequences' queries (Bd, nh, hs), one each, against their padded contexts at once."""
        nkv, g, hs = self.n_kv_head, self.n_head // self.n_kv_head, self.head_dim
        self._check_window(batch)
        # Spelled out in the cache's own (nkv, Bd, ...) order: the gathered keys stay contiguous (SDPA would
        # want (Bd, nkv, ...) and copy them again), and grouped query heads ride in the query axis.
        qd = q.view(-1, nkv, g, hs).transpose(0, 1).reshape(-1, g, hs)  # (nkv * Bd, g, hs)
        # index_select on the flat slots: 2-3x faster than advanced indexing with the (Bd, L) index
        slots, shape = batch.decode_slots.view(-1), (-1, batch.decode_slots.shape[1], hs)
        kd = k_cache.index_select(1, slots).view(shape)  # (nkv * Bd, L, hs)
        vd = v_cache.index_select(1, slots).view(shape)
        # scale and padding mask inside the product: one op instead of bmm, mul and masked_fill
        att = torch.baddbmm(batch.decode_bias_for(nkv, g, q.dtype), qd, kd.transpose(1, 2), alpha=hs**-0.5)
        att = att.softmax(-1)
        return torch.bmm(att, vd).view(nkv, -1, g, hs).transpose(0, 1).reshape(-1, self.n_head, hs)

    def _attend_dense(self, q, k, v, k_dense, v_dense, batch: CacheBatch, y=None) -> torch.Tensor:
        """The decode tokens' attention on the dense copy of their contexts (`kv_cache.DenseDecode`): their new
        k/v appended to it, then the rows 0..Bd-1 read as a view, (Bd * nkv, L, hs). The decode tokens' outputs
        go into `y` (N, nh, hs) at their flat-batch rows; a new tensor when y is None (every row a decode)."""
        plan, hs = batch.dense, self.head_dim
        nkv, g = self.n_kv_head, self.n_head // self.n_kv_head
        self._check_window(batch)
        if (
            _use_kernels()
            and kernels.fits(q, k, v, k_dense, v_dense)
            and q.stride(1) == k.stride(1) == v.stride(1) == hs
            and (y is None or y.is_contiguous())
        ):
            if y is None:  # every row a decode; else _attend_cached's y (N, nh, hs), contiguous
                y = q.new_empty(q.shape)
            return kernels.dense_decode_attention(
                q, k, v, k_dense, v_dense, plan.order, plan.last, plan.first, plan.length, y
            )
        for new, dense in ((k, k_dense), (v, v_dense)):
            dense.view(-1, hs).index_copy_(0, plan.append, new.index_select(0, plan.order).view(-1, hs))
        bd, length, capacity = plan.order.numel(), plan.length, k_dense.shape[2]
        kd = k_dense[:bd].view(bd * nkv, capacity, hs)[:, :length]
        vd = v_dense[:bd].view(bd * nkv, capacity, hs)[:, :length]
        qd = q.index_select(0, plan.order).view(bd * nkv, g, hs)  # query heads grouped by their kv head
        att = torch.baddbmm(plan.bias_for(nkv, g, q.dtype), qd, kd.transpose(1, 2), alpha=hs**-0.5)
        out = torch.bmm(att.softmax(-1), vd).view(bd, self.n_head, hs)
        if y is None:
            y = torch.empty_like(q)
        return y.index_copy_(0, plan.order, out)

    def _attend_seq(self, q: torch.Tensor, k_cache, v_cache, seq: SeqSlice) -> torch.Tensor:
        """One sequence's t new queries (t, nh, hs) against its ctx_len cached keys."""
        t, ctx = q.shape[0], seq.ctx_len
        lo = 0
        if self.sliding_window is not None and t == 1 and ctx > self.sliding_window:
            lo = ctx - self.sliding_window
        if seq.contiguous:
            first = int(seq.slots[0])
            k = k_cache[:, first + lo : first + ctx]  # (nkv, L, hs) view, no copy
            v = v_cache[:, first + lo : first + ctx]
        else:
            k, v = k_cache.index_select(1, seq.slots[lo:]), v_cache.index_select(1, seq.slots[lo:])
        g = self.n_head // self.n_kv_head
        if t == 1:
            # Query heads grouped by their kv head: (nkv, g, hs) against (nkv, L, hs). Spelled out because
            # SDPA's CPU math path spends more on its checks than on the arithmetic of one query.
            qg = q.view(self.n_kv_head, g, self.head_dim)
            att = torch.softmax((qg @ k.transpose(1, 2)) * self.head_dim**-0.5, dim=-1)  # (nkv, g, L)
            return (att @ v).reshape(1, self.n_head, self.head_dim)
        # The g query heads of each kv head in SDPA's batch axis, (g, nkv, t, hs), against the kv heads broadcast
        # over it (a stride-0 expand): SDPA's CPU flash kernel does not take enable_gqa (its math path is 2x
        # slower), and this spares the repeat_interleave copies of the keys and values that it would need (the
        # attention 1.05-2.1x faster with a cached prefix, bench/RESULTS.md).
        qg = q.view(t, self.n_kv_head, g, self.head_dim).permute(2, 1, 0, 3)
        k, v = k.expand(g, -1, -1, -1), v.expand(g, -1, -1, -1)
        # Elsewhere copied, as repeat_interleave did: the broadcast was measured on the CPU only, and CUDA's
        # memory-efficient kernel has mishandled masked bf16 attention on stride-0 k/v (pytorch#191937).
        if q.device.type != "cpu":
            k, v = k.contiguous(), v.contiguous()
        mask = seq.mask(self.sliding_window, q.dtype)  # None: no cached prefix, the plain causal kernel
        y = F.scaled_dot_product_attention(
            qg, k, v, attn_mask=mask, is_causal=mask is None
        )  # (g, nkv, t, hs)
        return y.permute(2, 1, 0, 3).reshape(t, self.n_head, self.head_dim)


def _activation(name: str):
    if name == "silu":
        return F.silu
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    return lambda x: F.gelu(x, approximate="tanh")  # gelu_new / gelu_pytorch_tanh


class MLP(nn.Module):
    """SwiGLU (Llama: down(act(gate(x)) * up(x))) or the plain two-layer GELU MLP (GPT-2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp == "swiglu"
        if self.gated:
            self.gate_proj = Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.n_embd, bias=cfg.mlp_bias)
        self.act = _activation(cfg.activation)
        self._gate_up: Fused | None = None

    def pack_fused(self, fuse: bool = True) -> tuple[Linear, ...]:
        """Make (or drop) the Fused gate/up copy; the Linears it serves."""
        if not self.gated:
            return ()
        self._gate_up = Fused.refresh(self._gate_up, (self.gate_proj, self.up_proj), fuse)
        return () if self._gate_up is None else self._gate_up.linears

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return self.down_proj(self.act(self.up_proj(x)))
        if self._gate_up is not None and self._gate_up.applies(x, (self.gate_proj, self.up_proj)):
            gate_up = self._gate_up(x)
            if (
                _use_kernels()
                and self.act is F.silu
                and gate_up.shape[-1] % 16 == 0
                and gate_up.is_contiguous()
            ):
                return self.down_proj(kernels.silu_mul(gate_up))
            gate, up = gate_up.chunk(2, dim=-1)
            return self.down_proj(self.act(gate).mul_(up))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, cache=None, batch=None) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), rope, cache, batch)
        x = x + (self.resid_dropout(h) if self.training else h)  # eval: no module call (60 a decode step)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (self.resid_dropout(h) if self.training else h)
