"""The loop's pure parts and policies: schedule, parameter groups, fused vs foreach AdamW, early stopping,
the time limit. Uses an in-memory batch source, so the loop is tested apart from the data pipeline."""

import json
import math

import pytest
import torch

from lmforge import config_io
from lmforge.models.config import ModelConfig
from lmforge.models.gpt import build_model
from lmforge.train import loop
from lmforge.train.config import OptimConfig, TrainConfig
from lmforge.train.logging import read_metrics
from lmforge.train.losses import next_token_loss
from lmforge.train.optim import lr_at, make_optimizer, param_groups
from lmforge.train.pretrain import byte_tokenizer
from tests.train.conftest import TINY


class RandomBatches:
    """Deterministic random (x, y) per step, resumable by step."""

    def __init__(self, batch_size=4, seq_len=16, vocab=257):
        self.step, self.shape, self.vocab = 0, (batch_size, seq_len + 1), vocab

    def next_batch(self):
        g = torch.Generator().manual_seed(self.step)
        self.step += 1
        w = torch.randint(0, self.vocab, self.shape, generator=g)
        return w[:, :-1], w[:, 1:]

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


def _cfg(tmp_path, *overrides):
    return config_io.load(TrainConfig, TINY, [f"out_dir={tmp_path / 'run'}", "seq_len=16", *overrides])


def _model(cfg):
    torch.manual_seed(0)
    return build_model(cfg.model.replace(vocab_size=257)).train()


def test_schedule_is_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    lrs = [lr_at(s, cfg, 110) for s in range(120)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # halfway through the decay: (lr + min_lr) / 2
    assert lrs[110] == lrs[119] == 0.1
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_weight_decay_on_matmul_weights_only():
    model = build_model(TrainConfig().model.replace(vocab_size=100, tie_embeddings=True))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("proj.weight") for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"embed_tokens.weight", "norm.weight"}
    n_params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == n_params  # each once


def test_fused_adamw_matches_foreach():
    """The fast path (fused kernel) against its slow twin (foreach) over 5 steps."""
    cfg = ModelConfig(vocab_size=64, n_layer=1, n_embd=32, n_head=2, max_seq_len=16)
    models = [build_model(cfg) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [
        make_optimizer(m, OptimConfig(fused=f), torch.device("cpu"))
        for m, f in zip(models, (True, False), strict=True)
    ]
    assert opts[0].defaults["fused"] and opts[1].defaults["foreach"]
    x = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        for m, o in zip(models, opts, strict=True):
            next_token_loss(m, (x[:, :-1], x[:, 1:])).backward()
            o.step()
            o.zero_grad()
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values(), strict=True):
        diff = (a - b).abs()
        assert diff.max() <= 1e-6, f"{name}: max {diff.max():.2e} mean {diff.mean():.2e}"


def test_compile_is_off_by_default():
    assert TrainConfig().compile is False
    assert config_io.load(TrainConfig, TINY).compile is False


def test_early_stopping(tmp_path):
    cfg = _cfg(
        tmp_path, "max_steps=100", "eval_every=2", "early_stop_patience=3", "early_stop_min_delta=0.01"
    )
    vals = iter([3.0, 2.5, 2.495, 2.6, 2.7, 1.0])  # improves twice, then 3 evaluations within min_delta

    result = loop.train(
        _model(cfg),
        RandomBatches(),
        cfg,
        next_token_loss,
        tokenizer=byte_tokenizer(),
        eval_fn=lambda m: next(vals),
    )
    assert result.stopped == "early_stop" and result.state.step == 10
    assert result.state.best_val_loss == 2.5 and result.val_loss == 2.7
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "early_stop" and status["step"] == 10


def test_time_limit_stops_gracefully(tmp_path):
    cfg = _cfg(tmp_path, "max_steps=100000", "max_minutes=0.0001", "eval_every=0")  # 6 ms
    result = loop.train(_model(cfg), RandomBatches(), cfg, next_token_loss, tokenizer=byte_tokenizer())
    assert result.stopped == "time_limit" and 0 < result.state.step < 100000
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()  # the final checkpoint is written


def test_diverging_loss_is_reported(tmp_path):
    cfg = _cfg(tmp_path, "max_steps=5")

    def nan_loss(model, batch):
        return next_token_loss(model, batch) * math.nan

    with pytest.raises(Exception, match="loss became nan at step 1"):
        loop.train(_model(cfg), RandomBatches(), cfg, nan_loss, tokenizer=byte_tokenizer())
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "failed"


def test_bf16_on_cpu_is_refused(tmp_path):
    cfg = _cfg(tmp_path, "dtype=bfloat16", "device=cpu")
    with pytest.raises(Exception, match="needs CUDA"):
        loop.train(_model(cfg), RandomBatches(), cfg, next_token_loss, tokenizer=byte_tokenizer())


class PaddedBatches(RandomBatches):
    """RandomBatches that report fewer real tokens than positions, as padded chat batches do."""

    def next_batch(self):
        self.last_batch_tokens = 5 + self.step
        return super().next_batch()


class OneSecondClock:
    """Stands in for the loop's `time` module: every reading is one second after the last."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 1.0
        return self.now


@pytest.mark.parametrize("padded", [False, True])
def test_tokens_and_tokens_per_s_count_real_tokens(tmp_path, monkeypatch, padded):
    """The logged tokens/s and the tokens total count what a padding source reports; a source without padding
    (pretraining windows) counts every position, batch x seq_len x grad_accum per step as before."""
    cfg = _cfg(tmp_path, "max_steps=3", "grad_accum=2", "eval_every=0")
    monkeypatch.setattr(loop, "time", OneSecondClock())  # each step then takes exactly one second
    source = PaddedBatches if padded else RandomBatches
    batches = source(batch_size=cfg.batch_size, seq_len=cfg.seq_len)
    result = loop.train(_model(cfg), batches, cfg, next_token_loss, tokenizer=byte_tokenizer())
    per_step = [5 + 6, 7 + 8, 9 + 10] if padded else [cfg.tokens_per_step] * 3
    assert [r["tokens_per_s"] for r in read_metrics(tmp_path / "run")] == per_step
    assert result.state.tokens == sum(per_step)
    saved = json.loads((tmp_path / "run" / "model" / "lmforge.json").read_text())
    assert saved["metrics"]["tokens"] == sum(per_step)
