"""OpenAI's API: /v1/models, /v1/completions, /v1/chat/completions, streamed or not.

A request becomes one engine request per choice (prompts x n), each with id `{response id}-{choice index}`.
Engine errors raised before the first token (queue full, draining, prompt refused) still get their HTTP status:
a stream's response starts only once its first delta is in hand. Later errors go out as an SSE error event.

Metered servers (a database in the state): every route needs an API key; a generation request is tokenised and
planned, then admitted (its rate limits counted and its maximum cost held against the tenant's budget, one
transaction), then generated, and settled exactly once however it ends: completed, cancelled (the client left:
what was generated is billed), failed (an engine error: the same). The numbers billed are the `_Tally`'s, the
ones the client is told in `usage`. The prefix cache is salted per tenant so tenants never share cached blocks.

Models of other OpenAI-compatible servers (`settings.upstreams`) branch off to lmforge/serve/upstream.py before
any tokenising: forwarded, and metered through the same `Meter` (502/504 when the upstream fails to answer).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from lmforge.data.tokenizer import Tokenizer
from lmforge.engine import TokenLogprob
from lmforge.serve import metering, sse
from lmforge.serve.auth import ApiKey, AuthError, check_model, refused, require_admitted_key, require_key
from lmforge.serve.deps import ServerState, get_state
from lmforge.serve.errors import APIError, error_for
from lmforge.serve.generation import Choice, ChoiceDelta, merge, stream_choice
from lmforge.serve.ledger import Ledger
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
# A prompt of up to INLINE_PROMPT_BYTES of text (UTF-8: byte-level BPE works per byte) in up to INLINE_MESSAGES
# messages is rendered and tokenised on the event loop: handing it to a worker thread and back costs ~0.27 ms of
# CPU under load, as much as the work for ~150 characters, while 1,000 characters take 0.83 ms (bench/RESULTS.md,
# 2026-11-23); a longer prompt would hold up the loop's other streams for a millisecond or more.
INLINE_PROMPT_BYTES = 1024
INLINE_MESSAGES = 8
SETTLE_RETRIES_S = (0.1, 1.0, None)  # waits between attempts to settle a request (None: the last attempt)

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 404, 413, 429, 500, 502, 503, 504)
}
_STREAM = {"text/event-stream": {"schema": {"type": "string"}}}

T = TypeVar("T")
log = logging.getLogger(__name__)


router = APIRouter()


# --- models -------------------------------------------------------------------------------------------


def _model_card(state: ServerState, lora: str | None = None) -> ModelCard:
    """The base model's card, or (vLLM's shape) an adapter's: id `base:adapter`, parent the base."""
    info = state.engine.model_info()
    base = state.settings.model_name
    return ModelCard(
        id=base if lora is None else f"{base}:{lora}",
        created=info.created,
        owned_by=info.owned_by,
        max_model_len=info.max_seq_len,
        root=base if lora is None else lora,
        parent=None if lora is None else base,
    )


def _other_cards(state: ServerState) -> list[ModelCard]:
    """The cards of the served classifier and of the upstream models (see upstream.py)."""
    created = state.engine.model_info().created
    cards = []
    if state.classifier is not None:
        name, max_len = state.classifier.name, state.classifier.classifier.max_seq_len
        cards.append(
            ModelCard(id=name, created=created, owned_by="lmforge", max_model_len=max_len, root=name)
        )
    return cards + [up.card(created) for up in state.upstreams.values()]


@router.get("/v1/models", response_model=ModelList, dependencies=[Depends(require_key)])
async def list_models(request: Request, state: ServerState = Depends(get_state)) -> ModelList:
    local = []
    if state.settings.model_name is not None:  # None: a pure gateway (upstream models only)
        loras = state.engine.model_info().loras
        local = [_model_card(state)] + [_model_card(state, lora) for lora in loras]
    cards = local + _other_cards(state)
    key: ApiKey | None = request.state.api_key
    if key is not None and key.models is not None:  # as OpenAI: a key sees only the models it may use
        cards = [card for card in cards if key.allows(card.id)]
    return ModelList(data=cards)


@router.get(
    "/v1/models/{model}", response_model=ModelCard, responses=_ERRORS, dependencies=[Depends(require_key)]
)
async def get_model(model: str, state: ServerState = Depends(get_state)) -> ModelCard:
    for card in _other_cards(state):
        if card.id == model:
            return card
    return _model_card(state, _check_model(state, model))


def _check_model(state: ServerState, model: str) -> str | None:
    """The LoRA adapter `model` names (`base:adapter`), None for the base model; 404 for anything else."""
    base = state.settings.model_name
    if base is not None and model == base:
        return None
    loras = () if base is None else state.engine.model_info().loras
    adapter = model[len(base) + 1 :] if base is not None and model.startswith(base + ":") else None
    if adapter is None or adapter not in loras:
        local = [] if base is None else [base, *(f"{base}:{lora}" for lora in loras)]
        served = ", ".join(f"'{name}'" for name in [*local, *state.upstreams]) or "no generation model"
        raise APIError(
            404,
            f"The model '{model}' does not exist; this server serves {served}.",
            param="model",
            code="model_not_found",
        )
    return adapter


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
        inline = len(prompt.encode()) <= INLINE_PROMPT_BYTES
        return [await _off_loop(inline, tokenizer.encode, prompt, add_bos=tokenizer.add_bos_token)]
    if not prompt:
        raise APIError(400, "The prompt is empty.", param="prompt")
    if isinstance(prompt[0], str):
        inline = (
            len(prompt) <= INLINE_MESSAGES and sum(len(p.encode()) for p in prompt) <= INLINE_PROMPT_BYTES
        )  # type: ignore[union-attr]
        return await _off_loop(inline, tokenizer.encode_batch, prompt, add_bos=tokenizer.add_bos_token)
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


async def _chat_prompts(body: ChatCompletionRequest, tokenizer: Tokenizer) -> list[list[int]]:
    def render() -> list[int]:
        text = tokenizer.apply_chat_template(body.message_dicts(), add_generation_prompt=True)
        return tokenizer.encode(text)  # no add_bos: the template writes BOS where the model wants one

    messages = body.messages
    inline = (
        len(messages) <= INLINE_MESSAGES
        and sum(
            len(str(m.content).encode()) + (len(str(m.model_extra)) if m.model_extra else 0) for m in messages
        )
        <= INLINE_PROMPT_BYTES
    )  # list contents and extra fields (tool calls) counted as their repr: more, not less
    return [await _off_loop(inline, render)]


async def _off_loop(inline: bool, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` (rendering or tokenising a prompt) on the event loop if `inline` (quick), else on a
    worker thread."""
    if inline:
        return fn(*args, **kwargs)
    return await run_in_threadpool(fn, *args, **kwargs)


async def _prepare(
    request: Request,
    state: ServerState,
    key: ApiKey | None,
    body: CompletionRequest | ChatCompletionRequest,
    render: Awaitable[list[list[int]]],
    what: str,
    lora: str | None,
) -> tuple[list[Choice], _Tally, Meter | None]:
    """Render the prompts (`render`), plan the engine requests and admit them: the engine's own capacity check (a
    full queue refuses the request without spending the key's rate limit), then the ledger's admit for a metered
    request. All the while the request is `arriving()`: an idle engine waits for it (see docs/engine.md)."""
    with state.engine.arriving():
        prompts = await render
        choices = _plan(state, body, prompts, what, salt=_salt(key), lora=lora)
        tally = _Tally(body.num_choices, len(choices))
        meter = _meter(request, state, key, body.model, choices, tally)
        state.admit(len(choices))
        if meter is not None:
            await meter.admit()
    return choices, tally, meter


async def _start(
    state: ServerState, choices: list[Choice], meter: Meter | None = None
) -> tuple[ChoiceDelta | None, AsyncIterator[ChoiceDelta]]:
    """Send the admitted (`_prepare`) engine requests and wait for the first delta, so early engine errors get their
    HTTP status; if the engine refuses a metered request, its ledger row is settled as failed."""
    arrival = time.perf_counter()
    deltas = merge([stream_choice(state.engine, state.tokenizer, c, state.metrics, arrival) for c in choices])
    try:
        return await anext(deltas, None), deltas
    except BaseException as e:
        if meter is not None:
            await meter.ended(e)
        raise


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

    def billed(self) -> tuple[int, int]:
        usage = self.usage()
        return usage.prompt_tokens, usage.completion_tokens

    def record(self, state: ServerState) -> None:
        usage = self.usage()
        state.metrics.prompt_tokens.inc(usage.prompt_tokens)
        state.metrics.completion_tokens.inc(usage.completion_tokens)


async def _uncancelled(future: asyncio.Future[T], undo: Callable[[T], Awaitable[object]] | None = None) -> T:
    """Wait for a ledger change's outcome (a `Ledger` future) even if this task is cancelled meanwhile, so
    whether it happened is never unknown; then `undo(result)` (also waited for) and raise the cancellation.
    anyio's shield keeps the app's own cancel scopes out (a closed stream); a plain `task.cancel()` (uvicorn
    giving up on shutdown) still arrives, and is caught and deferred here."""
    interrupted = False
    with anyio.CancelScope(shield=True):
        while True:
            try:
                result = await asyncio.shield(future)
                break
            except asyncio.CancelledError:
                if future.cancelled():  # the change itself was called off, so nothing ran
                    raise
                interrupted = True
        if interrupted and undo is not None:
            await asyncio.wait([asyncio.ensure_future(undo(result))])
    if interrupted:
        raise asyncio.CancelledError()
    return result


def _release(ledger: Ledger, admission: metering.Admission) -> asyncio.Future[None]:
    """Settle an admission that will never run (cancelled, nothing billed) with the ledger's next group commit."""
    return ledger.settle(
        metering.settlement(admission, prompt_tokens=0, completion_tokens=0, status="cancelled")
    )


@dataclass
class Meter:
    """A metered request's ledger row. `admit` counts the request against its key's rate limits and holds its
    maximum cost (`prompt_tokens` + `max_completion_tokens` at the model's prices) against the tenant's budget
    before any work starts; `settle` bills `billed()` (prompt, completion tokens), the numbers the client is
    told in `usage`, exactly once. Upstream models and classifications are metered with it too."""

    request: Request
    state: ServerState
    key: ApiKey
    model: str
    request_id: str  # the response id the client sees
    prompt_tokens: int
    max_completion_tokens: int
    billed: Callable[[], tuple[int, int]]
    admission: metering.Admission | None = None
    settled: bool = False

    async def admit(self) -> None:
        ledger = self._ledger()
        request = {
            "key": self.key,
            "model": self.model,
            "request_id": self.request_id,
            "prompt_tokens": self.prompt_tokens,
            "max_completion_tokens": self.max_completion_tokens,
            "instance_id": self.state.instance_id,
        }
        # admitted, but cancelled meanwhile: nothing will run, so the hold goes back at once
        try:
            admitted = ledger.admit(request, at_step_end=self.model not in self.state.upstreams)
            self.admission = await _uncancelled(admitted, partial(_release, ledger))
        except AuthError as e:  # the key was revoked after the process cached it (auth.KeyCache)
            raise refused(self.state, self.request, e) from None
        self.request.state.ratelimit_headers = self.admission.headers

    async def settle(self, status: str, error: str | None = None) -> None:
        """Bill the tally (with the ledger's next group commit). The client has its answer whatever happens here,
        so a database that fails is retried (settling twice is a no-op) and then logged, never turned into an
        error response."""
        if self.admission is None or self.settled:
            return
        self.settled = True
        prompt_tokens, completion_tokens = self.billed()
        settlement = metering.settlement(
            self.admission,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            status=status,
            error=error,
        )
        for wait in SETTLE_RETRIES_S:
            try:
                await _uncancelled(self._ledger().settle(settlement))
                return
            except Exception:
                if wait is None:
                    log.exception(
                        "could not settle request %s: its row stays pending", self.admission.request_id
                    )
                    return
                log.warning("settling request %s failed; retrying in %s s", self.admission.request_id, wait)
                with anyio.CancelScope(shield=True):
                    await asyncio.sleep(wait)

    def _ledger(self) -> Ledger:
        if self.state.ledger is None:
            raise RuntimeError("a metered request on a server without a database")
        return self.state.ledger

    async def ended(self, exc: BaseException | None) -> None:
        """Settle by how the request ended: normally, by an engine error, or cancelled (the client left)."""
        if exc is None:
            await self.settle("completed")
        elif isinstance(exc, Exception):
            await self.settle("failed", f"{type(exc).__name__}: {exc}"[:500])
        else:
            await self.settle("cancelled")


def _meter(
    request: Request, state: ServerState, key: ApiKey | None, model: str, choices: list[Choice], tally: _Tally
) -> Meter | None:
    """Every prompt held once, every choice's max_tokens; the tally's usage billed."""
    if key is None or state.db is None:
        return None
    return Meter(
        request,
        state,
        key,
        model,
        request_id=choices[0].request_id.rsplit("-", 1)[0],
        prompt_tokens=sum(len(c.prompt_ids) for c in choices[:: tally.n]),
        max_completion_tokens=sum(c.params.max_tokens for c in choices),
        billed=tally.billed,
    )


def _salt(key: ApiKey | None) -> str:
    """The tenant's prefix-cache namespace: cached prompt blocks are never shared across tenants."""
    return "" if key is None else f"tenant:{key.tenant_id}"


class SettledSSE(sse.SSEResponse):
    """An SSE response that runs `on_end` however it ends (finished, client gone, cancelled)."""

    def __init__(self, events: AsyncIterator[bytes], on_end: Callable[[], Awaitable[None]]) -> None:
        super().__init__(events)
        self._on_end = on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._on_end()


def _stream_response(
    state: ServerState,
    events: AsyncIterator[bytes],
    first: ChoiceDelta | None,
    deltas: AsyncIterator[ChoiceDelta],
    tally: _Tally,
    meter: Meter | None,
) -> Response:
    """Stream `events`. If the client leaves before the response starts, the events never begin, so their own
    cleanup never runs: then the engine requests are aborted here and what they generated (the first delta) is
    recorded and billed as cancelled."""
    began = False

    async def tracked() -> AsyncIterator[bytes]:
        nonlocal began
        began = True
        async with aclosing(events):
            async for chunk in events:
                yield chunk

    async def on_end() -> None:
        if not began:
            await deltas.aclose()
            if first is not None:
                tally.add(first)
            tally.record(state)
        if meter is not None:
            await meter.settle("cancelled")  # a no-op once the events settled it

    return SettledSSE(tracked(), on_end)


async def _collect(
    request: Request,
    state: ServerState,
    first: ChoiceDelta | None,
    deltas: AsyncIterator[ChoiceDelta],
    tally: _Tally,
    meter: Meter | None = None,
) -> bool:
    """Run a non-streamed request to the end; False if the client left first (its engine requests are aborted,
    and what was generated is still recorded and billed)."""

    async def consume() -> None:
        async for d in _chain(first, deltas):
            tally.add(d)

    async def disconnected() -> None:
        # the body has been read, so the next ASGI message is the client hanging up
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.create_task(consume()), asyncio.create_task(disconnected())
    outcome: BaseException | None = asyncio.CancelledError()  # how it ended, for the ledger
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            work.result()  # re-raise an engine error
            outcome = None
            return True
        work.cancel()  # unwinding the generators aborts the engine requests (shielded)
        await asyncio.gather(work, return_exceptions=True)
        return False
    except Exception as e:
        outcome = e
        raise
    finally:
        watch.cancel()
        if not work.done():  # this task itself was cancelled: stop generating before billing
            work.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(work, return_exceptions=True)
        tally.record(state)
        if meter is not None:
            await meter.ended(outcome)


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
async def create_completion(
    body: CompletionRequest, request: Request, key: ApiKey | None = Depends(require_admitted_key)
) -> Response:
    state = get_state(request)
    if body.model in state.upstreams:  # forwarded to another server, metered the same way
        return await state.upstreams[body.model].forward(request, key, body)
    lora = _check_model(state, body.model)
    if key is not None:
        check_model(key, body.model)
    render = _completion_prompts(body.prompt, state)
    choices, tally, meter = await _prepare(request, state, key, body, render, "prompt", lora)
    first, deltas = await _start(state, choices, meter)
    response_id, created = choices[0].request_id.rsplit("-", 1)[0], int(time.time())
    want_logprobs = choices[0].params.logprobs is not None

    def completion(items: list[CompletionChoice], usage: Usage | None) -> Completion:
        return Completion(id=response_id, created=created, model=body.model, choices=items, usage=usage)

    if not body.stream:
        if not await _collect(request, state, first, deltas, tally, meter):
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
        outcome: BaseException | None = asyncio.CancelledError()  # until the end is reached: the client left
        try:
            async with aclosing(_chain(first, deltas)) as stream:
                async for d in stream:
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
            outcome = None
            if body.include_usage:
                yield sse.event(completion([], tally.usage()).model_dump())
        except Exception as e:
            outcome = e
            yield sse.event({"error": error_for(e)[1].model_dump()})
        finally:
            tally.record(state)
            if meter is not None:
                await meter.ended(outcome)
        yield sse.DONE

    return _stream_response(state, events(), first, deltas, tally, meter)


# --- chat completions ---------------------------------------------------------------------------------


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses={**_ERRORS, 200: {"content": _STREAM}},
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, key: ApiKey | None = Depends(require_admitted_key)
) -> Response:
    state = get_state(request)
    if body.model in state.upstreams:  # forwarded to another server, metered the same way
        return await state.upstreams[body.model].forward(request, key, body)
    lora = _check_model(state, body.model)
    if key is not None:
        check_model(key, body.model)
    render = _chat_prompts(body, state.tokenizer)
    choices, tally, meter = await _prepare(request, state, key, body, render, "messages", lora)
    first, deltas = await _start(state, choices, meter)
    response_id, created = choices[0].request_id.rsplit("-", 1)[0], int(time.time())
    want_logprobs = choices[0].params.logprobs is not None

    if not body.stream:
        if not await _collect(request, state, first, deltas, tally, meter):
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
        outcome: BaseException | None = asyncio.CancelledError()  # until the end is reached: the client left
        try:
            for i in range(len(choices)):  # OpenAI opens every choice with the role
                yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
            async with aclosing(_chain(first, deltas)) as stream:
                async for d in stream:
                    tally.add(d)
                    if d.text or d.logprobs:
                        logprobs = _chat_logprobs(state.tokenizer, d.logprobs) if want_logprobs else None
                        delta = ChatDelta(content=d.text)
                        yield chunk([ChatChunkChoice(index=d.index, delta=delta, logprobs=logprobs)])
                    if d.finish_reason:  # OpenAI closes each choice with an empty delta and the reason
                        yield chunk(
                            [ChatChunkChoice(index=d.index, delta=ChatDelta(), finish_reason=d.finish_reason)]
                        )
            outcome = None
            if body.include_usage:
                yield chunk([], tally.usage())
        except Exception as e:
            outcome = e
            yield sse.event({"error": error_for(e)[1].model_dump()})
        finally:
            tally.record(state)
            if meter is not None:
                await meter.ended(outcome)
        yield sse.DONE

    return _stream_response(state, events(), first, deltas, tally, meter)
