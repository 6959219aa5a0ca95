"""--resume continues exactly: after a SIGKILL past the step-8 checkpoint, steps 9..12 of the resumed run
are bitwise the steps of an uninterrupted run (CPU, one thread, dropout on so the RNG state matters)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from lmforge.train import runs

CHILD = Path(__file__).with_name("resume_child.py")
REPO = Path(__file__).resolve().parents[2]


def child(data, out_dir, home, kill_at=0, resume=False):
    env = {**os.environ, "LMFORGE_HOME": str(home), "PYTHONPATH": str(REPO)}
    args = [sys.executable, str(CHILD), str(data), str(out_dir), str(kill_at), "1" if resume else "0"]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_sigkill_is_bitwise_exact(tmp_path, word_data):
    home = tmp_path / "home"
    full = child(word_data, tmp_path / "full", home)
    assert full.returncode == 0, full.stderr[-3000:]

    # grad_accum=2: training loss call 21 is the first micro-step of step 11 (checkpoint at step 8).
    killed = child(word_data, tmp_path / "killed", home, kill_at=21)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [r["step"] for r in metrics(tmp_path / "killed")] == list(range(1, 11))
    assert runs.info(tmp_path / "killed").status == "killed"  # status.json says running; the pid is gone

    resumed = child(word_data, tmp_path / "killed", home, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "killed")
    assert [r["step"] for r in b] == list(range(1, 13))
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == rb["loss"], (ra, rb)  # bitwise: floats written with full precision
        assert ra["lr"] == rb["lr"]
        assert ra.get("val_loss") == rb.get("val_loss")
    assert full.stdout.split()[-2:] == resumed.stdout.split()[-2:]  # steps and final val loss
    assert json.loads((tmp_path / "killed" / "status.json").read_text())["status"] == "max_steps"


def test_resume_without_checkpoint_is_a_user_error(tmp_path, word_data):
    proc = child(word_data, tmp_path / "none", tmp_path / "home", resume=True)
    assert proc.returncode == 1 and "nothing to resume" in proc.stderr
