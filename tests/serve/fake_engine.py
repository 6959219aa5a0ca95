"""A deterministic EngineClient for server tests: replays a script of token ids, one per step."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from lmforge.engine import EngineStats, ModelInfo, RequestOutput, SamplingParams, TokenLogprob

T = TypeVar("T")


@dataclass
class FakeEngine:
    """Generates `script` (cycled; the prompt itself when empty), one token per `delay` seconds.

    Honours max_tokens, stop_token_ids (unless ignore_eos) and abort; records requests and aborts. Set `fail`
    to an exception to have generate() raise it, `ready`/`draining` to shape health().
    """

    script: Sequence[int] = ()
    delay: float = 0.0
    max_seq_len: int = 2048
    vocab_size: int = 49152
    num_cached_tokens: int = 0
    fail: Exception | None = None
    ready: bool = True
    draining: bool = False
    num_waiting: int = 0
    requests: list[tuple[list[int], SamplingParams, str]] = field(default_factory=list)
    aborted: dict[str, float] = field(default_factory=dict)  # request id -> when abort() was called
    closed: list[str] = field(default_factory=list)  # generators closed before finishing
    running: set[str] = field(default_factory=set)
    arrivals: int = 0  # arriving() entered
    arriving_now: int = 0  # ... and not left yet

    def reset(self) -> None:
        self.script, self.delay, self.num_cached_tokens, self.fail = (), 0.0, 0, None
        self.ready, self.draining, self.num_waiting = True, False, 0
        self.requests.clear()
        self.aborted.clear()
        self.closed.clear()
        self.arrivals = self.arriving_now = 0

    async def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        request_id: str,
        *,
        salt: str = "",
        lora: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        if self.fail is not None:
            raise self.fail
        self.requests.append((list(prompt_ids), params, request_id))
        self.running.add(request_id)
        script = list(self.script) or list(prompt_ids)
        finished = False
        try:
            for k in range(params.max_tokens):
                if self.delay:
                    await asyncio.sleep(self.delay)
                if request_id in self.aborted:
                    return
                token = script[k % len(script)]
                reason = None
                if token in params.stop_token_ids and not params.ignore_eos:
                    reason = "stop"
                elif k + 1 == params.max_tokens:
                    reason = "length"
                finished = reason is not None
                yield RequestOutput(
                    request_id=request_id,
                    new_token_ids=[token],
                    num_prompt_tokens=len(prompt_ids),
                    num_output_tokens=k + 1,
                    finished=finished,
                    finish_reason=reason,
                    new_logprobs=None if params.logprobs is None else [self._logprob(token, params.logprobs)],
                    num_cached_tokens=self.num_cached_tokens,
                )
                if finished:
                    return
        finally:
            self.running.discard(request_id)
            if not finished:
                self.closed.append(request_id)

    def _logprob(self, token: int, top: int) -> TokenLogprob:
        alternatives = [(token, -0.25)] + [((token + i) % self.vocab_size, -1.0 - i) for i in range(1, top)]
        return TokenLogprob(token_id=token, logprob=-0.25, top=alternatives[:top])

    async def abort(self, request_id: str) -> None:
        self.aborted[request_id] = time.monotonic()

    async def run(self, fn: Callable[[], T]) -> T:
        return await asyncio.to_thread(fn)

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        self.arrivals += 1
        self.arriving_now += 1
        try:
            yield
        finally:
            self.arriving_now -= 1

    def health(self) -> EngineStats:
        return EngineStats(
            ready=self.ready,
            draining=self.draining,
            num_running=len(self.running),
            num_waiting=self.num_waiting,
            kv_cache_usage=0.25,
            prefix_cache_queries=100,
            prefix_cache_hits=40,
            num_preemptions=2,
        )

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            name="fake", max_seq_len=self.max_seq_len, vocab_size=self.vocab_size, created=1700000000
        )
