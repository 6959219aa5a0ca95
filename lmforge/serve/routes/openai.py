"""OpenAI's API: /v1/models, /v1/completions, /v1/chat/completions, streamed or not.

A request becomes one engine request per choice (prompts x n), each with id `{response id}-{choice index}`.
Engine errors raised before the first token (queue full, draining, prompt refused) still get their HTTP status:
a stream's response starts only once its first delta is in hand. Later errors go out as an SSE error event.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from lmforge.data.tokenizer import Tokenizer
from lmforge.engine import TokenLogprob
from lmforge.serve import sse
from lmforge.serve.deps import ServerState, get_state
from lmforge.serve.errors import APIError, error_for
from lmforge.serve.generation import Choice, ChoiceDelta, merge, stream_choice
from lmforge.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)

MAX_CHOICES = 256  # engine requests one HTTP request may start (prompts x n)

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 404, 413, 429, 500, 503)
}
_STREAM = {"text/event-stream": {"schema": {"type": "string"}}}

router = APIRouter()


# --- models -------------------------------------------------------------------------------------------


def _model_card(state: ServerState) -> ModelCard:
    info = state.engine.model_info()
    return ModelCard(
        id=state.settings.model_name,
        created=info.created,
        owned_by=info.owned_by,
        max_model_len=info.max_seq_len,
    )


@router.get("/v1/models", response_model=ModelList)
async def list_models(state: ServerState = Depends(get_state)) -> ModelList:
    return ModelList(data=[_model_card(state)])


@router.get("/v1/models/{model}", response_model=ModelCard, responses=_ERRORS)
async def get_model(model: str, state: ServerState = Depends(get_state)) -> ModelCard:
    _check_model(state, model)
    return _model_card(state)


def _check_model(state: ServerState, model: str) -> None:
    if model != state.settings.model_name:
        raise APIError(
            404,
            f"The model '{model}' does not exist; this server serves '{state.settings.model_name}'.",
            param="model",
            code="model_not_found",
        )


# --- turning a request into engine requests -----------------------------------------------------------


def _plan(
    state: ServerState,
    body: CompletionRequest | ChatCompletionRequest,
    prompts: list[list[int]],
    what: str,
    *,
    salt: str = "",
    lora: str | None = None,
) -> list[Choice]:
    """One Choice per (prompt, n), checked against the context length."""
    info = state.engine.model_info()
    n = body.num_choices
    if len(prompts) * n > MAX_CHOICES:
        raise APIError(400, f"At most {MAX_CHOICES} choices (prompts x n) per request.", param="n")
    params = body.to_sampling_params(default_max_tokens=state.settings.default_max_tokens or info.max_seq_len)
    if not params.ignore_eos:  # end-of-turn tokens (<|im_end|>, ...) end a reply as eos does
        params = replace(
            params, stop_token_ids=tuple(sorted(set(params.stop_token_ids) | state.tokenizer.stop_ids))
        )
    request_id = _response_id(body)
    choices = []
    for p, prompt in enumerate(prompts):
        if not prompt:
            raise APIError(400, f"The {what} is empty.", param=what)
        if len(prompt) >= info.max_seq_len:
            raise APIError(
                400,
                f"This model's maximum context length is {info.max_seq_len} tokens. However, your {what} "
                f"resulted in {len(prompt)} tokens. Please reduce the length of the {what}.",
                param=what,
                code="context_length_exceeded",
            )
        # A max_tokens that overruns the context is clamped to what fits rather than refused, as vLLM and
        # llama.cpp's server do: the reply ends with finish_reason "length" at the context's end.
        fitted = replace(params, max_tokens=min(params.max_tokens, info.max_seq_len - len(prompt)))
        for j in range(n):
            index = p * n + j
            seeded = fitted if params.seed is None else replace(fitted, seed=params.seed + index)
            choices.append(Choice(index, prompt, seeded, f"{request_id}-{index}", salt, lora))
    return choices


def _response_id(body: CompletionRequest | ChatCompletionRequest) -> str:
    prefix = "chatcmpl" if isinstance(body, ChatCompletionRequest) else "cmpl"
    return f"{prefix}-{uuid.uuid4().hex}"


async def _completion_prompts(
    prompt: str | list[str] | list[int] | list[list[int]], state: ServerState
) -> list[list[int]]:
    tokenizer = state.tokenizer
    if isinstance(prompt, str):
        return [await run_in_threadpool(tokenizer.encode, prompt, add_bos=tokenizer.add_bos_token)]
    if not prompt:
        raise APIError(400, "The prompt is empty.", param="prompt")
    if isinstance(prompt[0], str):
        return await run_in_threadpool(tokenizer.encode_batch, prompt, add_bos=tokenizer.add_bos_token)
    prompts = [prompt] if isinstance(prompt[0], int) else prompt
    vocab_size = state.engine.model_info().vocab_size
    for ids in prompts:
        bad = next((i for i in ids if not 0 <= i < vocab_size), None)  # type: ignore[operator]
        if bad is not None:
            raise APIError(
                400,
                f"Token id {bad} in the prompt is outside the vocabulary (0..{vocab_size - 1}).",
                param="prompt",
            )
    return [list(ids) for ids in prompts]  # type: ignore[arg-type]


async def _chat_prompt(body: ChatCompletionRequest, tokenizer: Tokenizer) -> list[int]:
    def render() -> list[int]:
        text = tokenizer.apply_chat_template(body.message_dicts(), add_generation_prompt=True)
        return tokenizer.encode(text)  # no add_bos: the template writes BOS where the model wants one

    return await run_in_threadpool(render)


async def _start(
    state: ServerState, choices: list[Choice]
) -> tuple[ChoiceDelta | None, AsyncIterator[ChoiceDelta]]:
    """Admit the engine requests and wait for the first delta, so early engine errors get their HTTP status."""
    state.admit(len(choices))
    arrival = time.perf_counter()
    deltas = merge([stream_choice(state.engine, state.tokenizer, c, state.metrics, arrival) for c in choices])
    return await anext(deltas, None), deltas


async def _chain(first: ChoiceDelta | None, rest: AsyncIterator[ChoiceDelta]) -> AsyncIterator[ChoiceDelta]:
    async with aclosing(rest):
        if first is not None:
            yield first
        async for delta in rest:
            yield delta


# --- usage and logprobs -------------------------------------------------------------------------------


@dataclass
class _Tally:
    """Per choice: the text so far and the engine's token counts (the billing truth)."""

    n: int  # choices per prompt
    num_choices: int
    texts: dict[int, list[str]] = field(default_factory=dict)
    logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    finish: dict[int, str | None] = field(default_factory=dict)
    counts: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # prompt, output, cached

    def add(self, d: ChoiceDelta) -> None:
        self.texts.setdefault(d.index, []).append(d.text)
        self.logprobs.setdefault(d.index, []).extend(d.logprobs)
        self.finish[d.index] = d.finish_reason
        self.counts[d.index] = (d.num_prompt_tokens, d.num_output_tokens, d.num_cached_tokens)

    def usage(self) -> Usage:
        # each prompt counts once however many choices it has
        firsts = [self.counts.get(i, (0, 0, 0)) for i in range(0, self.num_choices, self.n)]
        prompt = sum(c[0] for c in firsts)
        completion = sum(c[1] for c in self.counts.values())
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(c[2] for c in firsts)),
        )

    def record(self, state: ServerState) -> None:
        usage = self.usage()
        state.metrics.prompt_tokens.inc(usage.prompt_tokens)
        state.metrics.completion_tokens.inc(usage.completion_tokens)


async def _collect(
    request: Request,
    state: ServerState,
    first: ChoiceDelta | None,
    deltas: AsyncIterator[ChoiceDelta],
    tally: _Tally,
) -> bool:
    """Run a non-streamed request to the end; False if the client left first (its engine requests are aborted,
    and what was generated is still recorded)."""

    async def consume() -> None:
        async for d in _chain(first, deltas):
            tally.add(d)

    async def disconnected() -> None:
        # the body has been read, so the next ASGI message is the client hanging up
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.create_task(consume()), asyncio.create_task(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            work.result()  # re-raise an engine error
            return True
        work.cancel()  # unwinding the generators aborts the engine requests (shielded)
        await asyncio.gather(work, return_exceptions=True)
        return False
    finally:
        watch.cancel()
        tally.record(state)


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _chat_logprobs(tokenizer: Tokenizer, logprobs: list[TokenLogprob]) -> ChatLogprobs:
    def top(token_id: int, logprob: float) -> TopLogprob:
        text = _token_text(tokenizer, token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    content = []
    for lp in logprobs:
        chosen = top(lp.token_id, lp.logprob)
        content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=[top(i, x) for i, x in lp.top]))
    return ChatLogprobs(content=content)


def _completion_logprobs(
    tokenizer: Tokenizer, logprobs: list[TokenLogprob], offset: int
) -> CompletionLogprobs:
    """OpenAI's legacy shape; `offset` is where these tokens start in the choice's text."""
    out = CompletionLogprobs()
    for lp in logprobs:
        token = _token_text(tokenizer, lp.token_id)
        out.tokens.append(token)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append({_token_text(tokenizer, i): x for i, x in lp.top})
        out.text_offset.append(offset)
        offset += len(token)
    return out


# --- completions --------------------------------------------------------------------------------------


@router.post(
    "/v1/completions",
    response_model=Completion,
    responses={**_ERRORS, 200: {"content": _STREAM}},
)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    state = get_state(request)
    _check_model(state, body.model)
    choices = _plan(state, body, await _completion_prompts(body.prompt, state), "prompt")
    first, deltas = await _start(state, choices)
    tally = _Tally(body.num_choices, len(choices))
    response_id, created = choices[0].request_id.rsplit("-", 1)[0], int(time.time())
    want_logprobs = choices[0].params.logprobs is not None

    def completion(items: list[CompletionChoice], usage: Usage | None) -> Completion:
        return Completion(id=response_id, created=created, model=body.model, choices=items, usage=usage)

    if not body.stream:
        if not await _collect(request, state, first, deltas, tally):
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        items = [
            CompletionChoice(
                index=i,
                text="".join(tally.texts.get(i, [])),
                logprobs=_completion_logprobs(state.tokenizer, tally.logprobs.get(i, []), 0)
                if want_logprobs
                else None,
                finish_reason=tally.finish.get(i),
            )
            for i in range(len(choices))
        ]
        return JSONResponse(completion(items, tally.usage()).model_dump())

    exclude = None if body.include_usage else {"usage"}

    async def events() -> AsyncIterator[bytes]:
        offsets = dict.fromkeys(range(len(choices)), 0)
        try:
            async for d in _chain(first, deltas):
                tally.add(d)
                logprobs = None
                if want_logprobs:
                    logprobs = _completion_logprobs(state.tokenizer, d.logprobs, offsets[d.index])
                    offsets[d.index] += sum(len(t) for t in logprobs.tokens)
                if d.text or d.logprobs or d.finish_reason:
                    item = CompletionChoice(
                        index=d.index, text=d.text, logprobs=logprobs, finish_reason=d.finish_reason
                    )
                    yield sse.event(completion([item], None).model_dump(exclude=exclude))
            if body.include_usage:
                yield sse.event(completion([], tally.usage()).model_dump())
        except Exception as e:
            yield sse.event({"error": error_for(e)[1].model_dump()})
        finally:
            tally.record(state)
        yield sse.DONE

    return sse.SSEResponse(events())


# --- chat completions ---------------------------------------------------------------------------------


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses={**_ERRORS, 200: {"content": _STREAM}},
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state = get_state(request)
    _check_model(state, body.model)
    choices = _plan(state, body, [await _chat_prompt(body, state.tokenizer)], "messages")
    first, deltas = await _start(state, choices)
    tally = _Tally(body.num_choices, len(choices))
    response_id, created = choices[0].request_id.rsplit("-", 1)[0], int(time.time())
    want_logprobs = choices[0].params.logprobs is not None

    if not body.stream:
        if not await _collect(request, state, first, deltas, tally):
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        items = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content="".join(tally.texts.get(i, []))),
                logprobs=_chat_logprobs(state.tokenizer, tally.logprobs.get(i, []))
                if want_logprobs
                else None,
                finish_reason=tally.finish.get(i),
            )
            for i in range(len(choices))
        ]
        reply = ChatCompletion(
            id=response_id, created=created, model=body.model, choices=items, usage=tally.usage()
        )
        return JSONResponse(reply.model_dump())

    exclude = None if body.include_usage else {"usage"}

    def chunk(items: list[ChatChunkChoice], usage: Usage | None = None) -> bytes:
        c = ChatCompletionChunk(id=response_id, created=created, model=body.model, choices=items, usage=usage)
        return sse.event(c.model_dump(exclude=exclude if usage is None else None))

    async def events() -> AsyncIterator[bytes]:
        try:
            for i in range(len(choices)):  # OpenAI opens every choice with the role
                yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
            async for d in _chain(first, deltas):
                tally.add(d)
                if d.text or d.logprobs:
                    logprobs = _chat_logprobs(state.tokenizer, d.logprobs) if want_logprobs else None
                    yield chunk(
                        [ChatChunkChoice(index=d.index, delta=ChatDelta(content=d.text), logprobs=logprobs)]
                    )
                if d.finish_reason:  # OpenAI closes each choice with an empty delta and the reason
                    yield chunk(
                        [ChatChunkChoice(index=d.index, delta=ChatDelta(), finish_reason=d.finish_reason)]
                    )
            if body.include_usage:
                yield chunk([], tally.usage())
        except Exception as e:
            yield sse.event({"error": error_for(e)[1].model_dump()})
        finally:
            tally.record(state)
        yield sse.DONE

    return sse.SSEResponse(events())
