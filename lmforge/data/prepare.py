"""`lmforge data prepare`: input files -> memory-mapped token shards the loader and trainer read.

Pipeline, streamed end to end (one batch of documents in flight per worker, never the corpus):

    corpus (read, normalise, drop empty + duplicates) -> [scrub PII] -> tokenize (+ end-of-text) -> split -> shards

With `tokenizer="bpe"` the corpus is read twice: once to train the BPE, once to tokenize.

The output folder (format 1) is what `loader.TokenShards` reads:

    meta.json               {"format": 1, "dtype": "uint16"|"uint32", "vocab_size", "eot_id",
                             "tokenizer": "tokenizer" | "bytes",
                             "splits": {"train": [{"file", "num_tokens", "num_documents"}, ...], "val": [...]}}
    tokenizer/              the tokenizer (Tokenizer.save); absent for the byte vocabulary
    {split}_{i:05d}.bin     raw little-endian token ids, every document followed by eot_id
    {split}_{i:05d}.idx.npy int64 start offset of each document within the shard
    summary.json            the Summary of the run

A shard holds whole documents and is closed once it reaches `shard_tokens`. Every file is written under a
temporary name and renamed into place; meta.json goes last, so a folder with meta.json is complete.

Train/validation is split by document: a document goes to validation when a hash of (seed, its digest) falls
below `val_fraction`, so reruns give identical shards. So that validation is never empty, the train document
with the lowest hash is held back until a validation document appears; if none does it becomes the
validation set (otherwise it is appended to train, slightly out of order).
"""

import hashlib
import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from lmforge import atomic
from lmforge.data.bpe import END_OF_TEXT, ByteTokenizer, train_bpe
from lmforge.data.corpus import BadInput, Corpus, CorpusStats, Document, resolve_inputs
from lmforge.data.pii import scrub
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError

FORMAT = 1
SPLITS = ("train", "val")
TOKENIZER_DIR = "tokenizer"
BYTES = "bytes"
# A batch sent to a worker: small enough that workers x in-flight batches stay a few MB.
_BATCH_DOCS = 256
_BATCH_CHARS = 1 << 20


@dataclass(frozen=True)
class PrepareConfig:
    """One field per `lmforge data prepare` flag."""

    inputs: tuple[str, ...] = ()  # files, folders or globs
    out: str = ""
    source: str | None = None  # "python-stdlib": the .py files of the running Python's standard library
    text_field: str = "text"  # .jsonl
    text_column: str = "text"  # .parquet
    # "bpe" (train one), "bytes" (256 byte ids + end of text), a tokenizer folder or tokenizer.json path,
    # or a Tokenizer object (the CLI resolves model-store names to one of these).
    tokenizer: "str | Tokenizer" = "bpe"
    vocab_size: int = 8192  # for "bpe"
    special_tokens: tuple[str, ...] = (END_OF_TEXT,)  # for "bpe"; the first (or <|endoftext|>) ends documents
    scrub_pii: bool = False
    val_fraction: float = 0.005  # by document; at least one document
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    shard_tokens: int = 100_000_000
    strict: bool = False  # bad input raises instead of being counted and skipped
    seed: int = 0
    max_documents: int | None = None  # stop after this many kept documents

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(str(i) for i in self.inputs))
        object.__setattr__(self, "special_tokens", tuple(self.special_tokens))
        if not self.out:
            raise UserError("no output folder: pass --out DIR")
        if self.tokenizer == "bpe" and self.vocab_size < 256 + len(self.special_tokens) + 1:
            raise UserError(
                f"vocab_size {self.vocab_size} is too small for a byte-level BPE; use at least 512"
            )
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.workers < 1 or self.shard_tokens < 1:
            raise UserError("workers and shard_tokens must be at least 1")
        if self.max_documents is not None and self.max_documents < 1:
            raise UserError(f"max_documents must be at least 1, got {self.max_documents}")


@dataclass
class Summary:
    out: str
    tokenizer: str  # "tokenizer" (the subfolder) or "bytes"
    vocab_size: int
    eot_id: int
    documents_read: int
    dropped_empty: int
    dropped_duplicate: int
    scrubbed: dict[str, int]  # PII replacements by type
    bad_input_count: int
    bad_inputs: list[BadInput]  # the first 100, with file and line
    documents: dict[str, int]  # per split
    tokens: dict[str, int]
    shards: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """A few lines for the terminal."""
        lines = [
            f"documents: {self.documents_read} read, {self.dropped_empty} empty and "
            f"{self.dropped_duplicate} duplicates dropped",
            *(
                f"{split}: {self.documents[split]} documents, {self.tokens[split]:,} tokens, "
                f"{self.shards[split]} shard(s)"
                for split in SPLITS
            ),
            f"vocabulary: {self.tokenizer}, {self.vocab_size} ids, end of text = {self.eot_id}",
        ]
        if self.scrubbed:
            lines.append("PII scrubbed: " + ", ".join(f"{k} {v}" for k, v in sorted(self.scrubbed.items())))
        if self.bad_input_count:
            lines.append(f"bad input skipped: {self.bad_input_count} (see summary.json)")
            lines += [f"  {b.file}:{b.line or '-'}: {b.reason}" for b in self.bad_inputs[:5]]
        lines.append(f"written to {self.out}")
        return "\n".join(lines)


def run(cfg: PrepareConfig) -> Summary:
    corpus = Corpus(
        tuple(resolve_inputs(cfg.inputs, cfg.source)),
        text_field=cfg.text_field,
        text_column=cfg.text_column,
        strict=cfg.strict,
        max_documents=cfg.max_documents,
    )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # the folder is incomplete until the new meta.json lands

    tokenizer = _load_tokenizer(cfg.tokenizer)
    if tokenizer is None:  # "bpe": a first pass over the corpus trains it
        stats = CorpusStats()
        tokenizer = train_bpe(_training_texts(corpus, stats, cfg), cfg.vocab_size, cfg.special_tokens)
        _check_not_empty(stats)
    eot_id = _eot_id(tokenizer, cfg.special_tokens)
    vocab_size = tokenizer.vocab_size
    dtype = "uint16" if vocab_size <= 1 << 16 else "uint32"
    if isinstance(tokenizer, Tokenizer):
        tokenizer.save(out / TOKENIZER_DIR)
        tokenizer_json: str | None = (out / TOKENIZER_DIR / "tokenizer.json").read_text(encoding="utf-8")
    else:
        tokenizer_json = None

    stats = CorpusStats()
    scrubbed: Counter[str] = Counter()
    writers = {split: _ShardWriter(out, split, dtype, cfg.shard_tokens) for split in SPLITS}
    splitter = _Splitter(writers, cfg.seed, cfg.val_fraction)
    encoder = _Encoder(tokenizer_json, eot_id, dtype, cfg.scrub_pii)
    with _pool(cfg.workers, encoder) as pool:
        for batch, (tokens, lengths, counts) in _mapped(
            pool, cfg.workers, encoder.encode, _worker_encode, corpus.documents(stats)
        ):
            scrubbed.update(counts)
            for doc, ids in zip(batch, np.split(tokens, np.cumsum(lengths)[:-1]), strict=True):
                splitter.add(doc.digest, ids)
    _check_not_empty(stats)
    splitter.finish()
    if not writers["train"].num_documents:
        raise UserError(
            f"all {writers['val'].num_documents} documents went to validation; lower --val-fraction "
            f"(now {cfg.val_fraction})"
        )
    for w in writers.values():
        w.close()

    summary = Summary(
        out=str(out),
        tokenizer=TOKENIZER_DIR if tokenizer_json is not None else BYTES,
        vocab_size=vocab_size,
        eot_id=eot_id,
        documents_read=stats.documents_read,
        dropped_empty=stats.dropped_empty,
        dropped_duplicate=stats.dropped_duplicate,
        scrubbed=dict(sorted(scrubbed.items())),
        bad_input_count=stats.bad_input_count,
        bad_inputs=stats.bad_inputs,
        documents={s: sum(sh["num_documents"] for sh in writers[s].shards) for s in SPLITS},
        tokens={s: sum(sh["num_tokens"] for sh in writers[s].shards) for s in SPLITS},
        shards={s: len(writers[s].shards) for s in SPLITS},
    )
    meta = {
        "format": FORMAT,
        "dtype": dtype,
        "vocab_size": vocab_size,
        "eot_id": eot_id,
        "tokenizer": summary.tokenizer,
        "splits": {s: writers[s].shards for s in SPLITS},
    }
    _remove_stale_shards(out, {sh["file"] for s in SPLITS for sh in writers[s].shards})
    atomic.write_json(out / "summary.json", summary.to_dict())
    atomic.write_json(out / "meta.json", meta)
    return summary


# --- tokenizer --------------------------------------------------------------------------------------------


def _load_tokenizer(spec: "str | Tokenizer") -> "Tokenizer | ByteTokenizer | None":
    """The tokenizer `spec` names; None for "bpe" (trained from the corpus)."""
    if isinstance(spec, Tokenizer):
        return spec
    if spec == "bpe":
        return None
    if spec == BYTES:
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        return Tokenizer.from_folder(path)
    if path.is_file() and path.suffix == ".json":
        try:
            return Tokenizer(tokenizers.Tokenizer.from_file(str(path)), eos_token=END_OF_TEXT)
        except Exception as e:  # the Rust side raises a bare Exception for malformed files
            raise UserError(f"{path} is not a valid tokenizer.json ({e})") from e
    raise UserError(
        f"unknown tokenizer {spec!r}: use 'bpe', 'bytes', a model folder or a tokenizer.json path"
    )


def _eot_id(tokenizer: "Tokenizer | ByteTokenizer", special_tokens: tuple[str, ...]) -> int:
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.eot_id
    # A pretraining corpus separates documents with <|endoftext|> even when the chat EOS is another token.
    for name in (*special_tokens[:1], END_OF_TEXT):
        i = tokenizer.token_to_id(name)
        if i is not None:
            return i
    if tokenizer.eos_id is None:
        raise UserError(
            "the tokenizer has no end-of-text token; pass --special-tokens with one of its special tokens"
        )
    return tokenizer.eos_id


def _training_texts(corpus: Corpus, stats: CorpusStats, cfg: PrepareConfig) -> Iterator[str]:
    """The documents the BPE learns from: scrubbed too, so placeholders (not PII) get tokens."""
    if not cfg.scrub_pii:
        yield from (doc.text for doc in corpus.documents(stats))
        return
    encoder = _Encoder(None, 0, "uint16", scrub_pii=True)
    with _pool(cfg.workers, encoder) as pool:
        docs = corpus.documents(stats)
        for _, (texts, _counts) in _mapped(pool, cfg.workers, encoder.scrub, _worker_scrub, docs):
            yield from texts


def _check_not_empty(stats: CorpusStats) -> None:
    if stats.documents_kept == 0:
        raise UserError(
            f"0 documents left after dropping {stats.dropped_empty} empty and {stats.dropped_duplicate} "
            f"duplicates ({stats.bad_input_count} bad inputs skipped); check the inputs and --text-field"
        )


# --- parallel encoding --------------------------------------------------------------------------------------


class _Encoder:
    """Scrub + tokenize a batch of documents; built once per worker process from plain arguments."""

    def __init__(self, tokenizer_json: str | None, eot_id: int, dtype: str, scrub_pii: bool) -> None:
        self.init_args = (tokenizer_json, eot_id, dtype, scrub_pii)  # to rebuild it in a worker
        self._tok: tokenizers.Tokenizer | None = None
        if tokenizer_json is not None:
            self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
            self._tok.encode_special_tokens = True  # "<|endoftext|>" written in a document is plain text
        self._eot = eot_id
        self._dtype = np.dtype(dtype).newbyteorder("<")
        self._scrub_pii = scrub_pii

    def scrub(self, texts: list[str]) -> tuple[list[str], Counter[str]]:
        counts: Counter[str] = Counter()
        if not self._scrub_pii:
            return texts, counts
        out = []
        for text in texts:
            text, c = scrub(text)
            out.append(text)
            counts.update(c)
        return out, counts

    def encode(self, texts: list[str]) -> tuple[np.ndarray, list[int], Counter[str]]:
        """All documents' ids (each followed by end of text) in one array, and each document's length."""
        texts, counts = self.scrub(texts)
        if self._tok is None:
            docs = [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]
        else:
            docs = [np.asarray(e.ids) for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        eot = np.array([self._eot], self._dtype)
        tokens = np.concatenate([part for d in docs for part in (d.astype(self._dtype), eot)])
        return tokens, [len(d) + 1 for d in docs], counts


_worker_encoder: _Encoder | None = None


def _init_worker(*args: Any) -> None:
    global _worker_encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _worker_encoder = _Encoder(*args)


def _worker_encode(texts: list[str]) -> tuple[np.ndarray, list[int], Counter[str]]:
    assert _worker_encoder is not None
    return _worker_encoder.encode(texts)


def _worker_scrub(texts: list[str]) -> tuple[list[str], Counter[str]]:
    assert _worker_encoder is not None
    return _worker_encoder.scrub(texts)


@contextmanager
def _pool(workers: int, encoder: _Encoder) -> Iterator[ProcessPoolExecutor | None]:
    """A process pool with a copy of `encoder` in every worker, or None (work in this process) for one worker."""
    if workers <= 1:
        yield None
        return
    executor = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),  # never fork a process that holds Rust thread pools
        initializer=_init_worker,
        initargs=encoder.init_args,
    )
    try:
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _batches(docs: Iterable[Document]) -> Iterator[list[Document]]:
    batch: list[Document] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _mapped(
    pool: ProcessPoolExecutor | None, workers: int, local_fn, worker_fn, docs: Iterable[Document]
) -> Iterator[tuple]:
    """(batch, fn(texts of batch)) in order; at most two batches per worker in flight, so memory stays flat.

    (`ProcessPoolExecutor.map` would submit the whole corpus at once.)
    """
    if pool is None:
        for batch in _batches(docs):
            yield batch, local_fn([d.text for d in batch])
        return
    pending: deque[tuple[list[Document], Future]] = deque()
    for batch in _batches(docs):
        pending.append((batch, pool.submit(worker_fn, [d.text for d in batch])))
        if len(pending) > 2 * workers:
            done, future = pending.popleft()
            yield done, future.result()
    while pending:
        done, future = pending.popleft()
        yield done, future.result()


# --- splitting and writing ------------------------------------------------------------------------------------


def _val_score(seed: int, digest: bytes) -> float:
    h = hashlib.blake2b(digest, digest_size=8, key=seed.to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(h, "little") / 2**64


SINGLE_DOCUMENT_VAL_FRACTION = 0.1


class _Splitter:
    def __init__(self, writers: dict[str, "_ShardWriter"], seed: int, val_fraction: float) -> None:
        self._train, self._val = writers["train"], writers["val"]
        self._seed = seed
        self._fraction = val_fraction
        self._held: tuple[float, np.ndarray] | None = None  # the best validation candidate while val is empty

    def add(self, digest: bytes, ids: np.ndarray) -> None:
        score = _val_score(self._seed, digest)
        if score < self._fraction:
            self._val.add(ids)
            self._release()
        elif self._val.num_documents or (self._held is not None and score >= self._held[0]):
            self._train.add(ids)
        else:
            self._release()
            self._held = (score, ids.copy())

    def finish(self) -> None:
        if self._held is None:
            return
        ids, self._held = self._held[1], None
        if self._val.num_documents:
            self._train.add(ids)
        elif self._train.num_documents:
            self._val.add(ids)
        else:
            # The whole corpus is one document (one big .txt, like tinyshakespeare): split it by position as
            # nanoGPT does, the last max(val_fraction, 10%) of its tokens for validation.
            cut = int(len(ids) * (1 - max(self._fraction, SINGLE_DOCUMENT_VAL_FRACTION)))
            self._train.add(ids[:cut])
            self._val.add(ids[cut:])

    def _release(self) -> None:
        if self._held is not None:
            self._train.add(self._held[1])
            self._held = None


class _ShardWriter:
    """Appends documents to {split}_{i:05d}.bin (+ .idx.npy), starting a new shard past `shard_tokens`."""

    def __init__(self, out: Path, split: str, dtype: str, shard_tokens: int) -> None:
        self._out = out
        self._split = split
        self._dtype = np.dtype(dtype).newbyteorder("<")
        self._shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []  # meta.json entries of the closed shards
        self.num_documents = 0
        self._file = None
        self._starts: list[int] = []
        self._tokens = 0

    def add(self, ids: np.ndarray) -> None:
        if self._file is None:
            self._file = open(self._tmp(self._name(".bin")), "wb")  # noqa: SIM115 - closed in _close_shard
        self._starts.append(self._tokens)
        self._file.write(ids.astype(self._dtype, copy=False).tobytes())
        self._tokens += len(ids)
        self.num_documents += 1
        if self._tokens >= self._shard_tokens:
            self._close_shard()

    def close(self) -> None:
        if self._file is not None:
            self._close_shard()

    def _name(self, suffix: str) -> str:
        return f"{self._split}_{len(self.shards):05d}{suffix}"

    def _tmp(self, name: str) -> Path:
        return self._out / (name + ".tmp")

    def _close_shard(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        bin_name, idx_name = self._name(".bin"), self._name(".idx.npy")
        os.replace(self._tmp(bin_name), self._out / bin_name)
        with open(self._tmp(idx_name), "wb") as f:
            np.save(f, np.asarray(self._starts, dtype=np.int64))
        os.replace(self._tmp(idx_name), self._out / idx_name)
        self.shards.append({"file": bin_name, "num_tokens": self._tokens, "num_documents": len(self._starts)})
        self._starts, self._tokens = [], 0


def _remove_stale_shards(out: Path, keep: set[str]) -> None:
    """Shards of an earlier run into the same folder that this run did not overwrite."""
    for split in SPLITS:
        for path in out.glob(f"{split}_[0-9][0-9][0-9][0-9][0-9].bin"):
            if path.name not in keep:
                path.unlink()
                path.with_name(path.name.removesuffix(".bin") + ".idx.npy").unlink(missing_ok=True)
