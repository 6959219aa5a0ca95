"""The CLI end to end in subprocesses: real model, real store, bad input gives one line and exit code 2."""

import os
import subprocess
import sys

import pytest

from lmforge import checkpoint
from lmforge.models.config import ModelConfig
from lmforge.models.gpt import build_model


def run(*args, home, timeout=300):
    env = {**os.environ, "LMFORGE_HOME": str(home), "LMFORGE_THREADS": "2"}
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def assert_user_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def store_entries(home):
    models = home / "models"
    return sorted(p.name for p in models.iterdir()) if models.exists() else []


@pytest.fixture(scope="module")
def home(tmp_path_factory, smollm2_gguf):
    home = tmp_path_factory.mktemp("home")
    proc = run("pull", str(smollm2_gguf), "--name", "smol", home=home)
    assert proc.returncode == 0, proc.stderr
    return home


@pytest.fixture(scope="module")
def tiny_ctx_model(tmp_path_factory, smollm2):
    """A 1-layer model with a 32-token context and SmolLM2's tokenizer."""
    cfg = ModelConfig(vocab_size=smollm2.config.vocab_size, n_layer=1, n_head=2, n_embd=16, max_seq_len=32)
    folder = tmp_path_factory.mktemp("tiny") / "tiny"
    return checkpoint.save(folder, build_model(cfg), smollm2.tokenizer)


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, lmforge.cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    proc = subprocess.run([sys.executable, "-m", "lmforge", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "generate" in proc.stdout


def test_runtime_never_imports_transformers(smollm2_gguf):
    code = (
        "import sys; from lmforge import checkpoint; from lmforge.engine.generate import generate;"
        "from lmforge.engine.types import SamplingParams as P;"
        f"ck = checkpoint.load({str(smollm2_gguf)!r});"
        "list(generate(ck.model, ck.tokenizer.encode('Hi'), P(max_tokens=2)));"
        "bad = [m for m in ('transformers', 'peft', 'accelerate') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_models_lists_pulled(home):
    proc = run("models", home=home)
    assert proc.returncode == 0 and "smol" in proc.stdout and "gguf" in proc.stdout


def test_generate_greedy_streams_text(home, smollm2):
    proc = run("generate", "smol", "The capital of France is", "-t", "0", "-n", "8", home=home)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The capital of France is Paris")


def test_generate_seed_repeats(home):
    args = ("generate", "smol", "Once upon a time", "-t", "1.0", "-n", "12", "--seed", "7")
    a, b = run(*args, home=home), run(*args, home=home)
    assert a.returncode == 0 and a.stdout == b.stdout


def test_generate_stop_string(home):
    proc = run("generate", "smol", "Count: 1, 2, 3,", "-t", "0", "-n", "30", "--stop", "6", home=home)
    assert proc.returncode == 0
    completion = proc.stdout.removeprefix("Count: 1, 2, 3,")
    assert "6" not in completion and "5" in completion


def test_chat_multi_turn_with_reset(home):
    env = {**os.environ, "LMFORGE_HOME": str(home)}
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge", "chat", "smol", "-t", "0", "-n", "20"],
        input="What is the capital of France?\n/reset\n/exit\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout and "conversation cleared" in proc.stderr


def test_unknown_model(home):
    assert_user_error(run("generate", "no-such-model", "hi", home=home), "no-such-model", "lmforge pull")


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--kv-cache-mb", "0"),
        ("--kv-cache-mb", "nan"),
        ("--dense-decode-mb", "-1"),
        ("--dense-decode-mb", "inf"),
        ("--batch-wait-ms", "-2"),
        ("--batch-wait-ms", "nan"),
    ],
)
def test_bad_serve_memory_and_wait_options(home, flag, value):
    assert_user_error(run("serve", "--no-auth", flag, value, home=home), flag)


def test_bad_sampling_parameter(home):
    assert_user_error(run("generate", "smol", "hi", "--temperature", "5", home=home), "temperature")


def test_prompt_longer_than_context(home, tiny_ctx_model):
    proc = run("generate", str(tiny_ctx_model), "word " * 50, home=home)
    assert_user_error(proc, "51 tokens", "32 tokens", "at least 20 tokens")


@pytest.mark.parametrize("cut", [100, 5_000_000, -1000])
def test_truncated_gguf_is_refused_and_store_untouched(home, tmp_path, smollm2_gguf, cut):
    data = smollm2_gguf.read_bytes()
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(data[:cut])
    before = store_entries(home)
    assert_user_error(run("pull", str(bad), home=home), "broken.gguf")
    assert store_entries(home) == before
    assert_user_error(run("generate", str(bad), "hi", home=home), "broken.gguf")


def test_corrupt_gguf_magic(home, tmp_path):
    bad = tmp_path / "notgguf.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 4096)
    assert_user_error(run("generate", str(bad), "hi", home=home), "GGUF")


def test_truncated_safetensors_is_refused_and_store_untouched(home, tmp_path, tiny_ctx_model):
    import shutil

    bad = tmp_path / "badfolder"
    shutil.copytree(tiny_ctx_model, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    before = store_entries(home)
    assert_user_error(run("pull", str(bad), home=home), "truncated")
    assert store_entries(home) == before
    assert_user_error(run("generate", str(bad), "hi", home=home), "truncated")


def test_hf_pull_without_network_is_one_line(home):
    before = store_entries(home)
    proc = run("pull", "hf:HuggingFaceTB/SmolLM2-135M-Instruct", home=home, timeout=120)
    assert_user_error(proc, "hf:HuggingFaceTB/SmolLM2-135M-Instruct")
    assert store_entries(home) == before
