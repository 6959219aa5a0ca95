"""Upstream backends: models served by another OpenAI-compatible server (another `lmforge serve`, vLLM,
llama.cpp's server, Ollama), forwarded by this server and metered exactly like the local model.

`lmforge serve --upstreams FILE.yaml` lists them (`UpstreamSettings`: name, url, model, api_key_env,
max_tokens, timeout_s); each gets one pooled `httpx.AsyncClient`, opened in the app's lifespan. A request for an
upstream model goes:

    authenticate (the route), the key's model allow-list           -> 401 / 403, the upstream never sees it
    hold = a bound of the prompt's tokens + max_tokens x choices    (`prompt_bound`: the upstream's tokenizer is
                                                                      unknown, so no local tokenizer is used)
    admit: rate limits and the budget hold                          -> 429, the upstream never sees it
    forward the client's JSON with `model` = the upstream's name and the hold's max_tokens (always sent, so the
    upstream cannot generate past the hold); a stream also asks for `stream_options.include_usage`
    settle with the `usage` the upstream reports: the numbers the client is told

Errors: the upstream's 4xx/5xx pass through with their status in OpenAI's shape, except 401/403, which mean
this server's own upstream credentials are wrong (the client's key was fine): those are 502s, and the
upstream's message (which may quote part of that key) stays in the log. An unreachable upstream is a 502
(`upstream_unavailable`), one that times out a 504 (`upstream_timeout`); each is a failed ledger row of 0
tokens (nothing was generated for the client). A stream that breaks after it began ends with an SSE error
event, as local streams do.

Billing without the upstream's usage, the one estimate in this path: a stream that ends before the upstream's
usage chunk (the client left, the upstream failed, or it ignores include_usage) is billed the prompt bound and
one completion token per content chunk received (vLLM, llama.cpp and Ollama send a token per chunk); a
non-streamed answer without usage is billed its hold. Either way the usage the client gets (if any) is the
billed one. A client that leaves a non-streamed request closes the upstream request and is billed the prompt
bound (the upstream had the prompt) and no completion (it received none).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, aclosing, nullcontext
from typing import Any, TypeVar

import anyio
import httpx
from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from lmforge.engine import EngineDraining, EngineStats, ModelInfo, RequestOutput, SamplingParams
from lmforge.errors import UserError
from lmforge.serve import sse
from lmforge.serve.auth import ApiKey, check_model
from lmforge.serve.deps import get_state
from lmforge.serve.errors import APIError, error_response
from lmforge.serve.protocol import ChatCompletionRequest, CompletionRequest, ErrorDetail, ModelCard
from lmforge.serve.routes.openai import Meter, SettledSSE
from lmforge.serve.settings import UpstreamSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_CONNECTIONS = 256  # per upstream; requests beyond wait (up to timeout_s) for a free connection

# The hold's prompt side must bound the prompt's tokens under whatever tokenizer the upstream uses; it is
# unknown here (and the local model's is not the upstream's), so the bound comes from the text itself:
#  - byte-level BPE (GPT-2, Llama 3, Qwen, Mistral's Tekken) and SentencePiece with byte fallback (Llama 2,
#    Mistral, Gemma) give every token at least one UTF-8 byte of the text, except SentencePiece's word-start
#    "▁" inserted before a text (counted in the overheads): tokens <= UTF-8 bytes. A message counts as its
#    JSON (role, content, name, tool calls), a few bytes more than its text, so no field is missed.
#  - a chat template frames each message with a role header and an end-of-turn mark: ChatML's
#    "<|im_start|>user\n...<|im_end|>\n" is 5 tokens, Llama 3's and Gemma's 5, Llama 2's [INST] with BOS/EOS 8.
#  - once per request: BOS, the generation prompt ("<|im_start|>assistant\n") and the default system prompt
#    some templates insert when there is none (Qwen 2.5's "You are Qwen, created by Alibaba Cloud..." ~20
#    tokens, Llama 3.1's knowledge and today dates ~26).
# English text is ~4 bytes a token, so the hold is ~4x the real prompt: held (and counted against TPM) only
# until the request is settled with the upstream's own count. Not bounded: images given by URL (their tokens
# do not depend on the URL's length); such requests are still billed exactly, only their hold may be short.
MESSAGE_OVERHEAD_TOKENS = 16
REQUEST_OVERHEAD_TOKENS = 64
PROMPT_OVERHEAD_TOKENS = 8  # a completions prompt: BOS, EOS, a word-start mark


def _unbounded(payload: dict[str, Any], n: int) -> str | None:
    """A request field that would let the upstream generate past max_tokens x n, so past the hold: llama.cpp's
    n_predict (it wins over max_tokens), vLLM's best_of (more sequences than are returned) and beam search."""
    if payload.get("n_predict") is not None:
        return "n_predict"
    if payload.get("best_of") not in (None, n):
        return "best_of"
    if payload.get("use_beam_search"):
        return "use_beam_search"
    return None


def _utf8(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def prompt_bound(body: CompletionRequest | ChatCompletionRequest, payload: dict[str, Any]) -> int:
    """An upper bound of the request's prompt tokens under any tokenizer (see the constants above); each
    completions prompt counts once, however many choices it has."""
    if isinstance(body, ChatCompletionRequest):
        tools = sum(_utf8(payload[k]) for k in ("tools", "functions") if payload.get(k))
        messages = sum(_utf8(m) + MESSAGE_OVERHEAD_TOKENS for m in payload["messages"])
        return messages + tools + REQUEST_OVERHEAD_TOKENS
    prompts = _prompts(body)
    # token ids are tokens already (the client chose them for the upstream's vocabulary)
    return sum(
        (len(p.encode("utf-8")) if isinstance(p, str) else len(p)) + PROMPT_OVERHEAD_TOKENS for p in prompts
    )


def _prompts(body: CompletionRequest) -> list[str] | list[list[int]]:
    prompt = body.prompt
    if isinstance(prompt, str):
        return [prompt]
    return [prompt] if prompt and isinstance(prompt[0], int) else prompt  # type: ignore[list-item, return-value]


def _max_tokens_field(body: CompletionRequest | ChatCompletionRequest) -> tuple[str, int | None]:
    """The field the client set the length with (forwarded under the same name: OpenAI's reasoning models
    refuse max_tokens) and its value."""
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        return "max_completion_tokens", body.max_completion_tokens
    return "max_tokens", body.max_tokens


# --- answers from the upstream ---------------------------------------------------------------------------


def _error_detail(status: int, data: Any, text: str) -> ErrorDetail:
    """An upstream's error body in OpenAI's shape. Servers differ: OpenAI and lmforge send {"error": {...}},
    older vLLM the fields at the top level, Ollama's native API {"error": "text"}, llama.cpp an integer code."""
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, str):
        error = {"message": error}
    if not isinstance(error, dict):
        error = data if isinstance(data, dict) else {}

    def text_of(name: str) -> str | None:
        value = error.get(name)
        return value if isinstance(value, str) and value else None

    message = text_of("message") or f"The upstream answered HTTP {status}: {text.strip()[:300]}"
    default_type = "invalid_request_error" if status < 500 else "upstream_error"
    return ErrorDetail(
        message=message, type=text_of("type") or default_type, param=text_of("param"), code=text_of("code")
    )


def _usage_numbers(usage: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens from an upstream's `usage`, None if it has none that makes sense."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (prompt, completion))
    return (prompt, completion) if ok else None


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _content_chunks(chunk: dict[str, Any]) -> int:
    """How many choices of a streamed chunk carry generated text (or tool-call pieces)."""
    count = 0
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict):
            count += any(delta.get(k) for k in ("content", "reasoning_content", "tool_calls"))
        else:
            count += bool(choice.get("text"))
    return count


def _json_chunk(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError:
        chunk = None
    if not isinstance(chunk, dict):
        raise RuntimeError(f"the upstream sent an event that is not a JSON object: {data[:200]!r}")
    return chunk


async def _sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The `data` of each server-sent event (comments, other fields and keep-alives skipped)."""
    data: list[str] = []
    async with aclosing(response.aiter_lines()) as lines:
        async for line in lines:
            if not line:
                if data:
                    yield "\n".join(data)
                    data = []
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


class _ClientGone(Exception):
    pass


async def _or_disconnect(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or _ClientGone as soon as the client hangs up first (then `work` is cancelled: httpx
    closes its connection, and the upstream, seeing it closed, stops generating)."""

    async def disconnected() -> None:
        # the body has been read, so the next ASGI message is the client hanging up
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.create_task(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise _ClientGone()
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(task, return_exceptions=True)


def _transport_error(upstream: UpstreamSettings, exc: httpx.HTTPError) -> APIError:
    if isinstance(exc, httpx.TimeoutException):
        return APIError(
            504,
            f"The upstream serving '{upstream.name}' did not answer within {upstream.timeout_s:g} s.",
            type="upstream_error",
            code="upstream_timeout",
        )
    return APIError(
        502,
        f"The upstream serving '{upstream.name}' is unreachable ({type(exc).__name__}).",
        type="upstream_error",
        code="upstream_unavailable",
    )


class Upstream:
    """One upstream model: its settings, its API key (read from the environment once) and its pooled client."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        self._headers = {"accept": "application/json, text/event-stream"}
        if settings.api_key_env is not None:
            secret = os.environ.get(settings.api_key_env)
            if not secret:
                raise UserError(
                    f"upstream {settings.name!r}: the environment variable {settings.api_key_env} "
                    "(its api_key_env) is not set"
                )
            self._headers["authorization"] = f"Bearer {secret}"
        self._client: httpx.AsyncClient | None = None

    def open(self) -> None:
        """Create the connection pool (in the app's lifespan: the client belongs to the serving event loop)."""
        self._client = httpx.AsyncClient(
            base_url=self.settings.url + "/",
            headers=self._headers,
            timeout=httpx.Timeout(self.settings.timeout_s),
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=32),
        )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise EngineDraining()  # outside the lifespan: starting or stopped
        return self._client

    def card(self, created: int) -> ModelCard:
        s = self.settings
        return ModelCard(id=s.name, created=created, owned_by=s.owned_by, max_model_len=None, root=s.model)

    # --- forwarding ---------------------------------------------------------------------------------

    async def forward(
        self, request: Request, key: ApiKey | None, body: CompletionRequest | ChatCompletionRequest
    ) -> Response:
        """Answer `body` (already validated as OpenAI's) through the upstream, metered on a metered server."""
        state = get_state(request)
        if key is not None:
            check_model(key, body.model)
        if state.draining:
            raise EngineDraining()
        payload = json.loads(await request.body())  # forwarded as sent: fields this server ignores included
        unbounded = _unbounded(payload, body.num_choices)
        if unbounded is not None:
            raise APIError(
                400,
                f"'{unbounded}' is not supported for the model '{body.model}': set the length with max_tokens.",
                param=unbounded,
            )
        chat = isinstance(body, ChatCompletionRequest)
        field, requested = _max_tokens_field(body)
        max_tokens = requested or self.settings.max_tokens
        payload.pop("max_tokens" if field == "max_completion_tokens" else "max_completion_tokens", None)
        payload[field] = max_tokens
        payload["model"] = self.settings.model
        if body.stream:
            payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
        outputs = body.num_choices * (1 if chat else len(_prompts(body)))  # type: ignore[arg-type]
        call = _Call(
            self,
            request,
            body,
            payload,
            request_id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            prompt_bound=prompt_bound(body, payload),
            max_completion_tokens=max_tokens * outputs,
        )
        if key is not None and state.db is not None:
            call.meter = Meter(
                request,
                state,
                key,
                body.model,
                request_id=call.request_id,
                prompt_tokens=call.prompt_bound,
                max_completion_tokens=call.max_completion_tokens,
                billed=call.billed,
            )
            await call.meter.admit()  # RateLimited / QuotaExceeded before the upstream is contacted
        return await (call.stream() if body.stream else call.complete())


class _Call:
    """One forwarded request: what it holds, what it has been billed so far, and how it ends."""

    def __init__(
        self,
        upstream: Upstream,
        request: Request,
        body: CompletionRequest | ChatCompletionRequest,
        payload: dict[str, Any],
        *,
        request_id: str,
        prompt_bound: int,
        max_completion_tokens: int,
    ) -> None:
        self.upstream = upstream
        self.request = request
        self.body = body
        self.payload = payload
        self.request_id = request_id
        self.prompt_bound = prompt_bound
        self.max_completion_tokens = max_completion_tokens
        self.path = "chat/completions" if isinstance(body, ChatCompletionRequest) else "completions"
        self.meter: Meter | None = None
        self.tokens = (0, 0)  # (prompt, completion) to bill: the upstream's usage once known

    def billed(self) -> tuple[int, int]:
        return self.tokens

    async def _end(self, outcome: BaseException | None, tokens: tuple[int, int]) -> None:
        self.tokens = tokens
        metrics, name = get_state(self.request).metrics, self.upstream.settings.name
        metrics.upstream_prompt_tokens.labels(name).inc(tokens[0])
        metrics.upstream_completion_tokens.labels(name).inc(tokens[1])
        if self.meter is not None:
            await self.meter.ended(outcome)

    def _rewrite(self, data: dict[str, Any]) -> None:
        # the client sees this server's request id (the ledger's, the one /v1/usage lists) and its model name
        data["id"] = self.request_id
        data["model"] = self.body.model

    def _usage_chunk(self, prompt: int, completion: int) -> dict[str, Any]:
        chat = isinstance(self.body, ChatCompletionRequest)
        return {
            "id": self.request_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.body.model,
            "choices": [],
            "usage": _usage(prompt, completion),
        }

    async def _refused(self, response: httpx.Response) -> Response:
        """Pass an upstream's error answer on (401/403 become 502: see the module docstring)."""
        try:
            text = response.text
            data = response.json()
        except httpx.ResponseNotRead:  # the upstream failed while sending its error
            text, data = "", None
        except ValueError:
            data = None
        detail = _error_detail(response.status_code, data, text)
        status = response.status_code
        error = f"upstream HTTP {status}: {detail.message}"[:500]
        await self._end(RuntimeError(error), (0, 0))
        if status in (401, 403):
            log.error("upstream %r refused this server's credentials: %s", self.upstream.settings.name, text)
            status, detail = (
                502,
                ErrorDetail(
                    message=f"The upstream serving '{self.body.model}' refused this server's credentials.",
                    type="upstream_error",
                    code="upstream_auth_failed",
                ),
            )
        headers = {k: v for k, v in response.headers.items() if k.lower() == "retry-after"}
        return error_response(status, detail, headers)

    async def _send(self, *, stream: bool) -> httpx.Response:
        """The upstream's response (headers only when streaming); transport errors are 502/504, a client
        that leaves first a 499, each settled."""
        client = self.upstream.client
        request = client.build_request("POST", self.path, json=self.payload)
        try:
            return await _or_disconnect(self.request, client.send(request, stream=stream))
        except _ClientGone:
            await self._end(asyncio.CancelledError(), (self.prompt_bound, 0))
            raise
        except httpx.HTTPError as e:
            await self._end(e, (0, 0))
            raise _transport_error(self.upstream.settings, e) from None
        except BaseException as e:
            await self._end(e, (self.prompt_bound, 0))
            raise

    async def complete(self) -> Response:
        try:
            response = await self._send(stream=False)
        except _ClientGone:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        if response.status_code >= 400:
            return await self._refused(response)
        try:
            data = response.json()
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            await self._end(e, (0, 0))
            raise APIError(
                502,
                "The upstream sent an answer that is not JSON.",
                type="upstream_error",
                code="upstream_error",
            ) from None
        tokens = _usage_numbers(data.get("usage"))
        if tokens is None:  # nothing to count with: the hold is what the client agreed to at most
            tokens = (self.prompt_bound, self.max_completion_tokens)
            data["usage"] = _usage(*tokens)
        self._rewrite(data)
        await self._end(None, tokens)
        return JSONResponse(data)

    async def stream(self) -> Response:
        try:
            response = await self._send(stream=True)
        except _ClientGone:
            return Response(status_code=499)
        if response.status_code >= 400:
            try:
                await response.aread()
            except httpx.HTTPError:
                pass
            finally:
                await response.aclose()
            return await self._refused(response)
        include_usage = self.body.include_usage
        began = False

        async def events() -> AsyncIterator[bytes]:
            nonlocal began
            began = True
            outcome: BaseException | None = asyncio.CancelledError()  # until the end is reached: client left
            usage: tuple[int, int] | None = None
            chunks = 0  # content chunks received: the completion tokens billed if no usage comes
            try:
                failure = None
                async for data in _sse_data(response):
                    if data.strip() == "[DONE]":
                        break
                    chunk = _json_chunk(data)
                    if "error" in chunk and "choices" not in chunk:
                        detail = _error_detail(500, chunk, data)
                        failure = RuntimeError(f"upstream error mid-stream: {detail.message}"[:500])
                        yield sse.event({"error": detail.model_dump()})
                        break
                    chunks += _content_chunks(chunk)
                    if chunk.get("usage") is not None:
                        usage = _usage_numbers(chunk["usage"]) or usage
                    self._rewrite(chunk)
                    if not include_usage:
                        if not chunk.get("choices"):
                            continue  # the usage chunk the client did not ask for
                        chunk.pop("usage", None)
                    yield sse.event(chunk)
                if failure is None and include_usage and usage is None:
                    # the upstream ignored include_usage: tell the client what it is billed
                    usage = (self.prompt_bound, chunks)
                    yield sse.event(self._usage_chunk(*usage))
                outcome = failure
            except httpx.HTTPError as e:  # the upstream went away or went quiet mid-stream
                outcome = e
                yield sse.event({"error": _transport_error(self.upstream.settings, e).detail.model_dump()})
            except Exception as e:
                outcome = e
                detail = ErrorDetail(message=str(e), type="upstream_error", code="upstream_error")
                yield sse.event({"error": detail.model_dump()})
            finally:
                with anyio.CancelScope(shield=True):
                    await response.aclose()
                await self._end(outcome, usage or (self.prompt_bound, chunks))
            yield sse.DONE

        async def on_end() -> None:
            if not began:  # the client left before the response started: the events never ran
                await response.aclose()
                await self._end(asyncio.CancelledError(), (self.prompt_bound, 0))

        return SettledSSE(events(), on_end)


class NoEngine:
    """The engine of a server without a local model (`lmforge serve --no-model`, a pure gateway): always ready,
    never busy. Nothing reaches `generate`: the local model has no name, so no request can ask for it."""

    def __init__(self, created: int) -> None:
        self._created = created
        self._torch: ThreadPoolExecutor | None = None

    def generate(
        self,
        prompt_ids: Any,
        params: SamplingParams,
        request_id: str,
        *,
        salt: str = "",
        lora: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        raise EngineDraining("this server has no local model")

    def arriving(self) -> AbstractContextManager[None]:
        return nullcontext()

    async def abort(self, request_id: str) -> None:
        return None

    async def run(self, fn: Callable[[], T]) -> T:
        """On one thread of its own: without an engine, it is the process's only thread running torch work."""
        if self._torch is None:
            self._torch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmforge-torch")
        return await asyncio.get_running_loop().run_in_executor(self._torch, fn)

    def health(self) -> EngineStats:
        return EngineStats(ready=True, draining=False, num_running=0, num_waiting=0, kv_cache_usage=0.0)

    def model_info(self) -> ModelInfo:
        return ModelInfo(name="", max_seq_len=0, vocab_size=0, created=self._created)
