"""The corpus: input files -> normalised, de-duplicated documents, streamed one at a time.

A file is one document, except `.jsonl` (one per line, the `text_field`) and `.parquet` (one per row, the
`text_column`, read a row-group batch at a time). Any other suffix is read as UTF-8 text. Nothing is held in
memory beyond one document (one file for text files) and a set of 16-byte digests for de-duplication, so a
`Corpus` can be iterated twice (tokenizer training, then tokenizing) over data larger than memory.

Bad input (undecodable bytes, broken JSON lines, a missing column) is recorded in `CorpusStats` and skipped;
with `strict=True` it raises a UserError naming the file and line instead.
"""

import glob
import hashlib
import json
import re
import sysconfig
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from lmforge.errors import UserError

PYTHON_STDLIB = "python-stdlib"
# Keep the first bad inputs with file and line; beyond that only count them (a broken file can have millions).
MAX_BAD_RECORDS = 100
_PARQUET_BATCH_ROWS = 1024

# Cc characters except \t (\x09) and \n (\x0a); a lone \r left after \r\n -> \n goes too.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUN = re.compile(r"\n{3,}")


def normalise(text: str) -> str:
    """NFC, no control characters but \\n and \\t, \\n line ends, no trailing spaces, at most one blank line."""
    text = _CONTROL.sub("", text.replace("\r\n", "\n"))
    # NFC after removing controls: a removed control between a letter and a combining mark would leave a
    # composable pair behind. NFC never adds spaces or newlines, so the steps below keep it idempotent.
    text = unicodedata.normalize("NFC", text)
    text = _TRAILING_SPACE.sub("", text)
    return _BLANK_RUN.sub("\n\n", text)


def digest(text: str) -> bytes:
    """The de-duplication key of a normalised document (and the seed of its train/val draw)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class Document(NamedTuple):
    text: str  # normalised
    digest: bytes


@dataclass
class BadInput:
    file: str
    line: int | None  # 1-based line (jsonl, text files) or row (parquet); None for the whole file
    reason: str


@dataclass
class CorpusStats:
    documents_read: int = 0  # documents found in the input, before any filtering
    dropped_empty: int = 0
    dropped_duplicate: int = 0
    documents_kept: int = 0
    bad_input_count: int = 0
    bad_inputs: list[BadInput] = field(default_factory=list)  # the first MAX_BAD_RECORDS

    def add_bad(self, bad: BadInput, strict: bool) -> None:
        if strict:
            where = f"{bad.file}:{bad.line}" if bad.line is not None else bad.file
            raise UserError(f"{where}: {bad.reason} (fix or remove it, or run without --strict to skip it)")
        self.bad_input_count += 1
        if len(self.bad_inputs) < MAX_BAD_RECORDS:
            self.bad_inputs.append(bad)


def resolve_inputs(inputs: Sequence[str], source: str | None = None) -> list[Path]:
    """The files to read, in order: each input is a file, a folder (all files below it) or a glob."""
    if source is not None and source != PYTHON_STDLIB:
        raise UserError(f"unknown source {source!r}; the only built-in source is {PYTHON_STDLIB!r}")
    paths: list[Path] = []
    for spec in inputs:
        path = Path(spec)
        if glob.has_magic(spec):
            matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not matches:
                raise UserError(
                    f"no files match {spec!r}; check the pattern (quote it so the shell keeps it)"
                )
            paths.extend(matches)
        elif path.is_dir():
            paths.extend(_files_under(path))
        elif path.is_file():
            paths.append(path)
        else:
            raise UserError(f"{spec}: no such file or folder; check the path")
    if source == PYTHON_STDLIB:
        paths.extend(_python_stdlib_files())
    if not paths:
        raise UserError("no inputs matched: give files, folders or globs, or --source python-stdlib")
    return paths


def _files_under(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _python_stdlib_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p
        for p in stdlib.rglob("*.py")
        if not {"site-packages", "dist-packages"} & set(p.relative_to(stdlib).parts)
    )


@dataclass(frozen=True)
class Corpus:
    """The documents of `paths`; iterate `documents(stats)` as often as needed, it gives the same every time."""

    paths: tuple[Path, ...]
    text_field: str = "text"
    text_column: str = "text"
    strict: bool = False
    max_documents: int | None = None  # stop after this many kept documents (tests, quick experiments)

    def documents(self, stats: CorpusStats) -> Iterator[Document]:
        """Normalised documents, empty ones and exact duplicates dropped; counts go to `stats`."""
        seen: set[bytes] = set()
        for raw in self.raw_documents(stats):
            stats.documents_read += 1
            text = normalise(raw)
            if not text.strip():
                stats.dropped_empty += 1
                continue
            key = digest(text)
            if key in seen:
                stats.dropped_duplicate += 1
                continue
            seen.add(key)
            stats.documents_kept += 1
            yield Document(text, key)
            if self.max_documents is not None and stats.documents_kept >= self.max_documents:
                return

    def raw_documents(self, stats: CorpusStats) -> Iterator[str]:
        for path in self.paths:
            suffix = path.suffix.lower()
            if suffix == ".jsonl":
                yield from self._read_jsonl(path, stats)
            elif suffix == ".parquet":
                yield from self._read_parquet(path, stats)
            else:
                yield from self._read_text(path, stats)

    def _read_text(self, path: Path, stats: CorpusStats) -> Iterator[str]:
        data = _read_bytes(path)
        try:
            yield data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            stats.add_bad(BadInput(str(path), line, f"not UTF-8 (byte {e.start})"), self.strict)

    def _read_jsonl(self, path: Path, stats: CorpusStats) -> Iterator[str]:
        with _open(path) as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except UnicodeDecodeError:
                    stats.add_bad(BadInput(str(path), number, "not UTF-8"), self.strict)
                    continue
                except json.JSONDecodeError as e:
                    stats.add_bad(BadInput(str(path), number, f"broken JSON ({e.msg})"), self.strict)
                    continue
                text = record.get(self.text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    reason = f"no string field {self.text_field!r} (set --text-field)"
                    stats.add_bad(BadInput(str(path), number, reason), self.strict)
                    continue
                yield text

    def _read_parquet(self, path: Path, stats: CorpusStats) -> Iterator[str]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as e:
            stats.add_bad(BadInput(str(path), None, f"not a parquet file ({e})"), self.strict)
            return
        column = (
            parquet.schema_arrow.field(self.text_column)
            if self.text_column in parquet.schema_arrow.names
            else None
        )
        if column is None or not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            reason = f"no string column {self.text_column!r} (set --text-column)"
            stats.add_bad(BadInput(str(path), None, reason), self.strict)
            return
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[self.text_column]):
            for text in batch.column(0).to_pylist():
                yield text or ""  # a null row counts as an empty document


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from e


def _open(path: Path):
    try:
        return path.open("rb")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from e
