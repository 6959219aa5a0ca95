"""Supervised fine-tuning data: OpenAI fine-tuning JSONL -> checked conversations -> (ids, loss-masked targets)
-> padded batches.

A line is `{"messages": [{"role": ..., "content": ...}, ...]}` (OpenAI's chat fine-tuning format). Bad lines
are skipped and counted per reason with their line numbers (`ReadReport`), never fatal unless `strict`.
Conversations are tokenised with the model's chat template (`chat_format.tokenize_conversation`); targets are
the ids shifted one left, -100 wherever the next token is not an assistant token, so the loss is the ordinary
next-token cross-entropy with ignore_index=-100.

Batching: the model has no document-boundary attention mask, so conversations are not packed into one row.
Instead each epoch is shuffled, cut into buckets of `bucket_batches` global batches that are sorted by length
(rows of one batch have similar lengths), and each batch is right-padded to its longest row (pad id in the
input, -100 in the target). The order depends only on (seed, epoch), so the loader's whole state is its step.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.data.batching import BucketedBatches
from lmforge.data.chat_format import tokenize_conversation
from lmforge.errors import UserError

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
IGNORE_INDEX = -100  # the same value as train.losses.IGNORE_INDEX (data may not import train)

# Why a line was skipped, in the words the report uses.
REASONS = {
    "broken_json": "broken JSON",
    "no_messages": "no 'messages' list",
    "bad_message": "a message is not an object with a 'role'",
    "unknown_role": "unknown role",
    "bad_content": "missing or non-string content",
    "no_assistant": "no assistant message",
    "template": "rejected by the chat template",
    "too_long": "no assistant token within seq_len",
}
_SHOWN_LINES = 10  # line numbers listed per reason in the summary


@dataclass
class ReadReport:
    """What happened to each line of a JSONL file: how many were kept and why the others were skipped."""

    path: str
    kept: int = 0
    problems: dict[str, list[int]] = field(default_factory=dict)  # reason -> 1-based line numbers
    details: dict[int, str] = field(default_factory=dict)  # line -> what exactly was wrong
    lines: list[int] = field(default_factory=list)  # line numbers of the kept conversations, in order
    # class attributes, not fields: the summary's words, which `labels.LabelReport` replaces
    noun = "conversations"
    reasons = REASONS

    def skip(self, reason: str, line: int, detail: str) -> None:
        self.problems.setdefault(reason, []).append(line)
        self.details[line] = detail

    @property
    def counts(self) -> dict[str, int]:
        return {reason: len(lines) for reason, lines in self.problems.items()}

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line, e.g. `chat.jsonl: kept 95 of 100 conversations; skipped 3 broken JSON (lines 4, 9, 12)`."""
        head = f"{self.path}: kept {self.kept} of {self.kept + self.skipped} {self.noun}"
        if not self.problems:
            return head
        parts = []
        for reason, lines in self.problems.items():
            shown = ", ".join(map(str, lines[:_SHOWN_LINES])) + (", ..." if len(lines) > _SHOWN_LINES else "")
            parts.append(f"{len(lines)} {self.reasons[reason]} (line{'s' if len(lines) > 1 else ''} {shown})")
        return f"{head}; skipped {', '.join(parts)}"


def check_line(text: str) -> tuple[list[dict[str, Any]] | None, str, str]:
    """(messages, "", "") for a good line, else (None, reason, detail)."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return None, "broken_json", str(e)
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        return None, "no_messages", 'expected {"messages": [...]}'
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return None, "bad_message", f"messages[{i}]"
        if m["role"] not in ROLES:
            return None, "unknown_role", f"messages[{i}].role {m['role']!r}"
        content = m.get("content")
        if not isinstance(content, str) and not (content is None and m.get("tool_calls")):
            return None, "bad_content", f"messages[{i}].content is {type(content).__name__}"
    if not any(m["role"] == "assistant" for m in messages):
        return None, "no_assistant", "nothing to train on"
    return messages, "", ""


def read_jsonl(path: str | Path, *, strict: bool = False) -> tuple[list[list[dict[str, Any]]], ReadReport]:
    """The good conversations of an OpenAI fine-tuning JSONL file and the report of the skipped lines.
    Blank lines are ignored; with `strict`, any bad line raises a UserError naming the problems."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"fine-tuning data {path} does not exist (expected a .jsonl of {{'messages': [...]}})"
        )
    report = ReadReport(str(path))
    conversations = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            messages, reason, detail = check_line(text)
            if messages is None:
                report.skip(reason, n, detail)
                continue
            conversations.append(messages)
            report.lines.append(n)
            report.kept += 1
    if strict and report.problems:
        raise UserError(report.summary())
    if not conversations:
        raise UserError(f"no usable conversations: {report.summary()}")
    return conversations, report


def split(items: Sequence[Any], val_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, validation) by a seeded permutation; at least one of each when val_fraction > 0 and len >= 2."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    order = np.random.default_rng([seed, 0x5F7]).permutation(len(items))
    n_val = round(len(items) * val_fraction)
    if val_fraction > 0 and len(items) >= 2:
        n_val = min(max(n_val, 1), len(items) - 1)
    val = [items[i] for i in sorted(order[:n_val])]
    train = [items[i] for i in sorted(order[n_val:])]
    return train, val


@dataclass(frozen=True)
class Example:
    """One conversation as model input and loss-masked next-token targets, both of length <= seq_len."""

    input_ids: np.ndarray  # int64 (T,)
    targets: np.ndarray  # int64 (T,), IGNORE_INDEX where the next token is not an assistant token

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


def make_example(ids: Sequence[int], mask: Sequence[bool], seq_len: int) -> Example:
    """Shift (ids, mask) into (input, target) and keep the first seq_len positions."""
    ids_arr = np.asarray(ids[: seq_len + 1], dtype=np.int64)
    keep = np.asarray(mask[: seq_len + 1], dtype=bool)
    targets = np.where(keep[1:], ids_arr[1:], IGNORE_INDEX)
    return Example(ids_arr[:-1], targets)


def tokenize(
    conversations: Sequence[list[dict[str, Any]]],
    tokenizer: Any,
    seq_len: int,
    report: ReadReport | None = None,
    lines: Sequence[int] | None = None,
) -> list[Example]:
    """Examples of the conversations; ones the template rejects or with no assistant token within seq_len are
    dropped and, given a report, counted there (under `lines`, the conversations' line numbers, if given)."""
    examples = []
    for k, messages in enumerate(conversations):
        line = lines[k] if lines is not None else k + 1
        try:
            ids, mask = tokenize_conversation(tokenizer, messages)
        except UserError as e:
            if report is not None:
                report.skip("template", line, str(e))
                report.kept -= 1
            continue
        example = make_example(ids, mask, seq_len)
        if example.trained_tokens == 0:
            if report is not None:
                report.skip("too_long", line, f"{len(ids)} tokens, first assistant token beyond {seq_len}")
                report.kept -= 1
            continue
        examples.append(example)
    return examples


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example: (x, y) of shape (B, T), pad_id in x and IGNORE_INDEX in y."""
    width = max(len(e) for e in examples)
    x = np.full((len(examples), width), pad_id, dtype=np.int64)
    y = np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64)
    for row, e in enumerate(examples):
        x[row, : len(e)] = e.input_ids
        y[row, : len(e)] = e.targets
    return torch.from_numpy(x), torch.from_numpy(y)


class SFTBatches(BucketedBatches):
    """Training batches of padded conversations; `next_batch()` gives this rank's (x, y), each (batch_size, T)
    with T the longest row of the global batch (epoch order, buckets, ranks and resume: `BucketedBatches`)."""

    noun = "conversations"
    data_name = "fine-tuning data"
    examples: list[Example]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the global batch of `step`, padded to the longest row of the global batch (so
        every rank's tensors have one shape)."""
        rows = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        x, y = collate([self.examples[j] for j in self._picks(step)], self.pad_id)
        return x[rows], y[rows]


def eval_batches(
    examples: Sequence[Example], batch_size: int, pad_id: int, *, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every validation example once, sorted by length, this rank's share of each global batch."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    gbs = batch_size * world_size
    for start in range(0, len(order), gbs):
        mine = order[start : start + gbs][rank * batch_size : (rank + 1) * batch_size]
        if mine:
            yield collate([examples[i] for i in mine], pad_id)
