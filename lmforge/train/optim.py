"""AdamW with nanoGPT's parameter groups, and the learning-rate schedule as a pure function."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.train.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up to lr, then cosine to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    decay = cfg.decay_steps or total_steps
    if step >= decay:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay 2-D matmul weights only; norms, biases and embeddings are not decayed.

    Embedding weights are 2-D but are lookup tables, not projections (decaying them hurts rare tokens);
    a tied lm_head shares the embedding's tensor, so it follows the embedding.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def fused_available(device: torch.device) -> bool:
    """Whether torch has a fused AdamW kernel for this device type (CUDA, and CPU since torch 2.4)."""
    try:
        probe = torch.zeros(1, device=device, requires_grad=True)
        torch.optim.AdamW([probe], fused=True)
        return True
    except (RuntimeError, ValueError):
        return False


def make_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    fused = cfg.fused and fused_available(device)
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        fused=fused or None,
        foreach=None if fused else True,
    )
