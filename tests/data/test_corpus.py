"""Corpus reading: normalisation rules, dedup/empty counts, bad input handling, input resolution."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmforge.data.corpus import Corpus, CorpusStats, normalise, resolve_inputs
from lmforge.errors import UserError


def test_normalise_rules():
    assert normalise("a\r\nb") == "a\nb"
    assert normalise("a\x00b\x1b[0m\tc\x7f") == "ab[0m\tc"
    assert normalise("e\u0301") == "\u00e9"  # NFC
    assert normalise("x  \ny\t\n") == "x\ny\n"
    assert normalise("a\n\n\n\n\nb") == "a\n\nb"
    assert normalise("a\n   \n \n\nb") == "a\n\nb"  # blank lines made of spaces collapse too


@given(st.text())
def test_normalise_is_idempotent(text):
    once = normalise(text)
    assert normalise(once) == once
    assert "\r" not in once and "\n\n\n" not in once


def _docs(tmp_path, files: dict[str, str | bytes], **kw) -> tuple[list[str], CorpusStats]:
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    stats = CorpusStats()
    corpus = Corpus(tuple(resolve_inputs([str(tmp_path / n) for n in files])), **kw)
    return [d.text for d in corpus.documents(stats)], stats


def test_empty_and_duplicate_counts_exact(tmp_path):
    lines = [{"text": t} for t in ["one", "two", "one", "", "  \n", "one  ", "three", "two"]]
    docs, stats = _docs(
        tmp_path,
        {"a.jsonl": "\n".join(json.dumps(r) for r in lines) + "\n", "b.txt": "two", "c.md": "\n\n"},
    )
    assert docs == ["one", "two", "three"]
    assert (stats.documents_read, stats.dropped_empty, stats.dropped_duplicate) == (10, 3, 4)


def test_bad_inputs_are_counted_with_file_and_line(tmp_path):
    jsonl = '{"text": "ok"}\n{broken\n{"body": "x"}\n' + '{"text": "caf\xe9"}\n'
    files = {"a.jsonl": jsonl.encode("latin-1"), "b.txt": b"fine\nline two \xff\n", "c.py": "print(1)\n"}
    docs, stats = _docs(tmp_path, files)
    assert docs == ["ok", "print(1)\n"]
    found = {(b.file.rsplit("/", 1)[-1], b.line) for b in stats.bad_inputs}
    assert found == {("a.jsonl", 2), ("a.jsonl", 3), ("a.jsonl", 4), ("b.txt", 2)}
    assert stats.bad_input_count == 4


def test_strict_raises_naming_file_and_line(tmp_path):
    with pytest.raises(UserError, match=r"a\.jsonl:2: broken JSON"):
        _docs(tmp_path, {"a.jsonl": '{"text": "ok"}\n{broken\n'}, strict=True)


def test_parquet_rows_are_documents(tmp_path):
    table = pa.table({"body": ["first", None, "second", "first"], "n": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "x.parquet", row_group_size=2)
    stats = CorpusStats()
    corpus = Corpus((tmp_path / "x.parquet",), text_column="body")
    assert [d.text for d in corpus.documents(stats)] == ["first", "second"]
    assert (stats.dropped_empty, stats.dropped_duplicate) == (1, 1)
    stats = CorpusStats()
    assert list(Corpus((tmp_path / "x.parquet",)).documents(stats)) == []
    assert "no string column 'text'" in stats.bad_inputs[0].reason


def test_max_documents_and_custom_text_field(tmp_path):
    lines = "\n".join(json.dumps({"content": f"doc {i}"}) for i in range(10))
    docs, _ = _docs(tmp_path, {"a.jsonl": lines}, text_field="content", max_documents=3)
    assert docs == ["doc 0", "doc 1", "doc 2"]


def test_resolve_inputs(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.txt", "a.txt", "sub/c.md", ".hidden"):
        (tmp_path / name).write_text("x")
    assert [p.name for p in resolve_inputs([str(tmp_path)])] == ["a.txt", "b.txt", "c.md"]
    assert [p.name for p in resolve_inputs([str(tmp_path / "*.txt")])] == ["a.txt", "b.txt"]
    with pytest.raises(UserError, match="no files match"):
        resolve_inputs([str(tmp_path / "*.parquet")])
    with pytest.raises(UserError, match="no such file"):
        resolve_inputs([str(tmp_path / "missing.txt")])
    with pytest.raises(UserError, match="no inputs matched"):
        resolve_inputs([])
    with pytest.raises(UserError, match="unknown source"):
        resolve_inputs([], "python-stdlb")


def test_python_stdlib_source():
    paths = resolve_inputs([], "python-stdlib")
    assert len(paths) > 100 and all(p.suffix == ".py" for p in paths)
    assert not any("site-packages" in p.parts for p in paths)
