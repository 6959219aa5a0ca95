"""Fixtures for the training tests: a small synthetic corpus prepared by the real `data.prepare`, and the CLI
in a subprocess."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "debug" / "tiny.yaml"
WORDS = "the cat sat on a mat while dogs ran past big red houses near quiet green fields".split()


@pytest.fixture(scope="session")
def word_data(tmp_path_factory) -> Path:
    """Byte-level shards of 400 documents of random words from a 16-word list: the unigram (byte) entropy is
    ~2.7 nats, but a model that learns the spelling needs only ~0.5 nats per byte."""
    root = tmp_path_factory.mktemp("words")
    rng = random.Random(0)
    corpus = root / "corpus.jsonl"
    with corpus.open("w") as f:
        for _ in range(400):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
            f.write(json.dumps({"text": text}) + "\n")
    from lmforge.data.prepare import PrepareConfig, run

    out = root / "data"
    run(PrepareConfig(inputs=(str(corpus),), out=str(out), tokenizer="bytes", val_fraction=0.1, workers=1))
    return out


def unigram_entropy(data_dir: Path, split: str = "train") -> float:
    """Entropy (nats) of the token frequencies of a split: the loss of the best context-free model."""
    from lmforge.data.loader import TokenShards

    ids = np.concatenate([np.asarray(s) for s in TokenShards(data_dir, split).shards])
    p = np.bincount(ids) / len(ids)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def cli(*args, cwd: Path, home: Path, timeout: float = 120, env: dict | None = None):
    env = {**os.environ, "LMFORGE_HOME": str(home), "LMFORGE_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def assert_user_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
