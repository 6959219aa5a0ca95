"""Paged KV cache storage and the per-step attention metadata the model reads it with.

Storage: per layer one key and one value tensor of shape (n_kv_head, num_slots, head_dim), where
num_slots = num_blocks * block_size. A sequence owns a list of blocks (its block table); token t of the
sequence lives in slot `block_table[t // block_size] * block_size + t % block_size`. Who owns which
block (allocation, prefix sharing, eviction) is the engine's business; the model only sees slot indices.

One forward pass carries the new tokens of many sequences flattened into one (N,) batch, vLLM-style, so
prefill, chunked prefill and decode share one code path. `CacheBatch` describes that batch: where each
new token's k/v is written and, per sequence, which slots to attend to. Decode sequences (one new
token) are attended to together in one padded SDPA call; prefill chunks one by one.
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


@dataclass
class SeqSlice:
    """One sequence's part of a batch: new tokens [start, end) of the flat batch, attending to `ctx_len` slots."""

    start: int
    end: int
    ctx_len: int  # cached tokens before this step + new tokens
    slots: torch.Tensor  # (ctx_len,) long: cache slot of every context token, in order
    contiguous: bool  # slots are a consecutive range: attend through a view, no gather


@dataclass
class CacheBatch:
    slot_mapping: torch.Tensor  # (N,) long: the cache slot each new token's k/v is written to
    prefills: list[SeqSlice] = field(
        default_factory=list
    )  # sequences with > 1 new token, attended one by one
    decode_rows: torch.Tensor | None = None  # (Bd,) long: positions in the flat batch of the decode tokens
    decode_slots: torch.Tensor | None = None  # (Bd, Lmax) long: padded context slots of each decode sequence
    decode_bias: torch.Tensor | None = (
        None  # (Bd, 1, Lmax) float: -inf where a slot is padding (or out of window)
    )
    decode_single: SeqSlice | None = None  # the lone decode sequence when Bd == 1 (no padding, maybe a view)
    sliding_window: int | None = None
    _bias_cache: dict = field(default_factory=dict, repr=False)

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
        slot_parts, prefills, decodes = (
            [],
            [],
            [],
        )  # decodes: (table, ctx_len, row) of the one-token sequences
        start = 0
        for table, cached, new in zip(block_tables, num_cached, num_new, strict=True):
            ctx = cached + new
            if len(table) * block_size < ctx:
                raise ValueError(f"block table of {len(table)} blocks cannot hold {ctx} tokens")
            if new == 1:  # the new token's slot only; the context's slots are built for all decodes at once
                slot_parts.append([table[(ctx - 1) // block_size] * block_size + (ctx - 1) % block_size])
                decodes.append((table, ctx, start))
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
            batch.decode_slots = slots.to(device)
            batch.decode_bias = bias[:, None, :].to(device)
        return batch

    def decode_bias_for(self, n_kv_head: int, group: int) -> torch.Tensor:
        """decode_bias laid out as the decode attention's scores, (n_kv_head * Bd, group, Lmax): made on the
        first layer's call, the same for every layer of the step."""
        key = (n_kv_head, group)
        if key not in self._bias_cache:
            bd, _, lmax = self.decode_bias.shape
            self._bias_cache[key] = (
                self.decode_bias[None].expand(n_kv_head, bd, group, lmax).reshape(-1, group, lmax)
            )
        return self._bias_cache[key]

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
