"""Batches of token windows from the shards `data.prepare` writes (nanoGPT's `get_batch`, made resumable and
DDP-exact).

Training windows are random: step `s` of a run seeded `seed` draws `batch_size * world_size` windows (the
global batch) from a generator seeded with (seed, s), so a batch depends only on (seed, step, global batch
size), never on history. Resume = restore the step.

The rank contract: rank r takes the contiguous rows [r * batch_size, (r + 1) * batch_size) of the global batch.
A single process reproduces N ranks with gradient accumulation by loading with batch_size = N * B and
world_size = 1 and splitting each batch into N micro-batches of B rows in order (`x.split(B)`): micro-batch k
is exactly rank k's batch, so mean-of-micro-batch-losses equals DDP's gradient average. With accumulation
inside DDP too, each rank calls `next_batch()` once per micro-step; the single process does the same calls
with the N-times larger batch.

Validation windows are sequential and non-overlapping (window i starts at token i * seq_len of a shard, so
every token is a target once), cut the same way across ranks.
"""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.data.bpe import ByteTokenizer
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError

FORMAT = 1


class TokenShards:
    """All shards of one split of a prepared folder, memory-mapped (nothing is read until sliced)."""

    def __init__(self, folder: str | Path, split: str = "train") -> None:
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise UserError(f"{meta_path} not found; prepare the data first with `lmforge data prepare`")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise UserError(
                f"{meta_path}: format {meta.get('format')!r} is not {FORMAT}; re-run data prepare"
            )
        if split not in meta["splits"]:
            raise UserError(f"{self.folder} has no split {split!r} (has: {', '.join(meta['splits'])})")
        self.split = split
        self.dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        self.vocab_size: int = meta["vocab_size"]
        self.eot_id: int = meta["eot_id"]
        self.tokenizer_name: str = meta["tokenizer"]
        entries = meta["splits"][split]
        self.shards: list[np.memmap] = [
            np.memmap(self.folder / e["file"], dtype=self.dtype, mode="r", shape=(e["num_tokens"],))
            for e in entries
            if e["num_tokens"] > 0
        ]
        self.num_tokens = sum(len(s) for s in self.shards)
        self.num_documents: int = sum(e["num_documents"] for e in entries)

    def tokenizer(self) -> Tokenizer | ByteTokenizer:
        """The vocabulary the ids belong to (decode samples with `.decode(ids)`)."""
        if self.tokenizer_name == "bytes":
            return ByteTokenizer()
        return Tokenizer.from_folder(self.folder / self.tokenizer_name)

    def eval_batches(
        self, n: int, batch_size: int, seq_len: int, *, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Up to `n` batches of sequential, non-overlapping windows (the same on every call).

        Global batch i holds windows [i * B * world_size, (i + 1) * B * world_size) of the split's window list;
        rank r takes its r-th block of B. Stops early (the last batch may be short) when windows run out.
        """
        starts = [(k, i) for k, s in enumerate(self.shards) for i in range(0, len(s) - seq_len, seq_len)]
        global_rows = batch_size * world_size
        for b in range(min(n, -(-len(starts) // global_rows))):
            rows = starts[b * global_rows : (b + 1) * global_rows][
                rank * batch_size : (rank + 1) * batch_size
            ]
            if not rows:
                return
            yield self._windows(rows, seq_len)

    def _windows(self, rows: list[tuple[int, int]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = np.stack([self.shards[k][i : i + seq_len + 1] for k, i in rows]).astype(np.int64)  # (B, T+1)
        t = torch.from_numpy(w)
        return t[:, :-1], t[:, 1:]  # x, y: (B, T), y is x shifted left by one


class BatchLoader:
    """Random training windows; `next_batch()` gives this rank's (x, y), each a (batch_size, seq_len) int64."""

    def __init__(
        self,
        shards: TokenShards,
        batch_size: int,
        seq_len: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if seed < 0:
            raise UserError(f"seed must be >= 0, got {seed}")
        self.shards = shards
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.step = 0
        # Window starts per shard: 0 .. len - seq_len - 1 (a window is seq_len + 1 tokens).
        counts = np.array([max(len(s) - seq_len, 0) for s in shards.shards], dtype=np.int64)
        if counts.sum() == 0:
            raise UserError(
                f"the {shards.split} split of {shards.folder} has no shard longer than seq_len + 1 = "
                f"{seq_len + 1} tokens; lower seq_len or prepare more data"
            )
        self._ends = np.cumsum(counts)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def global_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All ranks' windows of `step`: (global_batch_size, seq_len) x and y."""
        return self.shards._windows(self._picks(step), self.seq_len)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the global batch of `step` (only those windows are read)."""
        rows = self._picks(step)[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return self.shards._windows(rows, self.seq_len)

    def _picks(self, step: int) -> list[tuple[int, int]]:
        """(shard, start) of every window of the global batch of `step`, uniform over all windows."""
        rng = np.random.default_rng([self.seed, step])
        picks = rng.integers(0, self._ends[-1], size=self.global_batch_size)
        shard = np.searchsorted(self._ends, picks, side="right")
        starts = picks - np.concatenate([[0], self._ends[:-1]])[shard]
        return list(zip(shard.tolist(), starts.tolist(), strict=True))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch(self.step)
        self.step += 1
        return x, y

    def state_dict(self) -> dict[str, Any]:
        # The generator is re-seeded from (seed, step) every step, so the step is the whole RNG state.
        return {"step": self.step, "seed": self.seed, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed or state["global_batch_size"] != self.global_batch_size:
            raise UserError(
                f"cannot resume the data loader: saved seed {state['seed']} / global batch "
                f"{state['global_batch_size']}, now {self.seed} / {self.global_batch_size}; use the saved values"
            )
        self.step = int(state["step"])
