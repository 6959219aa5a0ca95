"""Losses as pure functions of tensors; `next_token_loss` is the loss_fn pretraining hands the loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # targets with this id (padding, prompt tokens) carry no loss


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every target that is not IGNORE_INDEX. logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def next_token_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Language-model loss of a (x, y) batch where y is x shifted one token left."""
    x, y = batch
    return cross_entropy(model(x), y)
