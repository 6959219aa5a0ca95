"""The OpenAI-compatible server against a fake engine, over real HTTP (uvicorn on 127.0.0.1).

The official `openai` SDK is the client wherever it can be; raw httpx checks the wire format (SSE framing, error
bodies, status codes and headers) where the SDK would hide it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from lmforge.data.tokenizer import Tokenizer
from lmforge.engine import EngineDraining, EngineOverloaded
from lmforge.serve.app import DrainingServer, create_app
from lmforge.serve.routes.openai import INLINE_MESSAGES, INLINE_PROMPT_BYTES
from lmforge.serve.settings import Settings
from tests.serve.fake_engine import FakeEngine
from tests.serve.servers import free_port, serving_app

MODEL = "smollm2-test"
MAX_SEQ_LEN = 512
BODY_LIMIT = 64 * 1024
REPLY = " Hello there, friend! How are you today?"
USER = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(max_seq_len=MAX_SEQ_LEN)


@pytest.fixture(scope="module")
def base_url(engine, tokenizer) -> Iterator[str]:
    app = create_app(Settings(model_name=MODEL, max_queue=8, max_body_bytes=BODY_LIMIT), engine, tokenizer)
    with serving_app(app) as url:
        yield url


@pytest.fixture(autouse=True)
def fresh_engine(engine, tokenizer) -> FakeEngine:
    engine.reset()
    engine.script = tokenizer.encode(REPLY)
    return engine


@pytest.fixture
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def http(base_url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=10) as c:
        yield c


def reply_text(tokenizer: Tokenizer, engine: FakeEngine, n: int) -> str:
    return tokenizer.decode(engine.script[:n], skip_special_tokens=True)


def sse_events(text: str) -> list[str]:
    assert text.endswith("data: [DONE]\n\n")
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: ") :] for e in events]


# --- the SDK, happy paths -----------------------------------------------------------------------------


def test_chat_sync(client, engine, tokenizer):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=5)
    prompt_ids, params, _ = engine.requests[0]
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == reply_text(tokenizer, engine, 5)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt_ids), 5)
    assert r.usage.total_tokens == len(prompt_ids) + 5
    # the chat template's generation prompt ends the prompt; end-of-turn ids stop the engine
    assert tokenizer.decode(prompt_ids).endswith("<|im_start|>assistant\n")
    assert set(tokenizer.stop_ids) <= set(params.stop_token_ids)


STAGE = "All the world's a stage. "  # 25 ASCII characters


@pytest.mark.parametrize(
    ("text", "messages", "inline"),
    [
        ("Say hello.", 1, [True, True, True]),
        (STAGE * 36, 1, [True, True, True]),  # 900 bytes
        (STAGE * 64, 1, [False, False, False]),  # 1,600 bytes
        ("café " * 180, 1, [False, False, False]),  # 900 characters, 1,080 bytes: BPE works per byte
        ("Hi.", INLINE_MESSAGES, [True, True, True]),
        # more messages (prompts) than that: the template's own text adds up; one string prompt of 27 bytes
        ("Hi.", INLINE_MESSAGES + 1, [False, True, False]),
    ],
)
def test_only_short_prompts_are_tokenised_on_the_event_loop(
    client, engine, tokenizer, monkeypatch, text, messages, inline
):
    """A short prompt is rendered and tokenised on the event loop (a worker thread costs more CPU than the work);
    a long one on a worker thread, so it does not stall the loop's other streams. Chat, then completions with one
    string prompt, then with a list of them."""
    assert INLINE_PROMPT_BYTES == 1024 and len((STAGE * 36).encode()) <= 1024 < len(("café " * 180).encode())
    on_loop: list[bool] = []
    encode, encode_batch = tokenizer.encode, tokenizer.encode_batch

    def running_loop() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    def spy(fn):
        def wrapped(*args, **kwargs):
            on_loop.append(running_loop())
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(tokenizer, "encode", spy(encode))
    monkeypatch.setattr(tokenizer, "encode_batch", spy(encode_batch))
    chat = [{"role": "user", "content": text}] * messages
    client.chat.completions.create(model=MODEL, messages=chat, max_tokens=1)
    client.completions.create(model=MODEL, prompt=text * messages, max_tokens=1)
    client.completions.create(model=MODEL, prompt=[text] * messages, max_tokens=1)
    assert on_loop == inline
    # what was tokenised either way is the prompt itself
    ids = encode(text * messages, add_bos=tokenizer.add_bos_token)
    assert engine.requests[1][0] == ids
    assert [p for p, _, _ in engine.requests[2:]] == [
        encode(text, add_bos=tokenizer.add_bos_token)
    ] * messages


def test_chat_eos_finishes_with_stop(client, engine, tokenizer):
    engine.script = [
        *tokenizer.encode(" Hi!"),
        tokenizer.token_to_id("<|im_end|>"),
        *tokenizer.encode(" more"),
    ]
    r = client.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=50)
    assert r.choices[0].message.content == " Hi!"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(tokenizer.encode(" Hi!")) + 1  # the engine's count, eos included


def test_chat_stream_async_with_usage(base_url, engine, tokenizer):
    async def run() -> list:
        client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=7, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
        await client.close()
        return chunks

    chunks = asyncio.run(run())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert chunks[-1].usage.prompt_tokens == len(engine.requests[0][0])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == reply_text(tokenizer, engine, 7)
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_completions_sync_and_stream(client, engine, tokenizer):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4)
    assert r.object == "text_completion"
    assert r.choices[0].text == reply_text(tokenizer, engine, 4)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tokenizer.encode("Once upon a time"))
    assert r.usage.completion_tokens == 4

    chunks = list(client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=4, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == reply_text(tokenizer, engine, 4)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)
    assert engine.requests[-1][0] == [1, 2, 3]


def test_completions_batch_prompts_and_n(client, engine):
    r = client.completions.create(model=MODEL, prompt=["a b c", "d"], n=2, max_tokens=3, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    ids = [rid for _, _, rid in engine.requests]
    assert sorted(ids) == [f"{r.id}-{i}" for i in range(4)]
    seeds = {rid: params.seed for _, params, rid in engine.requests}
    assert [seeds[f"{r.id}-{i}"] for i in range(4)] == [7, 8, 9, 10]
    # each prompt is billed once, every choice's tokens are
    assert r.usage.prompt_tokens == 3 + 1 and r.usage.completion_tokens == 4 * 3


def test_chat_n2(client, engine, tokenizer):
    r = client.chat.completions.create(model=MODEL, messages=USER, n=2, max_tokens=3)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content == reply_text(tokenizer, engine, 3) for c in r.choices)
    assert r.usage.completion_tokens == 6 and len({rid for *_, rid in engine.requests}) == 2


def test_raw_sse_format(http, engine):
    body = {"model": MODEL, "messages": USER, "max_tokens": 3, "stream": True}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert all("usage" not in c for c in chunks)

    body |= {"stream_options": {"include_usage": True}}
    chunks = [json.loads(e) for e in sse_events(http.post("/v1/chat/completions", json=body).text)[:-1]]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


# --- stop strings, logprobs -----------------------------------------------------------------------


def test_stop_string_cuts_text_and_aborts(client, engine, tokenizer):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=50, stop=["friend"])
    assert r.choices[0].message.content == " Hello there, "
    assert r.choices[0].finish_reason == "stop"
    (rid,) = [rid for *_, rid in engine.requests]
    assert rid in engine.aborted
    generated = tokenizer.encode(" Hello there, friend")
    assert r.usage.completion_tokens == len(generated)  # what the engine made until the stop

    chunks = list(
        client.completions.create(model=MODEL, prompt="x", max_tokens=50, stop="there", stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == " Hello "
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 3
    assert "".join(t.token for t in content) == r.choices[0].message.content
    first = content[0]
    assert first.logprob == -0.25 and first.bytes == list(first.token.encode())
    assert len(first.top_logprobs) == 2 and first.top_logprobs[0].token == first.token


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="hi", max_tokens=3, logprobs=1)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.token_logprobs == [-0.25] * 3
    assert [list(d) for d in lp.top_logprobs] == [[t] for t in lp.tokens]
    assert lp.text_offset == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"model": "smollm2-test", "messages": [', None),
        ({"model": MODEL, "messages": "hello"}, "messages"),
        ({"model": MODEL, "messages": USER, "max_tokens": "ten"}, "max_tokens"),
        ({"model": MODEL, "messages": USER, "max_tokens": -1}, "max_tokens"),
        ({"model": MODEL, "messages": USER, "temperature": 3}, "temperature"),
        ({"model": MODEL, "messages": USER, "n": 0}, "n"),
        ({"model": MODEL, "messages": USER, "logprobs": False, "top_logprobs": 2}, None),
        ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None),
        ({"model": MODEL, "messages": USER, "response_format": {"type": "json_object"}}, None),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"messages": USER}, "model"),
    ],
)
def test_bad_requests_are_400(http, body, param):
    content = body if isinstance(body, str) else json.dumps(body)
    r = http.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param and set(error) == {"message", "type", "param", "code"}


def test_sdk_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=USER, temperature=3)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=-5)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=[10**9])


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=USER)
    assert e.value.body["code"] == "model_not_found"


def test_context_length(client, engine, tokenizer):
    prompt = "hello " * 600
    n = len(tokenizer.encode(prompt))
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=5)
    assert e.value.body["code"] == "context_length_exceeded"
    assert str(MAX_SEQ_LEN) in e.value.body["message"] and str(n) in e.value.body["message"]
    assert engine.requests == []
    # a prompt that fits with a max_tokens that does not: clamped to what fits
    client.completions.create(model=MODEL, prompt="hello " * 100, max_tokens=10_000)
    prompt_ids, params, _ = engine.requests[0]
    assert params.max_tokens == MAX_SEQ_LEN - len(prompt_ids)


def test_overloaded_is_429(http, engine):
    engine.fail = EngineOverloaded()
    for stream in (False, True):
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "stream": stream})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    engine.fail, engine.num_waiting = None, 8  # the server's own queue limit (max_queue=8)
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 429 and engine.requests == []


def test_draining_is_503(client, http, engine):
    engine.fail = EngineDraining()
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=MODEL, messages=USER)
    assert e.value.status_code == 503
    engine.fail, engine.draining = None, True
    assert http.post("/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 503


def test_body_too_large_is_413(http):
    big = {"model": MODEL, "prompt": "x" * BODY_LIMIT}
    r = http.post("/v1/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield json.dumps(big).encode()

    r = http.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_error_after_stream_began(http, engine, tokenizer):
    # the second choice fails after the first has already started streaming
    original = engine.generate

    async def flaky(prompt_ids, params, request_id, *, salt=""):
        if request_id.endswith("-1"):
            await asyncio.sleep(0.05)
            raise RuntimeError("engine exploded")
        async for out in original(prompt_ids, params, request_id):
            yield out

    engine.generate = flaky
    engine.delay = 0.01
    try:
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "n": 2, "stream": True})
    finally:
        del engine.generate
    events = sse_events(r.text)
    assert r.status_code == 200 and events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "internal_server_error" and "exploded" not in error["message"]


# --- disconnects ----------------------------------------------------------------------------------


def test_disconnect_mid_stream_aborts(base_url, engine):
    engine.delay = 0.02
    body = {"model": MODEL, "messages": USER, "max_tokens": 1000, "stream": True}
    with (
        httpx.Client(base_url=base_url, timeout=10) as c,
        c.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        (rid,) = [rid for *_, rid in engine.requests]
        closed_at = time.monotonic()
    deadline = closed_at + 1.0
    while rid not in engine.aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rid in engine.aborted, "the engine request was not aborted within a second of the disconnect"
    assert engine.aborted[rid] - closed_at < 1.0


# --- operations -------------------------------------------------------------------------------------


def test_health_ready_metrics(http, engine, client):
    assert http.get("/health").status_code == 200
    engine.ready = False
    assert http.get("/ready").status_code == 503
    assert http.post("/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 503
    engine.ready = True
    assert http.get("/ready").status_code == 200
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]

    def chat_count() -> float:
        text = http.get("/metrics").text
        line = 'lmforge_requests_total{endpoint="/v1/chat/completions",status="200"}'
        return next((float(x.split()[-1]) for x in text.splitlines() if x.startswith(line)), 0.0)

    before = chat_count()
    client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
    assert chat_count() == before + 1
    text = http.get("/metrics").text
    for name in (
        "lmforge_prompt_tokens_total",
        "lmforge_generation_tokens_total",
        "lmforge_time_to_first_token_seconds_bucket",
        "lmforge_inter_token_latency_seconds_bucket",
        "lmforge_e2e_request_latency_seconds_bucket",
        "lmforge_num_requests_waiting",
        "lmforge_num_requests_running",
        "lmforge_kv_cache_usage_ratio 0.25",
        "lmforge_prefix_cache_queries_total 100",
        "lmforge_prefix_cache_hits_total 40",
        "lmforge_num_preemptions_total 2",
    ):
        assert name in text, name


def test_shutdown_drains_running_streams(tokenizer):
    engine = FakeEngine(script=tokenizer.encode(REPLY), delay=0.02)
    app = create_app(Settings(model_name=MODEL, drain_timeout_s=5), engine, tokenizer)
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=5
    )
    server = DrainingServer(config, app.state.lmforge)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    body = {"model": MODEL, "messages": USER, "max_tokens": 20, "stream": True}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
            assert app.state.lmforge.draining
            rest = "\n".join(lines)
    assert (
        rest.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in rest
    )  # finished, not cut off
    thread.join(timeout=5)
    assert not thread.is_alive()


# --- fuzzing ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_schema(tokenizer):
    # a short context keeps the fuzzer's huge max_tokens cheap (they are clamped to it)
    app = create_app(Settings(model_name=MODEL), FakeEngine(max_seq_len=32), tokenizer)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzz_no_server_errors(api_schema, mode):
    """Schemathesis cases for every operation, valid and invalid, must never get a 5xx."""

    @given(case=api_schema.as_strategy(mode))
    @settings(max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case):
        if mode == GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = MODEL  # reach the engine, not only the 404 (tested above)
        response = case.call()
        assert response.status_code < 500, (case.method, case.path, case.body, response.text)
        case.validate_response(response, checks=[not_a_server_error])

    check()
