"""The ledger thread: the request path's database work (reading a key the process has not cached, admit,
settle) on one thread per server, with admits and settles each done in batches.

One thread, not a pool: the ledger writes serialise anyway (SQLite's write lock, PostgreSQL's locks on the
tenant's month and the key's window), and fewer threads trading the GIL with the engine's thread leave it more
of the CPU (bench/serve.py --metered, 16 clients: metered/unmetered 0.865x -> 0.922x on SQLite, 0.835x -> 0.909x
on PostgreSQL; two threads: 0.916x, 0.889x).

Group commit: a settle waits in a queue until the thread's next turn, which settles everything queued by then in
one transaction (`metering.settle_many`). The requests an engine step finishes end in the same event-loop turn,
so they share one commit instead of taking one each. Every caller still waits for its own batch's commit: a
response goes out only once its ledger row is final, as with a transaction per settle.

Admits are batched the same way (`metering.admit_many`): the requests that arrive together (the clients an
engine step answered come back together) are admitted with one statement on PostgreSQL, each exactly as its own
admit would have been. A thread turn settles first, then admits: what the settles release is there for them.

An admit that comes while the engine is in the middle of a step waits for the turn that starts shortly before
the step should end (`ADMIT_LEAD_S`; `next_step_in`, at most `ADMIT_WAIT_MAX_S`): the request could not join
the engine's batch before then anyway, and the admits that come meanwhile share its statement. Under the
metered 1-token load (16 clients, PostgreSQL) admits went from 1.8 to 5.9 a batch, and the server's and
PostgreSQL's CPU from 4.5 to 3.6 ms a request (bench/RESULTS.md). Settles never wait: a response waits for its
settle. Between steps (an idle engine, an upstream model) nothing waits.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from lmforge import runtime
from lmforge.serve import metering
from lmforge.serve.db import Database

T = TypeVar("T")

MAX_BATCH = 64  # settles (admits) per transaction: keeps each transaction (and the locks it holds) short
ADMIT_LEAD_S = 0.008  # how long before the engine's step should end a waiting admit goes: its round trip
ADMIT_WAIT_MAX_S = 0.1  # the longest an admit waits (a step's length is only guessed from the ones before)


class Ledger:
    """One server's ledger thread, started on first use and stopped by `close()` (the app's lifespan end)."""

    def __init__(
        self,
        db: Database,
        next_step_in: Callable[[float], float] | None = None,
        on_batch: Callable[[str, int], None] | None = None,
    ) -> None:
        """`next_step_in(now)`: seconds until the engine's running step should end (0 between steps).
        `on_batch(kind, n)`: told of each batch ("admit" or "settle", its number of requests), on the thread."""
        self.db = db
        self.next_step_in = next_step_in
        self.on_batch = on_batch
        self._executor: ThreadPoolExecutor | None = None
        # the queue is filled on the event loop and emptied on the ledger thread
        self._lock = threading.Lock()
        self._settles: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._admits: list[tuple[dict[str, Any], asyncio.Future[metering.Admission]]] = []
        self._flush_queued = False  # a flush is submitted to the thread, or due (soon or at _timer)
        # the admits' flush while it waits for the engine's step to end
        self._timer: asyncio.TimerHandle | None = None

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
        return self._enqueue(self._settles, settlement, 0.0)

    def admit(
        self, request: dict[str, Any], *, at_step_end: bool = False
    ) -> asyncio.Future[metering.Admission]:
        """Admit a request (`metering.admit`'s keyword arguments but `db`) with the next batch of admits
        (`metering.admit_many`); the future holds its Admission or the refusal admit would raise. `at_step_end`:
        the request goes to this process's engine, so its admit may wait until shortly before the running step
        should end (see the module's doc)."""
        return self._enqueue(self._admits, request, self._admit_wait() if at_step_end else 0.0)

    def _enqueue(
        self, queue: list[tuple[Any, asyncio.Future[Any]]], item: Any, wait: float
    ) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            queue.append((item, future))
            flush = not self._flush_queued
            self._flush_queued = True
        # schedule a flush when none is due, or when the due one waits and this item must not (it goes now, with
        # the waiting admits); a live timer is dropped either way: a flush took what it waited for, or this one
        if flush or (wait <= 0 and self._timer is not None):
            self._cancel_timer()
            if wait > 0:
                self._timer = asyncio.get_running_loop().call_later(wait, self._timed_flush)
            else:  # after this loop turn, so the other requests ending in it join the same batch
                asyncio.get_running_loop().call_soon(self._submit_flush)
        return future

    def _admit_wait(self) -> float:
        if self.next_step_in is None:
            return 0.0
        return min(self.next_step_in(time.monotonic()) - ADMIT_LEAD_S, ADMIT_WAIT_MAX_S)

    def _timed_flush(self) -> None:
        self._timer = None
        self._submit_flush()

    def _cancel_timer(self) -> bool:
        """Drop the admits' waiting flush; whether there was one."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        return timer is not None

    def _submit_flush(self) -> None:
        self._thread().submit(self._flush)

    def _flush(self) -> None:
        with self._lock:
            settles, self._settles = self._settles[:MAX_BATCH], self._settles[MAX_BATCH:]
            admits, self._admits = self._admits[:MAX_BATCH], self._admits[MAX_BATCH:]
            self._flush_queued = bool(self._settles or self._admits)
        if self._flush_queued:
            self._submit_flush()
        if settles:  # first: what they release may be what the admits need
            self._settle(settles)
        # a caller that stopped waiting before its admit ran is not admitted (no hold left behind); one that stops
        # from here on finds its admit made, as if it had stopped a moment later (`_resolve` skips it)
        admits = [(request, future) for request, future in admits if not future.cancelled()]
        if admits:
            try:
                outcomes = metering.admit_many(self.db, [request for request, _ in admits])
            except Exception as e:  # noqa: BLE001 - not one request's refusal: every caller gets it
                outcomes = [e] * len(admits)
            self._count("admit", len(admits))
            _deliver([future for _, future in admits], outcomes)

    def _count(self, kind: str, n: int) -> None:
        # before the callers hear back: whoever a response reaches sees its batch counted
        if self.on_batch is not None:
            self.on_batch(kind, n)

    def _settle(self, batch: list[tuple[dict[str, Any], asyncio.Future[None]]]) -> None:
        try:
            metering.settle_many(self.db, [s for s, _ in batch])
            errors: list[BaseException | None] = [None] * len(batch)
        except Exception as e:
            if len(batch) == 1:
                errors = [e]
            else:  # one at a time, so a settle that cannot be made does not fail the others
                errors = [_attempt(self.db, s) for s, _ in batch]
        self._count("settle", len(batch))
        _deliver([future for _, future in batch], errors)

    def close(self) -> None:
        """Finish the queued work (every request has settled by now: uvicorn drained them) and stop the thread."""
        if self._cancel_timer():  # admits still waiting (their callers gone): flush them now
            self._submit_flush()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def _deliver(futures: list[asyncio.Future[Any]], outcomes: list[Any]) -> None:
    """Hand a batch's outcomes to the callers' event loop in one callback: one wake-up of the loop per batch,
    where a `concurrent.futures.Future` per caller (`asyncio.wrap_future`) would wake it once per caller."""
    loop = futures[0].get_loop()  # one server, one loop
    try:
        loop.call_soon_threadsafe(_resolve, futures, outcomes)
    except RuntimeError:
        pass  # the loop is closed: nobody waits any more (what was asked for was done all the same)


def _resolve(futures: list[asyncio.Future[Any]], outcomes: list[Any]) -> None:
    """Each future its outcome, on the loop: an exception is raised to its caller, anything else is its result
    (None for a settle). A caller that stopped waiting (cancelled) is skipped: what it asked for was done all
    the same."""
    for future, outcome in zip(futures, outcomes, strict=True):
        if future.done():
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


def _attempt(db: Database, settlement: dict[str, Any]) -> BaseException | None:
    try:
        metering.settle_many(db, [settlement])
    except Exception as e:
        return e
    return None
