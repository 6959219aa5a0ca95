import os
import threading
import time

import pytest
import torch

from lmforge import runtime
from lmforge.errors import UserError


def test_run_in_thread_returns_the_value_from_another_thread():
    assert runtime.run_in_thread(threading.get_ident) != threading.get_ident()
    assert runtime.run_in_thread(lambda: [1, 2]) == [1, 2]


def test_run_in_thread_reraises_the_exception():
    def fail():
        raise UserError("no such model: x")

    with pytest.raises(UserError, match="no such model: x"):
        runtime.run_in_thread(fail)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: PyTorch starts no OpenMP worker threads")
def test_run_in_thread_takes_its_openmp_team_with_it():
    # The point of run_in_thread for serving: parallel torch work done there leaves no OpenMP threads behind
    # to outnumber the cores beside the engine's own team.
    def tasks() -> int:
        return len(os.listdir("/proc/self/task"))

    def settled() -> int:
        """The thread count once it stops falling: OpenMP workers leave just after their master's thread."""
        n, deadline = tasks(), time.monotonic() + 5.0
        while time.monotonic() < deadline:
            time.sleep(0.05)
            if (m := tasks()) == n:
                break
            n = m
        return n

    def parallel_work() -> int:
        torch.set_num_threads(2)
        x = torch.randn(512, 512)
        (x @ x).sum()
        return tasks()

    runtime.run_in_thread(parallel_work)  # first use starts a process-wide helper thread, which stays
    before = settled()
    during = runtime.run_in_thread(parallel_work)
    assert during > before  # the set-up thread (and, where torch starts a team for it, its OpenMP workers)
    assert settled() == before
