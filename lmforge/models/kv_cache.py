"""Paged KV cache storage and the per-step attention metadata the model reads it with.

Storage: per layer one key and one value tensor of shape (n_kv_head, num_slots, head_dim), where
num_slots = num_blocks * block_size. A sequence owns a list of blocks (its block table); token t of the
sequence lives in slot `block_table[t // block_size] * block_size + t % block_size`. Who owns which
block (allocation, prefix sharing, eviction) is the engine's business; the model only sees slot indices.

One forward pass carries the new tokens of many sequences flattened into one (N,) batch, vLLM-style, so
prefill, chunked prefill and decode share one code path. `CacheBatch` describes that batch: where each
new token's k/v is written and, per sequence, which slots to attend to. Decode sequences (one new
token) are attended to together in one padded attention; prefill chunks one by one.

`DenseDecode` keeps a dense copy of the decode sequences' contexts beside the paged storage, one row per
sequence, so that the batched decode attention reads a view of it instead of gathering every context from
its slots again at every layer of every step (the paged cache stays the source of truth: a row is copied in
when its sequence starts decoding, then each step appends one token to it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmforge.models.config import ModelConfig


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int = 16,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.config = config
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (config.n_kv_head, num_blocks * block_size, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(config.n_layer)]

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * config.n_layer * config.n_kv_head * config.head_dim * itemsize

    @classmethod
    def from_budget(
        cls,
        config: ModelConfig,
        budget_bytes: int,
        block_size: int = 16,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        num_blocks = budget_bytes // (cls.bytes_per_token(config, dtype) * block_size)
        if num_blocks < 1:
            raise ValueError(f"a KV-cache budget of {budget_bytes} bytes holds not even one block")
        return cls(config, num_blocks, block_size, dtype=dtype, device=device)

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def layer(self, i: int, batch: CacheBatch) -> tuple[torch.Tensor, ...]:
        """What layer i attends with: its key and value storage, then the dense copies when `batch` uses them."""
        if batch.dense is None:
            return self.k[i], self.v[i]
        return self.k[i], self.v[i], batch.dense.k[i], batch.dense.v[i]


@dataclass
class SeqSlice:
    """One sequence's part of a batch: new tokens [start, end) of the flat batch, attending to `ctx_len` slots."""

    start: int
    end: int
    ctx_len: int  # cached tokens before this step + new tokens
    slots: torch.Tensor  # (ctx_len,) long: cache slot of every context token, in order
    contiguous: bool  # slots are a consecutive range: attend through a view, no gather
    _masks: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor | None:
        """The new tokens' additive attention mask (t, ctx_len), 0 or -inf: causal, and within `window` of each
        query; None where plain causal attention is the same (no cached prefix, and no window narrower than the
        context). Made once a step and shared by every layer with that window."""
        t, ctx = self.end - self.start, self.ctx_len
        if t == ctx and (window is None or ctx <= window):
            return None
        key = (window, dtype)
        if key not in self._masks:
            qpos = torch.arange(ctx - t, ctx, device=self.slots.device)[:, None]
            kpos = torch.arange(ctx, device=self.slots.device)[None, :]
            hidden = kpos > qpos
            if window is not None:
                hidden |= qpos - kpos >= window
            mask = torch.zeros(t, ctx, dtype=dtype, device=self.slots.device)
            self._masks[key] = mask.masked_fill_(hidden, float("-inf"))
        return self._masks[key]


@dataclass
class CacheBatch:
    slot_mapping: torch.Tensor  # (N,) long: the cache slot each new token's k/v is written to
    # sequences with > 1 new token, attended one by one
    prefills: list[SeqSlice] = field(default_factory=list)
    decode_rows: torch.Tensor | None = None  # (Bd,) long: positions in the flat batch of the decode tokens
    decode_slots: torch.Tensor | None = None  # (Bd, Lmax) long: padded context slots of each decode sequence
    # (Bd, 1, Lmax) float32: -inf where a slot is padding (or out of window); batch order (DensePlan.bias: rows')
    decode_bias: torch.Tensor | None = None
    decode_single: SeqSlice | None = None  # the lone decode sequence when Bd == 1 (no padding, maybe a view)
    decode_index: list[int] = field(default_factory=list)  # which of build()'s sequences decode, in order
    decode_ctx: list[int] = field(default_factory=list)  # context length of each decode sequence
    dense: DensePlan | None = None  # set by DenseDecode.plan: the decodes attend the dense copy
    sliding_window: int | None = None
    _bias_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def build(
        cls,
        block_tables: list[list[int]],
        num_cached: list[int],
        num_new: list[int],
        block_size: int,
        device: torch.device | str = "cpu",
        sliding_window: int | None = None,
    ) -> CacheBatch:
        """Metadata for one step: sequence i has num_cached[i] tokens in the cache and num_new[i] new ones,
        laid out in the flat batch in the order given."""
        device = torch.device(device)
        # decodes: (table, ctx_len, row) of the one-token sequences
        slot_parts, prefills, decodes = [], [], []
        start = 0
        decode_index = []
        for i, (table, cached, new) in enumerate(zip(block_tables, num_cached, num_new, strict=True)):
            ctx = cached + new
            if len(table) * block_size < ctx:
                raise ValueError(f"block table of {len(table)} blocks cannot hold {ctx} tokens")
            if new == 1:  # the new token's slot only; the context's slots are built for all decodes at once
                slot_parts.append([table[(ctx - 1) // block_size] * block_size + (ctx - 1) % block_size])
                decodes.append((table, ctx, start))
                decode_index.append(i)
            else:
                seq = _seq_slice(table, ctx, start, new, block_size, device)
                slot_parts.append(seq.slots[cached:].tolist())
                prefills.append(seq)
            start += new
        batch = cls(
            slot_mapping=torch.tensor(
                [s for part in slot_parts for s in part], dtype=torch.long, device=device
            ),
            prefills=prefills,
            decode_index=decode_index,
            sliding_window=sliding_window,
        )
        if len(decodes) == 1:
            table, ctx, row = decodes[0]
            batch.decode_single = _seq_slice(table, ctx, row, 1, block_size, device)
            batch.decode_rows = torch.tensor([row], dtype=torch.long, device=device)
        elif decodes:
            # (Bd, Lmax) context slots, one tensor op each for all sequences: a Python loop of small tensor ops
            # per sequence cost ~1 ms a step at 16 sequences. Padding reads block 0 (any slot: it is masked).
            lmax = max(ctx for _, ctx, _ in decodes)
            n_blocks = -(-lmax // block_size)
            tables = torch.tensor([(t + [0] * n_blocks)[:n_blocks] for t, _, _ in decodes], dtype=torch.long)
            pos = torch.arange(lmax)
            slots = tables[:, pos // block_size] * block_size + pos % block_size
            ctx = torch.tensor([ctx for _, ctx, _ in decodes])[:, None]
            inside = pos < ctx
            if sliding_window is not None:
                inside &= pos >= ctx - sliding_window
            bias = torch.zeros(inside.shape).masked_fill_(~inside, float("-inf"))
            batch.decode_rows = torch.tensor([row for _, _, row in decodes], dtype=torch.long, device=device)
            batch.decode_ctx = [c for _, c, _ in decodes]
            batch.decode_slots = slots.to(device)
            batch.decode_bias = bias[:, None, :].to(device)
        return batch

    def decode_bias_for(self, n_kv_head: int, group: int, dtype: torch.dtype) -> torch.Tensor:
        """decode_bias laid out as the decode attention's scores, (n_kv_head * Bd, group, Lmax), in the
        model's dtype: made on the first layer's call, the same for every layer of the step."""
        return _scores_bias(self._bias_cache, self.decode_bias, n_kv_head, group, dtype, kv_first=True)

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.numel()


def _seq_slice(table: list[int], ctx: int, start: int, new: int, block_size: int, device) -> SeqSlice:
    blocks = torch.tensor(table, dtype=torch.long)
    pos = torch.arange(ctx, dtype=torch.long)
    slots = blocks[pos // block_size] * block_size + pos % block_size
    n_blocks = -(-ctx // block_size)
    contiguous = table[:n_blocks] == list(range(table[0], table[0] + n_blocks)) if ctx else True
    return SeqSlice(start, start + new, ctx, slots.to(device), contiguous)


def _scores_bias(
    made: dict, bias: torch.Tensor, n_kv_head: int, group: int, dtype: torch.dtype, *, kv_first: bool
) -> torch.Tensor:
    """A (Bd, 1, L) padding bias laid out as decode attention scores, (n_kv_head * Bd or Bd * n_kv_head, group,
    L) in `dtype`; made once per step and layout (`made` caches it), the same for every layer."""
    key = (n_kv_head, group, dtype, kv_first)
    if key not in made:
        bd, _, length = bias.shape
        expanded = (bias[None] if kv_first else bias[:, None]).expand(
            *((n_kv_head, bd) if kv_first else (bd, n_kv_head)), group, length
        )
        made[key] = expanded.reshape(-1, group, length).to(dtype)
    return made[key]


@dataclass
class DensePlan:
    """One step's use of the dense copy (`DenseDecode.plan`): the decode sequence in row r of the copy (rows
    0..Bd-1) is token `order[r]` of the flat batch."""

    k: list[torch.Tensor]  # per layer (rows, n_kv_head, capacity, head_dim)
    v: list[torch.Tensor]
    order: torch.Tensor  # (Bd,) long
    # (Bd * n_kv_head,) long: where each row's new key (value) goes in the copy viewed as (-1, head_dim)
    append: torch.Tensor
    length: int  # context positions attended: the longest decode context
    bias: torch.Tensor  # (Bd, 1, length): the batch's decode_bias in row order
    last: torch.Tensor  # (Bd,) long: each row's new position (its context length - 1)
    first: torch.Tensor  # (Bd,) long: each row's first attended position (0, or the sliding window's start)
    _bias_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def bias_for(self, n_kv_head: int, group: int, dtype: torch.dtype) -> torch.Tensor:
        """The bias laid out as the dense decode attention's scores, (Bd * n_kv_head, group, length): made on
        the first layer's call, the same for every layer of the step."""
        return _scores_bias(self._bias_cache, self.bias, n_kv_head, group, dtype, kv_first=False)


class DenseDecode:
    """The decode sequences' contexts copied out of the paged storage into one dense tensor per layer,
    (rows, n_kv_head, capacity, head_dim): the rows 0..Bd-1 of a step, sliced to the longest context, are a
    strided view that the score and value products read directly.

    The engine calls `plan` every step with its decode sequences, each under a key unique to its request (not
    its id, which a later request may reuse). A sequence keeps its row while it decodes step after step (the
    layers append its new token). One that joins, moves into the row a finished one left, or whose context did
    not grow by exactly one token since its last step (recomputed), is copied in from the paged storage. A step
    that does not decode two or more sequences, or that failed, forgets the rows.

    Memory: one flat buffer per layer (zeroed once: padding is masked by -inf scores, but a NaN there would
    still spread), viewed as (rows, capacity) for the batch at hand: rows in eights (at most max_rows), and
    positions grown by half again in multiples of 64. It grows as batches need, up to `limit_bytes`, and is
    kept: a batch that does not fit attends by gathering, without freeing anything, and a later one that fits
    uses it again. A new layout re-views the buffer and copies every row in again (one gather's work)."""

    def __init__(self, cache: KVCache, limit_bytes: int, max_rows: int | None = None) -> None:
        self.cache, self.limit_bytes, self.max_rows = cache, limit_bytes, max_rows
        self._flat: list[torch.Tensor] = []  # 2 * n_layer buffers: the layers' keys, then their values
        self.k: list[torch.Tensor] = []  # per layer, views of the buffers
        self.v: list[torch.Tensor] = []
        self.rows: dict[object, int] = {}  # sequence key -> its row
        self._filled: dict[object, int] = {}  # sequence key -> context positions its row holds after the step

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, capacity in positions) of the current layout; (0, 0) when none."""
        return (self.k[0].shape[0], self.k[0].shape[2]) if self.k else (0, 0)

    @property
    def nbytes(self) -> int:
        """Memory held (the buffers, whatever the layout)."""
        return sum(t.numel() * t.element_size() for t in self._flat)

    def clear(self) -> None:
        """Forget what the rows hold."""
        self.rows, self._filled = {}, {}

    def plan(self, keys: list[object], batch: CacheBatch) -> None:
        """Set up `batch` to attend the copy, `keys` naming its decode sequences in the batch's order: lay the
        copy out for them, copy in the ones without a row, and set `batch.dense`. Leaves the batch to gather
        when it has fewer than two decodes or its copy would not fit the limit."""
        if (
            self.limit_bytes <= 0
            or batch.decode_slots is None
            or not self._make_room(len(keys), max(batch.decode_ctx))
        ):
            self.clear()
            return
        ctx, bd = batch.decode_ctx, len(keys)
        rows = self._kept(keys, ctx)
        free = iter(sorted(set(range(bd)) - set(rows.values())))
        fill_rows, fill_seqs = [], []
        for j, key in enumerate(keys):
            if key not in rows:
                rows[key] = next(free)
                fill_rows.append(rows[key])
                fill_seqs.append(j)
        self.rows = rows
        self._filled = {key: ctx[j] for j, key in enumerate(keys)}
        if fill_rows:
            self._copy_in(fill_rows, batch.decode_slots[fill_seqs])
        by_row = [0] * bd
        for j, key in enumerate(keys):
            by_row[rows[key]] = j
        index = torch.tensor(by_row, dtype=torch.long)
        capacity, nkv = self.shape[1], self.cache.config.n_kv_head
        last = torch.tensor(ctx, dtype=torch.long)[index] - 1  # each row's new position
        append = (torch.arange(bd)[:, None] * nkv + torch.arange(nkv)) * capacity + last[:, None]
        window = batch.sliding_window
        first = torch.zeros_like(last) if window is None else (last + 1 - window).clamp(min=0)
        index, device = index.to(self.cache.device), self.cache.device
        batch.dense = DensePlan(
            self.k,
            self.v,
            order=batch.decode_rows[index],
            append=append.view(-1).to(device),
            length=max(ctx),
            bias=batch.decode_bias[index],
            last=last.to(device),
            first=first.to(device),
        )

    def _kept(self, keys: list[object], ctx: list[int]) -> dict[object, int]:
        """The rows that stay where they are: sequences decoding again whose row holds their context up to
        this step's token, in a row below the batch size."""
        kept = {}
        for j, key in enumerate(keys):
            r = self.rows.get(key)
            if r is not None and r < len(keys) and self._filled[key] == ctx[j] - 1:
                kept[key] = r
        return kept

    def _make_room(self, rows: int, tokens: int) -> bool:
        """Lay the copy out for `rows` rows of `tokens` positions, growing its buffers if needed; False when
        that is over the limit (the buffers stay as they are)."""
        have_rows, have_tokens = self.shape
        if rows <= have_rows and tokens <= have_tokens:
            return True
        fit = self.limit_bytes // KVCache.bytes_per_token(
            self.cache.config, self.cache.dtype
        )  # row-positions
        want_rows = -(-rows // 8) * 8
        if self.max_rows:
            want_rows = min(want_rows, max(self.max_rows, rows))
        if want_rows * tokens > fit:
            want_rows = rows
        if want_rows * tokens > fit:
            return False
        target = have_tokens if tokens <= have_tokens else -(-max(tokens, have_tokens * 3 // 2) // 64) * 64
        self._layout(want_rows, min(fit // want_rows, target))
        return True

    def _layout(self, rows: int, tokens: int) -> None:
        """View the buffers as (rows, n_kv_head, tokens, head_dim), growing them first if they are too small;
        what the rows held is forgotten (they are copied in again)."""
        cfg = self.cache.config
        need = rows * tokens * cfg.n_kv_head * cfg.head_dim
        self.clear()
        self.k, self.v = [], []
        if not self._flat or self._flat[0].numel() < need:
            old, self._flat = self._flat, []
            try:
                for i in range(2 * cfg.n_layer):
                    if old:
                        old[i] = None  # freed before its successor is made: never both copies whole
                    self._flat.append(torch.zeros(need, dtype=self.cache.dtype, device=self.cache.device))
            except BaseException:  # e.g. out of memory: no copy at all
                self._flat = []
                raise
        views = [b[:need].view(rows, cfg.n_kv_head, tokens, cfg.head_dim) for b in self._flat]
        self.k, self.v = views[: cfg.n_layer], views[cfg.n_layer :]

    def _copy_in(self, rows: list[int], slots: torch.Tensor) -> None:
        """Copy the contexts at `slots` (F, L) (padding included: it is masked) into `rows`."""
        f, length = slots.shape
        index, flat = torch.tensor(rows, dtype=torch.long, device=self.cache.device), slots.reshape(-1)
        for i in range(self.cache.config.n_layer):
            for dense, paged in ((self.k[i], self.cache.k[i]), (self.v[i], self.cache.v[i])):
                dense[index, :, :length] = (
                    paged.index_select(1, flat).view(-1, f, length, paged.shape[-1]).transpose(0, 1)
                )
