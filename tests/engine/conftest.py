"""Engine test fixtures: the tiny Llama the batched-vs-alone tests share, and random prompts for it."""

import random

import pytest
import torch

from lmforge.models.config import ModelConfig
from lmforge.models.gpt import build_model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64, max_seq_len=256
    )
    model = build_model(cfg)
    with torch.no_grad():  # larger weights: peaked, far-from-tied logits so greedy is robust to rounding
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model.eval()


def random_prompts(n, seed, lo=3, hi=60, vocab=97):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
