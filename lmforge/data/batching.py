"""Length-bucketed training batches of variable-length examples, shared by the chat (`sft`) and classification
(`labels`) data.

The models have no document-boundary attention mask, so examples are not packed into one row. Instead each
epoch is shuffled, cut into buckets of `bucket_batches` global batches that are sorted by length (rows of one
batch have similar lengths), and each batch is right-padded to its longest row by the subclass's `batch()`. The
order depends only on (seed, epoch), so the loader's whole state is its step. This class owns the order, the
rank's rows and the resume state; a subclass only turns a step's examples into tensors.
"""

from __future__ import annotations

from collections.abc import Sequence, Sized
from typing import Any

import numpy as np

from lmforge.errors import UserError


class BucketedBatches:
    """Training batches; `next_batch()` gives this rank's share of the next global batch (whatever `batch()`
    builds) and sets `last_batch_tokens` to the real (non-padding) tokens of its rows, which the loop logs.
    Epochs repeat forever, each in a fresh (seed, epoch) order. Subclasses name their examples and data (for
    the messages) and implement `batch(step)`."""

    noun = "examples"  # what one example is called in messages, plural
    data_name = "training data"  # what `load_state_dict` cannot resume

    def __init__(
        self,
        examples: Sequence[Sized],
        batch_size: int,
        *,
        pad_id: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        bucket_batches: int = 8,
    ) -> None:
        if not examples:
            raise UserError(f"no training {self.noun} left to batch")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.bucket_batches = max(1, bucket_batches)
        self.step = 0
        self.last_batch_tokens = 0
        self.batches_per_epoch = -(-len(self.examples) // self.global_batch_size)
        self._epoch_cache: tuple[int, list[np.ndarray]] | None = None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def _epoch(self, epoch: int) -> list[np.ndarray]:
        """Example indices of every global batch of `epoch`, in the order they are trained."""
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        n, gbs = len(self.examples), self.global_batch_size
        order = rng.permutation(n)
        # the last batch is completed from the start of the order, so every batch is full on every rank
        order = np.concatenate([order, np.resize(order, self.batches_per_epoch * gbs - n)])
        lengths = np.array([len(self.examples[i]) for i in order])
        bucket = gbs * self.bucket_batches
        batches = []
        for start in range(0, len(order), bucket):
            chunk = order[start : start + bucket]
            chunk = chunk[np.argsort(-lengths[start : start + bucket], kind="stable")]
            batches += [chunk[i : i + gbs] for i in range(0, len(chunk), gbs)]
        batches = [batches[i] for i in rng.permutation(len(batches))]  # long batches not all first
        self._epoch_cache = (epoch, batches)
        return batches

    def _picks(self, step: int) -> np.ndarray:
        """Example indices of the global batch of `step`."""
        epoch, i = divmod(step, self.batches_per_epoch)
        return self._epoch(epoch)[i]

    def _mine(self, step: int) -> np.ndarray:
        """Example indices of this rank's rows of the global batch of `step`."""
        return self._picks(step)[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def batch(self, step: int) -> Any:
        """This rank's rows of the global batch of `step`, padded to the longest row of the whole global batch
        (so every rank's tensors have one shape)."""
        raise NotImplementedError

    def next_batch(self) -> Any:
        out = self.batch(self.step)
        self.last_batch_tokens = sum(len(self.examples[j]) for j in self._mine(self.step))
        self.step += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        # The order is a function of (seed, epoch), so the step is the whole state.
        return {
            "step": self.step,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "examples": len(self.examples),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # states saved before "examples" was recorded lack it; they resume unchecked on that count
        saved = (state["seed"], state["global_batch_size"], state.get("examples", len(self.examples)))
        now = (self.seed, self.global_batch_size, len(self.examples))
        if saved != now:
            raise UserError(
                f"cannot resume the {self.data_name}: saved seed / global batch / {self.noun} {saved}, "
                f"now {now}; resume with the same data, seed and batch size"
            )
        self.step = int(state["step"])
