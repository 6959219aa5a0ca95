"""The ledger thread: the request path's database work (reading a key the process has not cached, admit,
settle) on one thread per server, with settles group-committed.

One thread, not a pool: the ledger writes serialise anyway (SQLite's write lock, PostgreSQL's locks on the
tenant's month and the key's window), and fewer threads trading the GIL with the engine's thread leave it more
of the CPU (bench/serve.py --metered, 16 clients: metered/unmetered 0.865x -> 0.922x on SQLite, 0.835x -> 0.909x
on PostgreSQL; two threads: 0.916x, 0.889x).

Group commit: a settle waits in a queue until the thread's next turn, which settles everything queued by then in
one transaction (`metering.settle_many`). The requests an engine step finishes end in the same event-loop turn,
so they share one commit instead of taking one each. Every caller still waits for its own batch's commit: a
response goes out only once its ledger row is final, as with a transaction per settle.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from lmforge import runtime
from lmforge.serve import metering
from lmforge.serve.db import Database

T = TypeVar("T")

MAX_BATCH = 64  # settles per transaction: keeps each transaction (and the locks it holds) short


class Ledger:
    """One server's ledger thread, started on first use and stopped by `close()` (the app's lifespan end)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._executor: ThreadPoolExecutor | None = None
        # the queue is filled on the event loop and emptied on the ledger thread
        self._lock = threading.Lock()
        self._queue: list[tuple[dict[str, Any], Future[None]]] = []
        self._flush_queued = False

    def _thread(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                1, "lmforge-ledger", initializer=runtime.name_os_thread, initargs=("lmforge-ledger",)
            )
        return self._executor

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """`fn(*args)` on the ledger thread."""
        return asyncio.get_running_loop().run_in_executor(self._thread(), fn, *args)

    def settle(self, settlement: dict[str, Any]) -> asyncio.Future[None]:
        """Settle a request (`metering.settlement()`) with the next group commit; the future is done once it is
        committed, or holds the error that stopped it."""
        future: Future[None] = Future()
        with self._lock:
            self._queue.append((settlement, future))
            flush = not self._flush_queued
            self._flush_queued = True
        if flush:  # submitted after this loop turn, so the other requests ending in it join the same batch
            asyncio.get_running_loop().call_soon(self._submit_flush)
        return asyncio.wrap_future(future)

    def _submit_flush(self) -> None:
        self._thread().submit(self._flush)

    def _flush(self) -> None:
        with self._lock:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            self._flush_queued = bool(self._queue)
        if self._flush_queued:
            self._submit_flush()
        try:
            metering.settle_many(self.db, [s for s, _ in batch])
            errors: list[BaseException | None] = [None] * len(batch)
        except Exception as e:
            if len(batch) == 1:
                errors = [e]
            else:  # one at a time, so a settle that cannot be made does not fail the others
                errors = [_attempt(self.db, s) for s, _ in batch]
        for (_, future), error in zip(batch, errors, strict=True):
            # a caller that stopped waiting (cancelled) has its request settled all the same
            if not future.set_running_or_notify_cancel():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

    def close(self) -> None:
        """Finish the queued work (every request has settled by now: uvicorn drained them) and stop the thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def _attempt(db: Database, settlement: dict[str, Any]) -> BaseException | None:
    try:
        metering.settle_many(db, [settlement])
    except Exception as e:
        return e
    return None
