"""Pretraining end to end in-process: the model learns, the run folder is complete, the model is in the store
and transformers reads it with the same logits."""

import json

import pytest
import torch

from lmforge import checkpoint, config_io, store
from lmforge.train import pretrain
from lmforge.train.config import TrainConfig
from tests.train.conftest import TINY, unigram_entropy


def _cfg(tmp_path, data, *overrides):
    return config_io.load(TrainConfig, TINY, [f"data={data}", f"out_dir={tmp_path / 'run'}", *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, word_data):
    tmp = tmp_path_factory.mktemp("pretrain")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMFORGE_HOME", str(tmp / "home"))
        cfg = _cfg(tmp, word_data, "max_steps=120", "eval_every=40", "optim.lr=1e-2", "optim.min_lr=1e-3")
        result = pretrain.run(cfg)
        entry = store.list_models()
    return cfg, result, entry


def test_val_loss_well_below_unigram_entropy(trained, word_data):
    cfg, result, _ = trained
    entropy = unigram_entropy(word_data)
    # A context-free model cannot beat the unigram entropy (~2.7 nats); learning the words' spelling gets
    # ~0.5-0.7 nats. 0.4 x entropy leaves room for noise and still needs real sequence modelling.
    assert result.val_loss < 0.4 * entropy, (result.val_loss, entropy)
    assert result.steps == 120 and result.stopped == "max_steps"


def test_run_folder_and_store(trained):
    cfg, result, entries = trained
    run = result.run_dir
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 121))
    assert {"loss", "lr", "tokens_per_s", "elapsed_s"} <= rows[0].keys()
    assert [r["step"] for r in rows if "val_loss" in r] == [40, 80, 120]
    assert config_io.load(TrainConfig, run / "config.yaml") == cfg
    assert json.loads((run / "status.json").read_text())["status"] == "max_steps"
    assert (run / "train_state" / "rank0.pt").is_file()
    assert [e.name for e in entries] == ["tiny"] and entries[0].format == "hf"
    ck = checkpoint.load(entries[0].path)
    assert ck.tokenizer.encode("héllo") == list("héllo".encode())  # the byte vocabulary, as tokenizer.json
    assert ck.config.vocab_size == 257 and ck.eos_ids == {256}
    assert result.sample.strip(), "greedy sample is empty"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_saved_model_loads_in_transformers(tmp_path, word_data, monkeypatch, arch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    model = ["model.arch=gpt2", "model.norm=layernorm", "model.norm_bias=true", "model.mlp=gelu"]
    model += ["model.activation=gelu_new", "model.pos_embedding=learned", "model.qkv_bias=true"]
    model += ["model.attn_out_bias=true", "model.mlp_bias=true", "model.tie_embeddings=true"]
    cfg = _cfg(
        tmp_path,
        word_data,
        "max_steps=5",
        "eval_every=0",
        "tensorboard=true",
        *(model if arch == "gpt2" else []),
    )
    result = pretrain.run(cfg)
    assert list((result.run_dir / "tb").glob("events.out.tfevents.*"))
    ours = checkpoint.load(result.model_dir).model
    hf = transformers.AutoModelForCausalLM.from_pretrained(result.model_dir, dtype=torch.float32).eval()
    x = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(x), hf(x).logits
    diff = (a - b).abs()
    assert diff.max() <= 1e-4, f"max {diff.max():.2e} mean {diff.mean():.2e}"
