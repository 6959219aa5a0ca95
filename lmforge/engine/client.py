"""AsyncEngine: the EngineClient the server talks to. The step loop runs on its own thread; the asyncio side
only enqueues commands and drains per-request queues, so a slow client never stalls the batch."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from lmforge import runtime
from lmforge.engine.engine import LLMEngine
from lmforge.engine.types import (
    EngineDraining,
    EngineOverloaded,
    EngineStats,
    ModelInfo,
    RequestOutput,
    SamplingParams,
)

log = logging.getLogger("lmforge.engine")

T = TypeVar("T")


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    salt: str
    lora: str | None


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: Future


class AsyncEngine:
    def __init__(self, engine: LLMEngine, name: str, *, max_waiting: int = 256, batch_wait_s: float = 0.0):
        self.engine = engine
        self.max_waiting = max_waiting
        self.batch_wait_s = batch_wait_s
        cfg = engine.model_config
        self._info = ModelInfo(name, cfg.max_seq_len, cfg.vocab_size, int(time.time()))
        self._commands: queue.SimpleQueue[_Add | _Abort | _Call | None] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()  # guards _streams (loop thread and event loop) and _arriving
        self._thread: threading.Thread | None = None
        self._running = False
        self._draining = False
        self._stats = engine.stats(ready=False)
        self._step_started: float | None = None  # see EngineStats.step_started
        self._step_s = (0.0, 0.0)  # the last two steps' lengths
        self._arriving = 0  # requests on their way to generate() (see arriving())

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._running = True
            self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
            self._thread.start()

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop admitting, let running requests finish for up to `drain_timeout` seconds, abort the rest, stop."""
        self._draining = True
        deadline = time.monotonic() + drain_timeout
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for rid in list(self._streams):
            await self.abort(rid)
        self._running = False
        self._commands.put(None)
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)
            self._thread = None
        while not self._commands.empty():  # calls that came as the loop stopped: never to run
            cmd = self._commands.get_nowait()
            if isinstance(cmd, _Call) and cmd.future.set_running_or_notify_cancel():
                cmd.future.set_exception(EngineDraining("the server is shutting down"))

    # -- EngineClient ----------------------------------------------------------------------------------------

    async def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        request_id: str,
        *,
        salt: str = "",
        lora: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        if self._draining or not self._running:
            raise EngineDraining(
                "the server is shutting down" if self._draining else "the engine is not running"
            )
        # in flight = running + waiting; beyond max_num_seqs a request waits, and only max_waiting may
        capacity = self.engine.config.max_num_seqs + self.max_waiting
        if len(self._streams) >= capacity:
            raise EngineOverloaded(
                f"{len(self._streams)} requests are in flight (limit {capacity}); retry shortly"
            )
        self.engine.check_request(prompt_ids, params, lora)  # UserError now, before the request is queued
        out_queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = (asyncio.get_running_loop(), out_queue)
        self._send(_Add(request_id, list(prompt_ids), params, salt, lora))
        finished = False
        try:
            while True:
                item = await out_queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:  # the consumer left early (client disconnected, stop string): free the sequence
                self._send(_Abort(request_id))

    async def abort(self, request_id: str) -> None:
        self._send(_Abort(request_id))

    async def run(self, fn: Callable[[], T]) -> T:
        if not self._running:
            raise EngineDraining("the engine is not running")
        future: Future[T] = Future()
        self._send(_Call(fn, future))
        return await asyncio.wrap_future(future)

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        with self._lock:
            self._arriving += 1
        try:
            yield
        finally:
            with self._lock:
                self._arriving -= 1
                last = not self._arriving
            if last:  # a gather waiting on it starts its quiet gap again: the request's send may be a loop turn away
                self._wake.set()

    def health(self) -> EngineStats:
        return dataclasses.replace(
            self._stats,
            ready=self._running and not self._draining,
            draining=self._draining,
            step_started=self._step_started,
            step_s=min(self._step_s),
        )

    def model_info(self) -> ModelInfo:
        # adapters are added before start(), but perhaps after this object was built
        return dataclasses.replace(self._info, loras=self.engine.lora_names)

    # -- the engine thread -----------------------------------------------------------------------------------

    def _send(self, command: _Add | _Abort | _Call) -> None:
        self._commands.put(command)
        self._wake.set()

    def _loop(self) -> None:
        runtime.name_os_thread("lmforge-engine")  # and so its OpenMP team: top -H tells engine from server
        engine = self.engine
        self._stats = engine.stats()
        while self._running:
            if not engine.has_unfinished:  # idle: wait for work, then for the rest of its burst
                self._stats = engine.stats()
                if self._wake.wait(timeout=0.5):
                    self._wake.clear()
                    self._gather()
            self._apply_commands()
            if not engine.has_unfinished:
                continue
            self._step_started = started = time.monotonic()
            try:
                outputs = engine.step()
            except Exception as e:  # a bug, not bad input: fail the requests in flight, keep serving
                log.exception("engine step failed")
                for rid in list(engine.requests):
                    engine.abort(rid)
                    self._deliver(rid, e)
                continue
            finally:
                self._step_started, self._step_s = None, (self._step_s[1], time.monotonic() - started)
            self._deliver_all(outputs)
            self._stats = engine.stats()

    def _gather(self) -> None:
        """Coming out of idle, let the rest of a burst arrive before the first step: requests that arrive
        together (clients answered by the same step) reach the engine spread over a few ms of HTTP parsing,
        tokenising and metering, and an engine that steps on the first would run it nearly alone and make the
        rest wait a whole step. Waits while commands keep coming `batch_wait_s` apart, or while requests are on
        their way (`arriving`: a prompt being rendered, an admit in the ledger's queue), at most 10x that."""
        if self.batch_wait_s <= 0:
            return
        deadline = time.monotonic() + 10 * self.batch_wait_s
        while (left := deadline - time.monotonic()) > 0:
            if self._wake.wait(timeout=min(self.batch_wait_s, left)):
                self._wake.clear()
            elif not self._arriving:  # quiet for batch_wait_s, and nothing on its way
                return

    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                if cmd.request_id not in self._streams:  # aborted before it reached the engine
                    continue
                try:
                    self.engine.add_request(cmd.request_id, cmd.prompt_ids, cmd.params, cmd.salt, cmd.lora)
                except Exception as e:
                    self._deliver(cmd.request_id, e)
            elif isinstance(cmd, _Abort):
                self.engine.abort(cmd.request_id)
            elif isinstance(cmd, _Call) and cmd.future.set_running_or_notify_cancel():  # skipped if cancelled
                try:
                    cmd.future.set_result(cmd.fn())
                except Exception as e:
                    cmd.future.set_exception(e)

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs: one wake-up of each event loop for all of them (a step of 16 sequences used to
        write to the loop's self-pipe 16 times)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        with self._lock:
            for out in outputs:
                target = self._streams.get(out.request_id)
                if target is not None:
                    by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, out_queue = target
            loop.call_soon_threadsafe(out_queue.put_nowait, item)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for out_queue, item in items:
        out_queue.put_nowait(item)
