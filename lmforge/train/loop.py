"""The one training loop. Pretraining, fine-tuning, classification and distillation hand it a model, a batch
source and a loss function; everything else (accumulation, clipping, schedule, evaluation, early stopping,
checkpoints, exact resume, DDP/FSDP, mixed precision, logging) happens here, once.

    for step in steps:                     # nanoGPT's train.py, minus its globals
        lr = lr_at(step)
        for micro in range(grad_accum):    # DDP syncs gradients on the last micro-step only
            loss = loss_fn(model, batches.next_batch()) / grad_accum; loss.backward()
        clip; optimizer.step(); zero_grad
        maybe evaluate / early-stop / checkpoint

Resume is exact: the checkpoint holds the weights (HF folder), and per rank the optimizer, the RNG states
(torch, CUDA, Python, NumPy), the batch source's position, the step and the early-stopping counters, so
steps k+1..n after a resume are bitwise the steps of an uninterrupted run (on CPU, same thread count). A
partly frozen model (LoRA) keeps its trained parameters in train_state too: its HF folder is merged weights.

Distributed setup (process group, device per rank) lives here rather than in runtime.py until runtime grows
it; under `torchrun` every rank runs the same code and rank 0 alone prints, logs and writes the HF folder.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from lmforge import checkpoint, runtime
from lmforge.errors import UserError
from lmforge.train.config import TrainConfig
from lmforge.train.logging import RunLogger
from lmforge.train.optim import lr_at, make_optimizer

STATE_DIR = "train_state"
MODEL_DIR = "model"


class Batches(Protocol):
    """What the loop needs from a data source: the next batch and a resumable position.

    A source that pads its rows also sets `last_batch_tokens`, the real (non-padding) tokens of the batch it
    just returned, so the logged tokens and tokens/s count work done rather than padding; without it every
    position of the batch's first tensor counts (pretraining windows have no padding)."""

    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


LossFn = Callable[[nn.Module, Any], torch.Tensor]
EvalFn = Callable[[nn.Module], float]


# --------------------------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Dist:
    """This process's place in the job. mode: "none" (one process), "ddp" or "fsdp"."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mode: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(cfg: TrainConfig) -> Dist:
    """Decide device, threads and seeds once, and join the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    device = runtime.resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # Ranks on one machine split its cores: oversubscribed CPU threads slow everything down many times.
    threads = cfg.threads or int(os.environ.get("LMFORGE_THREADS", "0"))
    runtime.set_threads(threads or max(1, (os.cpu_count() or 1) // local_world))
    mode = "none"
    if world > 1:
        mode = "fsdp" if cfg.distributed == "fsdp" else "ddp"
        if not tdist.is_initialized():
            tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    runtime.seed_everything(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    return Dist(rank, world, local_rank, device, mode)


def teardown(dist: Dist) -> None:
    if dist.mode != "none" and tdist.is_initialized():
        tdist.destroy_process_group()


def _autocast(cfg: TrainConfig, device: torch.device) -> Callable[[], AbstractContextManager]:
    """bf16 autocast on CUDA (weights and optimizer stay fp32); plain fp32 on CPU."""
    dtype = runtime.resolve_dtype(cfg.dtype, device)
    if dtype == torch.float32:
        return nullcontext
    if device.type != "cuda":
        raise UserError(f"dtype {cfg.dtype} training needs CUDA; on {device.type} use dtype=float32")
    return lambda: torch.autocast(device_type="cuda", dtype=dtype)


def _wrap(model: nn.Module, cfg: TrainConfig, dist: Dist) -> nn.Module:
    """The module the steps run: compiled and/or DDP/FSDP-wrapped. Checkpoints save `model`, never this."""
    if dist.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in getattr(model, "layers", []):
            fully_shard(layer)
        fully_shard(model)  # shards in place: `model` itself now holds DTensor parameters
    run = torch.compile(model) if cfg.compile else model
    if dist.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [dist.device.index] if dist.device.type == "cuda" else None
        run = DistributedDataParallel(run, device_ids=ids)
    return run


# --------------------------------------------------------------------------------------------- state


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    best_val_loss: float = math.inf
    bad_evals: int = 0  # evaluations since the best one (early stopping)
    elapsed_s: float = 0.0  # wall time spent in train() so far, over all resumes
    tokens: int = 0  # tokens trained on, all ranks


@dataclass
class TrainResult:
    state: TrainState
    val_loss: float | None  # the last evaluation's
    stopped: str  # "max_steps" | "early_stop" | "time_limit"
    model_dir: Path | None  # the HF folder written at the end (rank 0)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _model_state(model: nn.Module, dist: Dist) -> dict[str, torch.Tensor]:
    """Full (unsharded) weights on CPU; every rank must call it under FSDP."""
    if dist.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_checkpoint(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    state: TrainState,
    dist: Dist,
    tokenizer: Any,
    run_config: dict[str, Any] | None,
) -> Path:
    """HF folder (rank 0) then every rank's train_state/rank{r}.pt, each written under a temp name and renamed."""
    folder = run_dir / MODEL_DIR
    weights = _model_state(model, dist)
    if dist.is_main:
        if dist.mode == "fsdp":  # a plain CPU copy to hand checkpoint.save
            from lmforge.models.gpt import GPT

            with torch.device("meta"):
                plain = GPT(model.config)
            plain.load_state_dict(weights, assign=True)
            model = plain
        metrics = {"step": state.step, "best_val_loss": _finite(state.best_val_loss), "tokens": state.tokens}
        checkpoint.save(folder, model, tokenizer, run_config=run_config, metrics=metrics)
    blob = {
        "step": state.step,
        "train_state": asdict(state),
        "optimizer": optimizer.state_dict(),
        "batches": batches.state_dict(),
        "rng": _rng_state(),
        "world_size": dist.world_size,
        "trained": _trained_state(model, dist),
    }
    states = run_dir / STATE_DIR
    states.mkdir(parents=True, exist_ok=True)
    path = states / f"rank{dist.rank}.pt"
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)
    if dist.mode != "none":
        tdist.barrier()
    return folder


def _trained_state(model: nn.Module, dist: Dist) -> dict[str, torch.Tensor] | None:
    """The trained parameters of a partly frozen model (LoRA: the adapters), else None.

    The HF folder holds what the model is, which for LoRA is merged weights that cannot be split back into
    base and adapters; so a partly frozen model resumes from the frozen part its caller rebuilds (the base
    model) plus these tensors. They are small next to the optimizer state, which is twice their size.
    """
    params = dict(model.named_parameters())
    if dist.mode == "fsdp" or all(p.requires_grad for p in params.values()):
        return None
    return {name: p.detach().cpu() for name, p in params.items() if p.requires_grad}


def _load_trained_state(model: nn.Module, trained: dict[str, torch.Tensor], path: Path) -> None:
    params = dict(model.named_parameters())
    now = {name: tuple(p.shape) for name, p in params.items() if p.requires_grad}
    if now != {name: tuple(t.shape) for name, t in trained.items()}:
        raise UserError(
            f"{path} trained other parameters than this run does; resume with the run's method and settings"
        )
    with torch.no_grad():
        for name, t in trained.items():
            params[name].copy_(t)


def _load_weights(folder: Path, step: int, model: nn.Module, dist: Dist) -> None:
    """The model's weights from the run's HF folder, which must be the one written with train_state's step."""
    meta = json.loads((folder / "lmforge.json").read_text(encoding="utf-8"))
    saved_step = (meta.get("metrics") or {}).get("step")
    if saved_step != step:
        raise UserError(
            f"{folder} holds step {saved_step} but train_state step {step}: the run was killed while "
            "checkpointing; start it again without --resume"
        )
    saved = checkpoint.load(folder)
    if dist.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, saved.model.state_dict(), options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(saved.model.state_dict())


def load_checkpoint(
    run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, batches: Batches, dist: Dist
) -> TrainState:
    """Restore what save_checkpoint wrote: the weights from the HF folder, or for a partly frozen model its
    trained parameters from train_state (the frozen ones are as the caller built them)."""
    path = run_dir / STATE_DIR / f"rank{dist.rank}.pt"
    if not path.is_file():
        raise UserError(f"nothing to resume: {path} does not exist (train without --resume to start over)")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if blob["world_size"] != dist.world_size:
        raise UserError(
            f"{run_dir} was trained with {blob['world_size']} processes; resume it with the same number"
        )
    if blob.get("trained") is None:
        _load_weights(run_dir / MODEL_DIR, blob["step"], model, dist)
    else:
        _load_trained_state(model, blob["trained"], path)
    optimizer.load_state_dict(blob["optimizer"])
    batches.load_state_dict(blob["batches"])
    _set_rng_state(blob["rng"])
    return TrainState(**blob["train_state"])


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple | list):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _mean_over_ranks(x: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.mode == "none":
        return x
    x = x.clone()
    tdist.all_reduce(x)  # SUM: gloo has no AVG
    return x / dist.world_size


def _batch_tokens(batches: Batches, batch: Any) -> int:
    """The real tokens of the batch just drawn (see `Batches`)."""
    reported = getattr(batches, "last_batch_tokens", None)
    if reported is not None:
        return int(reported)
    while not isinstance(batch, torch.Tensor):  # the first tensor of a tuple, list or dict batch
        batch = next(iter(batch.values() if isinstance(batch, dict) else batch))
    return batch.numel()


def _sum_over_ranks(value: int, dist: Dist) -> int:
    if dist.mode == "none":
        return value
    t = torch.tensor([value], device=dist.device if dist.device.type == "cuda" else "cpu")
    tdist.all_reduce(t)
    return int(t.item())


def _from_rank0(value: int, dist: Dist) -> int:
    """Rank 0's value on every rank: clocks differ by a few ms between processes, decisions must not."""
    if dist.mode == "none":
        return value
    t = torch.tensor([value], device=dist.device if dist.device.type == "cuda" else "cpu")
    tdist.broadcast(t, src=0)
    return int(t.item())


def _horizon(cfg: TrainConfig, state: TrainState, dist: Dist) -> int:
    """The step the schedule decays to: max_steps, or with a time budget, the steps that fit in it at the
    pace so far, so that the learning rate reaches min_lr when time runs out rather than stopping mid-cosine.
    (A time-limited run's schedule thus depends on the clock, and its resume is not bitwise exact.)"""
    if not cfg.max_minutes or state.step < 10:
        return cfg.max_steps
    fits = int(cfg.max_minutes * 60 * state.step / max(state.elapsed_s, 1e-9))
    return _from_rank0(min(cfg.max_steps, max(fits, state.step + 1)), dist)


# --------------------------------------------------------------------------------------------- the loop


def train(
    model: nn.Module,
    batches: Batches,
    cfg: TrainConfig,
    loss_fn: LossFn,
    *,
    tokenizer: Any,
    eval_fn: EvalFn | None = None,
    dist: Dist | None = None,
    resume: bool = False,
    run_config: dict[str, Any] | None = None,
) -> TrainResult:
    """Train `model` on `batches` with `loss_fn(model, batch) -> scalar loss` until max_steps, the time limit
    or early stopping; checkpoints and logs go to cfg.out_dir. `eval_fn(model) -> val loss` runs under
    no_grad in eval mode. Returns the final state; the model is trained in place.
    """
    dist = dist or Dist(device=runtime.resolve_device(cfg.device))
    run_dir = Path(cfg.out_dir)
    device = dist.device
    model.to(device)
    autocast = _autocast(cfg, device)
    running = _wrap(model, cfg, dist)
    optimizer = make_optimizer(model, cfg.optim, device)
    if resume:
        state = load_checkpoint(run_dir, model, optimizer, batches, dist)
    else:
        state = TrainState()
        if dist.rank:  # setup() seeded every rank alike (same init); dropout should differ between ranks
            torch.manual_seed(torch.initial_seed() + dist.rank)
    logger = RunLogger(run_dir, cfg, enabled=dist.is_main, start_step=state.step)
    accum, ddp = cfg.grad_accum, dist.mode == "ddp"
    val_loss: float | None = None
    stopped = "max_steps"
    model.train()
    t_start = time.perf_counter() - state.elapsed_s
    try:
        while state.step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(state.step, cfg.optim, _horizon(cfg, state, dist))
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            tokens = 0
            for micro in range(accum):
                batch = batches.next_batch()
                tokens += _batch_tokens(batches, batch)
                batch = _to_device(batch, device)
                # DDP all-reduces gradients inside backward; skip it on all but the last micro-step.
                sync = nullcontext() if (micro == accum - 1 or not ddp) else running.no_sync()
                with sync:
                    with autocast():
                        loss = loss_fn(running, batch)
                    (loss / accum).backward()
                loss_sum += loss.detach().float()
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train_loss = float(_mean_over_ranks(loss_sum / accum, dist))
            state.step += 1
            tokens = _sum_over_ranks(tokens, dist)
            state.tokens += tokens
            now = time.perf_counter()
            state.elapsed_s = now - t_start
            if not math.isfinite(train_loss):
                raise UserError(
                    f"loss became {train_loss} at step {state.step}; lower optim.lr or raise optim.warmup_steps"
                )

            last = state.step == cfg.max_steps
            if cfg.max_minutes and _from_rank0(state.elapsed_s >= cfg.max_minutes * 60, dist):
                stopped = "time_limit"
            evaluated = None
            periodic = cfg.eval_every and state.step % cfg.eval_every == 0
            if eval_fn is not None and (periodic or last or stopped != "max_steps"):
                evaluated = val_loss = _evaluate(model, eval_fn, autocast)
                if val_loss < state.best_val_loss - cfg.early_stop_min_delta:
                    state.best_val_loss, state.bad_evals = val_loss, 0
                else:
                    state.bad_evals += 1
                if cfg.early_stop_patience and state.bad_evals >= cfg.early_stop_patience:
                    stopped = "early_stop" if stopped == "max_steps" else stopped
            done = last or stopped != "max_steps"
            logger.step(
                state.step,
                loss=train_loss,
                lr=lr,
                tokens_per_s=tokens / max(now - t0, 1e-9),
                elapsed_s=state.elapsed_s,
                val_loss=evaluated,
                force=done,
            )
            if done:
                break
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                save_checkpoint(run_dir, model, optimizer, batches, state, dist, tokenizer, run_config)
        if eval_fn is not None and val_loss is None:  # resumed at the very end
            val_loss = _evaluate(model, eval_fn, autocast)
        model_dir = save_checkpoint(run_dir, model, optimizer, batches, state, dist, tokenizer, run_config)
    except KeyboardInterrupt:
        logger.close(status="interrupted")
        raise
    except BaseException:
        logger.close(status="failed")
        raise
    logger.close(status=stopped, best_val_loss=_finite(state.best_val_loss))
    return TrainResult(state, val_loss, stopped, model_dir if dist.is_main else None)


def _evaluate(model: nn.Module, eval_fn: EvalFn, autocast: Callable[[], AbstractContextManager]) -> float:
    model.eval()
    try:
        with torch.no_grad(), autocast():
            return float(eval_fn(model))
    finally:
        model.train()
