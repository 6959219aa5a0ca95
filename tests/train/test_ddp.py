"""DDP and FSDP: 2 CPU processes under torchrun (gloo, one thread each) follow the same loss trajectory as one
process with the same global batch through gradient accumulation (the loader's rank contract: rank k's
batch is micro-batch k of the single process's batch)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lmforge import config_io
from lmforge.data.loader import BatchLoader, TokenShards
from lmforge.train import loop, pretrain
from lmforge.train.config import TrainConfig
from tests.train.conftest import REPO, TINY

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
B, STEPS = 4, 8


class MicroBatches:
    """One process standing in for N ranks: a loader of N*B rows, handed out as N micro-batches of B."""

    def __init__(self, loader: BatchLoader, n: int):
        self.loader, self.n, self.pending = loader, n, []

    def next_batch(self):
        if not self.pending:
            x, y = self.loader.next_batch()
            self.pending = list(zip(x.split(B), y.split(B), strict=True))
        return self.pending.pop(0)

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


OVERRIDES = [f"batch_size={B}", f"max_steps={STEPS}", "eval_every=4", "threads=1"]


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, word_data):
    """Metrics of 1 process: global batch 2B as 2 accumulated micro-batches of B."""
    tmp = tmp_path_factory.mktemp("one")
    overrides = [f"data={word_data}", *OVERRIDES]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMFORGE_HOME", str(tmp / "home"))
        cfg = config_io.load(TrainConfig, TINY, [*overrides, "grad_accum=2", f"out_dir={tmp / 'one'}"])
        dist = loop.setup(cfg)
        meta = pretrain.read_meta(word_data)
        model = pretrain.build(cfg, meta)
        loader = BatchLoader(TokenShards(word_data, "train"), 2 * B, cfg.seq_len, seed=cfg.seed)
        val = TokenShards(word_data, "val")
        # The evaluation must match too: 2 ranks score halves of global batches of 2B windows.
        eval_cfg = config_io.load(TrainConfig, TINY, [*overrides, f"batch_size={2 * B}"])
        loop.train(
            model,
            MicroBatches(loader, 2),
            cfg,
            pretrain.next_token_loss,
            tokenizer=pretrain.load_tokenizer(word_data, meta),
            eval_fn=lambda m: pretrain.val_loss(m, val, eval_cfg, dist),
            dist=dist,
        )
    return _rows(tmp / "one")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_with_accumulation(tmp_path, word_data, one_process, mode):
    env = {
        **os.environ,
        "LMFORGE_HOME": str(tmp_path / "home"),
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "lmforge", "train", "-c", str(TINY), f"data={word_data}", *OVERRIDES]
    cmd += [f"distributed={mode}", f"out_dir={tmp_path / mode}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / mode / "train_state" / "rank1.pt").is_file()  # every rank writes its state
    assert proc.stdout.count("model stored as") == 1  # rank 0 alone prints

    ranks, one = _rows(tmp_path / mode), one_process
    assert [r["step"] for r in ranks] == [r["step"] for r in one] == list(range(1, STEPS + 1))
    for key in ("loss", "val_loss"):
        a = torch.tensor([r[key] for r in ranks if key in r], dtype=torch.float64)
        b = torch.tensor([r[key] for r in one if key in r], dtype=torch.float64)
        rel = ((a - b).abs() / b.abs()).max()
        assert len(a) == len(b) > 0 and rel <= 1e-5, f"{key}: max relative difference {rel:.2e}\n{a}\n{b}"
