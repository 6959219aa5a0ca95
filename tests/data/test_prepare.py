"""`data prepare` end to end: shards decode back to the normalised input, byte for byte, for both vocabularies."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.bpe import ByteTokenizer, train_bpe
from lmforge.data.corpus import normalise
from lmforge.data.prepare import PrepareConfig, run
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError

CHINESE = (
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。\n"
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。\n"
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。\n"
    "数据准备阶段把文本切成词元，训练循环再随机取窗口。人工智能模型需要大量高质量的中文语料。\n"
)


def _write_corpus(folder: Path) -> list[str]:
    """A small mixed corpus; returns the documents prepare should keep, normalised, in order."""
    folder.mkdir()
    docs = [
        f"Document {i}: the quick brown fox 数据 {i * 7}\r\njumps  \n\n\n\nover {i}.\n" for i in range(40)
    ]
    (folder / "a.jsonl").write_text(
        "\n".join(json.dumps({"text": d}, ensure_ascii=False) for d in docs[:30] + [docs[3], ""]) + "\n",
        encoding="utf-8",
    )
    (folder / "b.txt").write_text(docs[30] + "<|endoftext|> is plain text here", encoding="utf-8")
    (folder / "c.md").write_text(CHINESE, encoding="utf-8")
    (folder / "d.py").write_text("def f(x):\n\treturn x  # tab kept\n", encoding="utf-8")
    for i, d in enumerate(docs[31:]):
        (folder / f"e{i}.txt").write_text(d, encoding="utf-8")
    expected = docs[:30] + [
        docs[30] + "<|endoftext|> is plain text here",
        CHINESE,
        "def f(x):\n\treturn x  # tab kept\n",
    ]
    return [normalise(d) for d in expected + docs[31:]]


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, list[str]]:
    folder = tmp_path / "in"
    return folder, _write_corpus(folder)


def _decoded(out: Path, split: str) -> list[str]:
    """The documents of a split: each shard read as np.memmap, cut at the idx offsets, eot checked, decoded."""
    meta = json.loads((out / "meta.json").read_text())
    tok = ByteTokenizer() if meta["tokenizer"] == "bytes" else Tokenizer.from_folder(out / meta["tokenizer"])
    docs = []
    for shard in meta["splits"][split]:
        ids = np.memmap(out / shard["file"], dtype=np.dtype(meta["dtype"]).newbyteorder("<"), mode="r")
        assert len(ids) == shard["num_tokens"]
        starts = np.load(out / shard["file"].replace(".bin", ".idx.npy"))
        assert starts.dtype == np.int64 and len(starts) == shard["num_documents"]
        assert np.flatnonzero(ids == meta["eot_id"]).tolist() == [*(starts[1:] - 1), len(ids) - 1]
        for a, b in zip(starts, [*starts[1:], len(ids)], strict=True):
            docs.append(tok.decode(ids[a : b - 1].tolist()))
    return docs


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_shards_decode_to_normalised_input(corpus, tmp_path, tokenizer):
    folder, expected = corpus
    out = tmp_path / "out"
    cfg = PrepareConfig(
        inputs=[str(folder)],
        out=str(out),
        tokenizer=tokenizer,
        vocab_size=400,
        shard_tokens=300,
        workers=1,
        val_fraction=0.1,
        seed=3,
    )
    summary = run(cfg)
    train, val = _decoded(out, "train"), _decoded(out, "val")
    assert sorted(train + val) == sorted(expected)
    assert val and [d for d in expected if d in val] == val  # validation keeps input order
    assert summary.shards["train"] > 1  # tiny shard_tokens: several shards
    assert (summary.documents_read, summary.dropped_empty, summary.dropped_duplicate) == (
        len(expected) + 2,
        1,
        1,
    )
    assert summary.documents == {"train": len(train), "val": len(val)}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["format"] == 1
    assert sum(s["num_tokens"] for s in meta["splits"]["train"]) == summary.tokens["train"]
    assert json.loads((out / "summary.json").read_text())["tokens"] == summary.tokens
    if tokenizer == "bytes":
        assert (meta["vocab_size"], meta["eot_id"], meta["tokenizer"]) == (257, 256, "bytes")
        assert not (out / "tokenizer").exists()
    else:
        assert meta["tokenizer"] == "tokenizer" and meta["vocab_size"] <= 400


def test_reruns_and_worker_counts_give_identical_bytes(corpus, tmp_path):
    folder, _ = corpus
    outs = []
    for i, workers in enumerate([1, 1, 2]):
        out = tmp_path / f"out{i}"
        run(
            PrepareConfig(
                inputs=[str(folder)], out=str(out), vocab_size=300, shard_tokens=500, workers=workers
            )
        )
        outs.append(out)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert Path("tokenizer/tokenizer.json") in files
    for other in outs[1:]:
        assert sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file()) == files
        for f in files:
            if f.name != "summary.json":  # it names the output folder
                assert (outs[0] / f).read_bytes() == (other / f).read_bytes(), f


def test_rerun_into_same_folder_removes_stale_shards(corpus, tmp_path):
    folder, _ = corpus
    out = tmp_path / "out"
    run(PrepareConfig(inputs=[str(folder)], out=str(out), tokenizer="bytes", shard_tokens=100, workers=1))
    many = len(list(out.glob("train_*.bin")))
    run(PrepareConfig(inputs=[str(folder)], out=str(out), tokenizer="bytes", workers=1))
    assert many > 1 and sorted(p.name for p in out.glob("*.bin")) == ["train_00000.bin", "val_00000.bin"]


def test_chinese_bpe_round_trips():
    tok = train_bpe(iter([CHINESE * 3, "English text, 12345 digits."]), vocab_size=400)
    text = CHINESE + "未登录的字：龘 and emoji 🎉 1234567"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode("2024") == [tok.token_to_id(c) for c in "2024"]  # digits split one by one
    assert tok.eos_id == tok.token_to_id("<|endoftext|>") == 0


def test_bad_inputs_reported_and_strict_raises(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "one"}\n{oops\n{"text": "two"}\n{"text": "three"}\n')
    (folder / "b.txt").write_bytes(b"caf\xe9\n")
    summary = run(PrepareConfig(inputs=[str(folder)], out=str(tmp_path / "o"), tokenizer="bytes", workers=1))
    assert summary.bad_input_count == 2
    assert {(Path(b.file).name, b.line) for b in summary.bad_inputs} == {("a.jsonl", 2), ("b.txt", 1)}
    assert "a.jsonl:2: broken JSON" in summary.format()
    for tokenizer in ("bytes", "bpe"):
        cfg = PrepareConfig(
            inputs=[str(folder)], out=str(tmp_path / "s"), tokenizer=tokenizer, workers=1, strict=True
        )
        with pytest.raises(UserError, match=r"a\.jsonl:2: broken JSON"):
            run(cfg)


def test_user_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n{"text": "  "}\n')
    with pytest.raises(UserError, match="0 documents left after dropping 2 empty and 0 duplicates"):
        run(PrepareConfig(inputs=[str(tmp_path / "empty.jsonl")], out=str(tmp_path / "o"), workers=1))
    with pytest.raises(UserError, match="unknown tokenizer 'gpt5'"):
        run(PrepareConfig(inputs=[str(tmp_path / "empty.jsonl")], out=str(tmp_path / "o"), tokenizer="gpt5"))
    with pytest.raises(UserError, match="no such file"):
        run(PrepareConfig(inputs=[str(tmp_path / "nope.txt")], out=str(tmp_path / "o")))
    with pytest.raises(UserError, match="no inputs matched"):
        run(PrepareConfig(inputs=[], out=str(tmp_path / "o")))


@pytest.mark.parametrize(("tokenizer", "workers"), [("bytes", 1), ("bpe", 2)])
def test_pii_scrubbed_and_counted(tmp_path, tokenizer, workers):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "write to bob@example.com"})
        + "\n"
        + json.dumps({"text": "from 10.0.0.1 call 415-555-2671"})
    )
    out = tmp_path / "o"
    summary = run(
        PrepareConfig(
            inputs=[str(tmp_path / "a.jsonl")],
            out=str(out),
            tokenizer=tokenizer,
            scrub_pii=True,
            workers=workers,
        )
    )
    assert summary.scrubbed == {"EMAIL": 1, "IPV4": 1, "PHONE": 1}
    assert sorted(_decoded(out, "train") + _decoded(out, "val")) == [
        "from <IPV4> call <PHONE>",
        "write to <EMAIL>",
    ]


def test_reuses_a_saved_tokenizer(corpus, tmp_path):
    folder, expected = corpus
    tok = train_bpe(iter(expected), vocab_size=350)
    tok.save(tmp_path / "tok")
    for spec in (tok, str(tmp_path / "tok"), str(tmp_path / "tok" / "tokenizer.json")):
        out = tmp_path / "o"
        summary = run(PrepareConfig(inputs=[str(folder)], out=str(out), tokenizer=spec, workers=1))
        assert summary.eot_id == tok.eos_id and summary.vocab_size == tok.vocab_size
        assert sorted(_decoded(out, "train") + _decoded(out, "val")) == sorted(expected)


def test_python_stdlib_source(tmp_path):
    out = tmp_path / "o"
    summary = run(
        PrepareConfig(source="python-stdlib", out=str(out), tokenizer="bytes", max_documents=20, workers=1)
    )
    assert summary.documents["train"] + summary.documents["val"] == 20
    assert any("import" in d for d in _decoded(out, "train"))


def test_memory_stays_flat_while_streaming(tmp_path):
    """A scaled-down version of "1 GB corpus under 2 GB RSS": 40 MB of text adds far less than 40 MB of RSS."""
    script = textwrap.dedent(
        f"""
        import json, resource
        from pathlib import Path
        from lmforge.data.prepare import PrepareConfig, run
        src = Path({str(tmp_path)!r}) / "big.jsonl"
        with src.open("w") as f:
            for i in range(20_000):
                f.write(json.dumps({{"text": f"doc {{i}} " + "lorem ipsum dolor sit amet " * 75}}) + "\\n")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run(PrepareConfig(inputs=[str(src)], out={str(tmp_path / "o")!r}, tokenizer="bytes", workers=1))
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
        """
    )
    growth_mb = int(
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    )
    assert (tmp_path / "big.jsonl").stat().st_size > 40e6
    assert growth_mb < 25, f"RSS grew by {growth_mb} MB"


def test_single_document_is_split_by_position_like_nanogpt(tmp_path):
    text = "".join(f"line {i} of the only document\n" for i in range(200))
    (tmp_path / "one.txt").write_text(text)
    summary = run(
        PrepareConfig(inputs=[str(tmp_path / "one.txt")], out=str(tmp_path / "o"), tokenizer="bytes")
    )
    train = np.fromfile(tmp_path / "o" / "train_00000.bin", dtype="<u2")
    val = np.fromfile(tmp_path / "o" / "val_00000.bin", dtype="<u2")
    assert summary.documents == {"train": 1, "val": 1}
    assert len(train) == int((len(text) + 1) * 0.9)  # bytes + end-of-text token, first 90% to train
    assert bytes(np.concatenate([train, val[:-1]]).astype(np.uint8)) == text.encode() and val[-1] == 256


def test_everything_in_validation_is_a_user_error(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(2):
        (docs / f"d{i}.txt").write_text(f"document number {i}")
    cfg = PrepareConfig(inputs=[str(docs)], out=str(tmp_path / "o"), tokenizer="bytes", val_fraction=0.999)
    with pytest.raises(UserError, match="all 2 documents went to validation"):
        run(cfg)
