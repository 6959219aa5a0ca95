"""Child process of test_resume: a tiny pretraining run that SIGKILLs itself mid-run when asked.

    python resume_child.py DATA OUT_DIR KILL_AT_CALL RESUME

KILL_AT_CALL > 0: the process kills itself (SIGKILL: no cleanup, no atexit) at that training loss call.
"""

import os
import signal
import sys
from pathlib import Path

from lmforge import config_io
from lmforge.train import pretrain
from lmforge.train.config import TrainConfig

data, out_dir, kill_at, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
tiny = Path(__file__).resolve().parents[2] / "recipes" / "debug" / "tiny.yaml"
overrides = ["max_steps=12", "checkpoint_every=4", "eval_every=4", "grad_accum=2", "model.dropout=0.1"]
cfg = config_io.load(TrainConfig, tiny, [f"data={data}", f"out_dir={out_dir}", *overrides])

calls = 0
loss_fn = pretrain.next_token_loss


def killing_loss(model, batch):
    global calls
    if model.training:
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    return loss_fn(model, batch)


pretrain.next_token_loss = killing_loss
result = pretrain.run(cfg, resume=resume)
print(f"done {result.steps} {result.val_loss!r}")
