"""What a run leaves behind besides weights, and what it shows while it runs.

Run folder (cfg.out_dir):
  config.yaml    the resolved TrainConfig (reload it with `lmforge train --config runs/NAME/config.yaml`)
  metrics.jsonl  one JSON object per logged step: step, loss, lr, tokens_per_s, elapsed_s, and val_loss on
                 evaluation steps (floats written with full precision, so runs compare bitwise)
  status.json    running | max_steps | early_stop | time_limit | failed | interrupted, with pid and step
  tb/            TensorBoard events (when cfg.tensorboard)
Only rank 0 writes; on other ranks RunLogger does nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lmforge import atomic, config_io
from lmforge.train.config import TrainConfig

METRICS = "metrics.jsonl"
STATUS = "status.json"
CONFIG = "config.yaml"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows in step order, the last row kept where a step was logged twice."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    rows: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows[row["step"]] = row
    return [rows[k] for k in sorted(rows)]


class RunLogger:
    def __init__(self, run_dir: Path, cfg: TrainConfig, *, enabled: bool = True, start_step: int = 0):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.total = cfg.max_steps
        self._writer = None
        self._progress = None
        self._last_print = 0.0
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.run_dir / CONFIG, config_io.dump(cfg))
        # A resumed run redoes the steps after its checkpoint: drop what the interrupted run logged past it.
        kept = [r for r in read_metrics(self.run_dir) if r["step"] <= start_step]
        atomic.write_text(self.run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in kept))
        self._metrics = open(self.run_dir / METRICS, "a", encoding="utf-8")  # noqa: SIM115 (closed in close)
        self._status("running", step=start_step)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1)
        from rich.console import Console

        self.console = Console(stderr=True)
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]} tok/s"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._progress.add_task(
                cfg.name, total=self.total, completed=start_step, loss="-", lr="-", speed="-"
            )
            self._progress.start()

    def _status(self, status: str, **extra: Any) -> None:
        info = {
            "status": status,
            "pid": os.getpid(),
            "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "max_steps": self.total,
            **extra,
        }
        atomic.write_text(self.run_dir / STATUS, json.dumps(info) + "\n")

    def step(
        self,
        step: int,
        *,
        loss: float,
        lr: float,
        tokens_per_s: float,
        elapsed_s: float,
        val_loss: float | None = None,
        force: bool = False,
    ) -> None:
        if not self.enabled:
            return
        if step % self.cfg.log_every and val_loss is None and not force:
            return
        row = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": round(tokens_per_s, 1)}
        row["elapsed_s"] = round(elapsed_s, 3)
        if val_loss is not None:
            row["val_loss"] = val_loss
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if self._writer is not None:
            self._writer.add_scalar("loss/train", loss, step)
            self._writer.add_scalar("lr", lr, step)
            self._writer.add_scalar("tokens_per_s", tokens_per_s, step)
            if val_loss is not None:
                self._writer.add_scalar("loss/val", val_loss, step)
        if self._progress is not None:
            self._progress.update(
                self._task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", speed=f"{tokens_per_s:,.0f}"
            )
            if val_loss is not None:
                self._progress.console.print(f"step {step}: val loss {val_loss:.4f}")
            return
        # Not a terminal (a log file, CI): a plain line every few seconds and at every evaluation.
        now = time.monotonic()
        if val_loss is not None or force or now - self._last_print > 10:
            self._last_print = now
            val = f"  val loss {val_loss:.4f}" if val_loss is not None else ""
            print(
                f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s{val}",
                file=sys.stderr,
                flush=True,
            )

    def close(self, status: str, **extra: Any) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        if self._writer is not None:
            self._writer.close()
        self._metrics.close()
        rows = read_metrics(self.run_dir)
        self._status(status, step=rows[-1]["step"] if rows else 0, **extra)
