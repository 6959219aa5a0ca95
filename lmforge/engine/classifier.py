"""Text classification for serving: token ids in, label probabilities out, batched, no grad.

A classifier is one forward pass per text, so it needs no scheduler, KV cache or step loop: `classify` sorts
the texts by length (rows of a batch have similar lengths, little padding), runs batches of at most
`max_batch` rows, right-padded (causal attention keeps padding out of the real tokens, and the head pools
only real tokens), and returns each text's {label: probability} in the order given. Calls are serialised
by a lock: concurrent requests would only split the same cores.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from lmforge import checkpoint, runtime
from lmforge.errors import UserError
from lmforge.models.classifier import SequenceClassifier


class Classifier:
    def __init__(self, model: SequenceClassifier, *, pad_id: int = 0, max_batch: int = 32) -> None:
        self.model = model.eval()
        self.pad_id = model.pad_token_id if model.pad_token_id is not None else pad_id
        self.max_batch = max_batch
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls, path: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto"
    ) -> Classifier:
        """The classifier folder at `path` (a *ForSequenceClassification HF folder) on `device` in `dtype`
        ("auto": runtime's policy)."""
        dev = runtime.resolve_device(device) if isinstance(device, str) else device
        dt = runtime.resolve_dtype(dtype, dev) if isinstance(dtype, str) else dtype
        ck = checkpoint.load(path, device=dev, dtype=dt)
        if not isinstance(ck.model, SequenceClassifier):
            raise UserError(
                f"{path} is a language model, not a classifier (its config.json names no "
                "*ForSequenceClassification architecture)"
            )
        return cls(ck.model, pad_id=ck.tokenizer.pad_id or 0)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.model.labels

    @property
    def max_seq_len(self) -> int:
        return self.model.config.max_seq_len

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def classify(self, prompts: Sequence[Sequence[int]]) -> list[dict[str, float]]:
        """{label: probability} for each token-id list, in the order given. Every list needs 1..max_seq_len
        ids within the vocabulary (UserError otherwise; the server checks first and answers 400)."""
        for i, ids in enumerate(prompts):
            if not 0 < len(ids) <= self.max_seq_len:
                raise UserError(
                    f"input {i} has {len(ids)} tokens; a classifier takes 1 to {self.max_seq_len}"
                )
            if min(ids) < 0 or max(ids) >= self.vocab_size:
                raise UserError(f"input {i} has a token id outside the vocabulary (0..{self.vocab_size - 1})")
        device = self.model.score.weight.device
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[dict[str, float]] = [{} for _ in prompts]
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), self.max_batch):
                rows = order[start : start + self.max_batch]
                lengths = torch.tensor([len(prompts[i]) for i in rows], device=device)
                x = torch.full((len(rows), int(lengths.max())), self.pad_id, dtype=torch.long, device=device)
                for r, i in enumerate(rows):
                    x[r, : len(prompts[i])] = torch.as_tensor(prompts[i], dtype=torch.long)
                probs = torch.softmax(self.model(x, lengths), dim=-1).cpu().tolist()  # (B, num_labels)
                for i, p in zip(rows, probs, strict=True):
                    out[i] = dict(zip(self.labels, p, strict=True))
        return out
