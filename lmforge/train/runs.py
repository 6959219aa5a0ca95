"""`lmforge runs list|show|plot`: read the run folders `lmforge train` leaves in runs/ (see train/logging.py)."""

from __future__ import annotations

import difflib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge import atomic
from lmforge.errors import UserError
from lmforge.train.logging import CONFIG, STATUS, read_metrics


@dataclass
class RunInfo:
    name: str
    path: Path
    step: int
    max_steps: int | None
    best_val_loss: float | None
    status: str  # running | max_steps | early_stop | time_limit | failed | interrupted | killed | unknown


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def info(path: Path) -> RunInfo:
    rows = read_metrics(path)
    try:
        status = json.loads((path / STATUS).read_text())
    except (OSError, ValueError):
        status = {}
    state = status.get("status", "unknown")
    if state == "running" and not _pid_alive(int(status.get("pid", -1))):
        state = "killed"  # SIGKILL, OOM, power loss: nothing got to write the final status
    vals = [r["val_loss"] for r in rows if isinstance(r.get("val_loss"), int | float)]
    return RunInfo(
        name=path.name,
        path=path,
        step=rows[-1]["step"] if rows else 0,
        max_steps=status.get("max_steps"),
        best_val_loss=min(vals) if vals else None,
        status=state,
    )


def list_runs(runs_dir: str | Path = "runs") -> list[RunInfo]:
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    return [info(p) for p in sorted(root.iterdir()) if p.is_dir() and (p / CONFIG).is_file()]


def find(run: str, runs_dir: str | Path = "runs") -> Path:
    """A run by name (inside runs_dir) or by path."""
    path = Path(run)
    if (path / CONFIG).is_file():
        return path
    path = Path(runs_dir) / run
    if (path / CONFIG).is_file():
        return path
    known = [r.name for r in list_runs(runs_dir)]
    close = difflib.get_close_matches(run, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UserError(f"no run {run!r} in {runs_dir}/: {hint}`lmforge runs list` shows the runs")


def show(path: Path, last: int = 5) -> dict[str, Any]:
    """The run's resolved config (YAML text), its status and its last metrics rows."""
    return {
        "config": (path / CONFIG).read_text(encoding="utf-8"),
        "info": info(path),
        "metrics": read_metrics(path)[-last:],
    }


def plot(path: Path, out: Path | None = None) -> Path:
    """PNG of train/val loss and learning rate against step, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(path)
    if not rows:
        raise UserError(f"{path} has no metrics yet; plot it once training has logged a step")
    out = Path(out) if out is not None else path / "loss.png"
    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    ax_loss.plot(steps, [r["loss"] for r in rows], label="train", linewidth=1)
    val = [(r["step"], r["val_loss"]) for r in rows if isinstance(r.get("val_loss"), int | float)]
    if val:
        ax_loss.plot(*zip(*val, strict=True), "o-", label="val", linewidth=1.5, markersize=3)
    finite = [r["loss"] for r in rows if math.isfinite(r["loss"])]
    if finite:
        ax_loss.set_ylim(top=max(finite[len(finite) // 20 :] or finite) * 1.05)  # skip the first steps' spike
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.set_title(path.name)
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [r["lr"] for r in rows], color="tab:green", linewidth=1)
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    return atomic.save_figure(fig, out)
