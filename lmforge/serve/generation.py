"""Engine outputs -> text deltas for one request's choices: detokenising, stop strings, aborts, timings.

Each choice is one engine request. Its stream turns token ids into text with `TextStream` (which holds back text
that may begin a stop string); when a stop string appears the engine request is aborted and the choice ends
with finish_reason "stop". However a choice stream ends early (stop string, client gone, error), the engine
request is aborted, so its KV cache is freed at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass

import anyio

from lmforge.data.textstream import TextStream
from lmforge.data.tokenizer import Tokenizer
from lmforge.engine import EngineClient, SamplingParams, TokenLogprob
from lmforge.serve.metrics import ServerMetrics


@dataclass
class Choice:
    """What one choice needs: its prompt, parameters and engine request id."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str
    salt: str = ""  # the tenant's prefix-cache namespace
    lora: str | None = None  # the LoRA adapter to apply (None = the base model)


@dataclass
class ChoiceDelta:
    """What one engine step added to a choice."""

    index: int
    text: str
    logprobs: list[TokenLogprob]  # one per token consumed in this step (empty unless asked for)
    finish_reason: str | None  # set on the choice's last delta
    num_prompt_tokens: int
    num_output_tokens: int  # generated so far: the billing count
    num_cached_tokens: int


def _extra(choice: Choice) -> dict[str, object]:
    # only what is set, so engines without LoRA support (and the tests' fake engine) keep their signature
    extra: dict[str, object] = {"salt": choice.salt} if choice.salt else {}
    if choice.lora is not None:
        extra["lora"] = choice.lora
    return extra


async def _abort(engine: EngineClient, request_id: str) -> None:
    # shielded: this runs while the surrounding task is being cancelled (client gone), and must still run
    with anyio.CancelScope(shield=True):
        await engine.abort(request_id)


async def stream_choice(
    engine: EngineClient, tokenizer: Tokenizer, choice: Choice, metrics: ServerMetrics, arrival: float
) -> AsyncIterator[ChoiceDelta]:
    text = TextStream(tokenizer, choice.params.stop, prompt_ids=choice.prompt_ids)
    want_logprobs = choice.params.logprobs is not None
    done = False
    last_token_at: float | None = None
    try:
        async with aclosing(
            engine.generate(choice.prompt_ids, choice.params, choice.request_id, **_extra(choice))
        ) as outputs:
            async for out in outputs:
                now = time.perf_counter()
                if out.new_token_ids:
                    if last_token_at is None:
                        metrics.time_to_first_token.observe(now - arrival)
                    else:
                        metrics.inter_token_latency.observe((now - last_token_at) / len(out.new_token_ids))
                    last_token_at = now
                pieces, logprobs = [], []
                for k, token_id in enumerate(out.new_token_ids):
                    pieces.append(text.add(token_id))
                    if want_logprobs and out.new_logprobs:
                        logprobs.append(out.new_logprobs[k])
                    if text.stopped:
                        break
                finish_reason = None
                if text.stopped:
                    finish_reason = "stop"
                elif out.finished:
                    pieces.append(text.flush())
                    finish_reason = out.finish_reason or "stop"
                yield ChoiceDelta(
                    index=choice.index,
                    text="".join(pieces),
                    logprobs=logprobs,
                    finish_reason=finish_reason,
                    num_prompt_tokens=out.num_prompt_tokens,
                    num_output_tokens=out.num_output_tokens,
                    num_cached_tokens=out.num_cached_tokens,
                )
                if finish_reason is not None:
                    done = out.finished
                    metrics.e2e_latency.observe(time.perf_counter() - arrival)
                    return
    finally:
        if not done:  # a stop string, an error or a cancelled (disconnected) request
            await _abort(engine, choice.request_id)


_END = object()


async def merge(streams: Sequence[AsyncIterator[ChoiceDelta]]) -> AsyncIterator[ChoiceDelta]:
    """Interleave the choices' deltas as they come; the first error ends all of them."""
    if len(streams) == 1:  # the common case needs no tasks
        async with aclosing(streams[0]) as only:
            async for delta in only:
                yield delta
        return

    queue: asyncio.Queue[object] = asyncio.Queue()

    async def pump(stream: AsyncIterator[ChoiceDelta]) -> None:
        try:
            async with aclosing(stream):
                async for delta in stream:
                    queue.put_nowait(delta)
        except Exception as e:
            queue.put_nowait(e)
        finally:
            queue.put_nowait(_END)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is _END:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()  # each pump's stream aborts its engine request as it unwinds
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)
