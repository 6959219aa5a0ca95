"""Device, dtype and thread decisions, made once at an entry point and passed down.

Dtype policy: weights and activations run in the resolved dtype ("auto" = bfloat16 on CUDA with bf16
support, float32 otherwise — CPU bf16 matmuls are slower than fp32 on most x86 parts); norms, RoPE
angles, softmax inside SDPA and the returned logits are float32 whatever the model dtype.
"""

from __future__ import annotations

import ctypes
import os
import random
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from lmforge.errors import UserError

T = TypeVar("T")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
DTYPES |= {"float16": torch.float16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return DTYPES[name]


def set_threads(n: int | None = None) -> None:
    """Use n intra-op threads (default: $LMFORGE_THREADS or all cores). Processes sharing a machine
    should split the cores between them: oversubscribed PyTorch CPU threads slow everything 30x."""
    n = n or int(os.environ.get("LMFORGE_THREADS", "0")) or os.cpu_count() or 1
    torch.set_num_threads(n)


def run_in_thread(fn: Callable[[], T]) -> T:
    """fn() on a short-lived thread: its result, or its exception re-raised here.

    For the torch set-up ahead of a long-running torch thread (the serving engine's). GNU OpenMP gives each
    thread that runs parallel work a team of its own, alive as long as that thread, and once its threads
    outnumber the cores it stops spinning at barriers and sleeps there instead. Loading on the main thread
    left that thread's team behind for good: the engine thread then switched 1,300-1,800 times a second
    instead of 2-7, and its 16-sequence decode step ran ~10% slower (bench/RESULTS.md).
    """
    with ThreadPoolExecutor(1, thread_name_prefix="lmforge-setup") as pool:  # leaving it joins the thread
        return pool.submit(fn).result()


def name_os_thread(name: str) -> None:
    """Give the calling thread `name` (15 bytes at most) in the OS, where `top -H`, `ps -L` and /proc show it;
    the threads it starts inherit it, so the serving engine's OpenMP team shows as the engine. Linux only."""
    if sys.platform == "linux":
        try:
            ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
        except (OSError, AttributeError):  # a libc without prctl: the name is only a convenience
            pass


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
