"""Labelled text for classification: JSONL `{"text", "label"}` or CSV (columns text,label) -> checked examples
-> label ids -> padded batches.

Bad lines are skipped and counted per reason with their line numbers (`LabelReport`, the chat data's
`sft.ReadReport` with this data's reasons), never fatal unless `strict`: a missing or non-string text, an empty
text, a missing label, a label that is neither a string nor an integer, and in validation or evaluation data a
label the training data never had (the model has no output for it).

Labels are names (strings; JSON integers become their decimal string). Ids follow the sorted names, numerically
when every name is an integer ("2" before "10"), so the same data always gives the same ids. Texts are
tokenised with `encode_texts` (no special-token parsing: a text is data, not a template), cut to seq_len.

Batching is `batching.BucketedBatches`, as for the chat data: each epoch in a fresh (seed, epoch) order, cut into
buckets sorted by length, rows right-padded to the longest of their global batch, so the loader's whole state is
its step. A batch is (x (B, T), lengths (B,), labels (B,)).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.data.batching import BucketedBatches
from lmforge.data.sft import ReadReport
from lmforge.errors import UserError

REASONS = {
    "broken_json": "broken JSON",
    "bad_text": "missing or non-string text",
    "empty_text": "empty text",
    "no_label": "missing label",
    "bad_label": "label not a string or integer",
    "unknown_label": "label never seen in training",
}
CSV_COLUMNS = ("text", "label")
_INTEGER = re.compile(r"[+-]?\d+")


class LabelReport(ReadReport):
    """What happened to each line of a labelled file: how many examples were kept, why the others were not;
    summarised e.g. `tickets.csv: kept 95 of 100 examples; skipped 3 empty text (lines 4, 9, 12)`."""

    noun = "examples"
    reasons = REASONS


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: str
    line: int  # 1-based line of the file (of a CSV record's first line)


def check_record(record: Any) -> tuple[LabelledText | None, str, str]:
    """(example, "", "") for a good {"text", "label"} record, else (None, reason, detail); line is set later."""
    if not isinstance(record, dict):
        return None, "bad_text", f'expected {{"text": ..., "label": ...}}, got {type(record).__name__}'
    text, label = record.get("text"), record.get("label")
    if not isinstance(text, str):
        return None, "bad_text", "text is missing" if text is None else f"text is {type(text).__name__}"
    if not text.strip():
        return None, "empty_text", "text is empty or blank"
    if label is None or (isinstance(label, str) and not label.strip()):
        return None, "no_label", "label is missing or blank"
    if isinstance(label, bool) or not isinstance(label, str | int):
        return None, "bad_label", f"label {label!r} is {type(label).__name__}"
    return LabelledText(text, str(label).strip(), 0), "", ""


def _jsonl_records(f) -> Iterator[tuple[int, Any]]:
    for n, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            yield n, e


def _csv_records(f, path: Path) -> Iterator[tuple[int, Any]]:
    reader = csv.reader(f)
    columns = [c.strip().lower() for c in next(reader, [])]
    if not set(CSV_COLUMNS) <= set(columns):
        raise UserError(
            f"{path} needs a header row with columns text,label; found {','.join(columns) or 'none'}"
        )
    while True:
        start = reader.line_num + 1  # a record's first line (a quoted field may span several)
        row = next(reader, None)
        if row is None:
            return
        if any(cell.strip() for cell in row):  # blank rows are skipped, as blank JSONL lines are
            record = dict(zip(columns, row, strict=False))
            yield start, {"text": record.get("text"), "label": record.get("label")}


def read(
    path: str | Path, *, known_labels: Sequence[str] | None = None, strict: bool = False
) -> tuple[list[LabelledText], LabelReport]:
    """The good examples of a labelled JSONL or CSV file (by suffix: .csv is CSV, anything else JSONL) and the
    report of the skipped lines. With `known_labels` (the training labels), examples with any other label are
    skipped as unknown_label. With `strict`, any bad line raises a UserError naming the problems."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"classification data {path} does not exist (expected .jsonl of {{'text', 'label'}} or .csv with text,label)"
        )
    report = LabelReport(str(path))
    known = set(known_labels) if known_labels is not None else None
    examples = []
    # utf-8-sig: spreadsheets write a byte-order mark before the header
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as f:
        try:
            records = list(_csv_records(f, path) if path.suffix.lower() == ".csv" else _jsonl_records(f))
        except csv.Error as e:
            raise UserError(f"{path} is not readable CSV ({e})") from None
    for n, record in records:
        if isinstance(record, json.JSONDecodeError):
            report.skip("broken_json", n, str(record))
            continue
        example, reason, detail = check_record(record)
        if example is None:
            report.skip(reason, n, detail)
            continue
        if known is not None and example.label not in known:
            shown = ", ".join(order_labels(known))
            report.skip(
                "unknown_label", n, f"label {example.label!r} is not one of the training labels ({shown})"
            )
            continue
        examples.append(LabelledText(example.text, example.label, n))
        report.lines.append(n)
        report.kept += 1
    if strict and report.problems:
        raise UserError(report.summary())
    return examples, report


def order_labels(labels: Sequence[str] | set[str]) -> list[str]:
    """The distinct label names in id order: sorted, numerically when all of them are integers."""
    distinct = set(labels)
    if distinct and all(_INTEGER.fullmatch(label) for label in distinct):
        return sorted(distinct, key=lambda label: (int(label), label))
    return sorted(distinct)


def split(
    examples: Sequence[LabelledText], val_fraction: float, seed: int
) -> tuple[list[LabelledText], list[LabelledText]]:
    """(train, validation), stratified: each label gives round(count * val_fraction) of its examples (by a
    seeded permutation) to validation but keeps at least one for training. Both keep the file's order."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    by_label: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        by_label.setdefault(e.label, []).append(i)
    val: set[int] = set()
    for k, label in enumerate(order_labels(by_label)):
        members = by_label[label]
        order = np.random.default_rng([seed, 0x1AB, k]).permutation(len(members))
        n_val = min(round(len(members) * val_fraction), len(members) - 1)
        val.update(members[j] for j in order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [
        e for i, e in enumerate(examples) if i in val
    ]


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text as a classifier sees it: BOS when the tokenizer adds one, special-token strings
    as plain text. (The server's /v1/classifications encodes the same way.)"""
    return tokenizer.encode_batch(list(texts), add_bos=tokenizer.add_bos_token, parse_special=False)


@dataclass(frozen=True)
class Example:
    """One text as model input (at most seq_len ids) and its label id."""

    input_ids: np.ndarray  # int64 (T,)
    label: int
    line: int

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize(
    texts: Sequence[LabelledText], tokenizer: Any, seq_len: int, label_ids: dict[str, int]
) -> tuple[list[Example], int]:
    """(examples, how many texts were cut to seq_len tokens). Every text is non-empty, so every example has a
    token (a text that encodes to nothing keeps a BOS or is refused)."""
    examples, truncated = [], 0
    for t, ids in zip(texts, encode_texts(tokenizer, [t.text for t in texts]), strict=True):
        if not ids:
            raise UserError(f"line {t.line}: the text encodes to no tokens")
        truncated += len(ids) > seq_len
        examples.append(Example(np.asarray(ids[:seq_len], dtype=np.int64), label_ids[t.label], t.line))
    return examples, truncated


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example: x (B, T) with pad_id, lengths (B,), labels (B,)."""
    width = max(len(e) for e in examples)
    x = np.full((len(examples), width), pad_id, dtype=np.int64)
    for row, e in enumerate(examples):
        x[row, : len(e)] = e.input_ids
    lengths = np.array([len(e) for e in examples], dtype=np.int64)
    labels = np.array([e.label for e in examples], dtype=np.int64)
    return torch.from_numpy(x), torch.from_numpy(lengths), torch.from_numpy(labels)


class LabelBatches(BucketedBatches):
    """Training batches; `next_batch()` gives this rank's (x, lengths, labels) (epoch order, buckets, ranks and
    resume: `BucketedBatches`, as for the chat data)."""

    noun = "examples"
    data_name = "classification data"
    examples: list[Example]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's rows of the global batch of `step`, padded to the longest row of the whole global batch
        (so every rank's tensors have one shape)."""
        width = max(len(self.examples[j]) for j in self._picks(step))
        x, lengths, labels = collate([self.examples[j] for j in self._mine(step)], self.pad_id)
        if x.shape[1] < width:
            x = torch.nn.functional.pad(x, (0, width - x.shape[1]), value=self.pad_id)
        return x, lengths, labels


def eval_batches(
    examples: Sequence[Example], batch_size: int, pad_id: int, *, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[list[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Every example once, sorted by length: (indices into `examples`, this rank's share of the global batch)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    gbs = batch_size * world_size
    for start in range(0, len(order), gbs):
        mine = order[start : start + gbs][rank * batch_size : (rank + 1) * batch_size]
        if mine:
            yield mine, collate([examples[i] for i in mine], pad_id)
