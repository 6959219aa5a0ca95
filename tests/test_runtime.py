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


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="thread names are read from Linux's /proc")
def test_name_os_thread_names_the_thread_and_what_it_starts():
    def comm() -> str:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            return f.read().strip()

    def named() -> tuple[str, str]:
        runtime.name_os_thread("lmforge-a-long-thread-name")  # the OS keeps 15 bytes
        return comm(), runtime.run_in_thread(comm)  # a thread it starts inherits the name

    assert runtime.run_in_thread(named) == ("lmforge-a-long-", "lmforge-a-long-")
    assert comm() != "lmforge-a-long-"  # the caller's thread keeps its own


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
