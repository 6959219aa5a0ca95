"""The metered server (keys, rate limits, budgets, the ledger) over real HTTP with a fake engine and a real
database, SQLite and PostgreSQL: uvicorn on 127.0.0.1 in a thread, the official `openai` SDK and raw httpx.

What is checked: the status of every refusal (401, 403, 429 in OpenAI's shape and headers), the x-ratelimit-*
headers on every authenticated response, and that each way a request can end leaves exactly one settled ledger
row whose tokens are those the client was told, at the price in force, with every hold released.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from types import SimpleNamespace

import httpx
import openai
import pytest
import sqlalchemy as sa

from lmforge.serve import auth, metering
from lmforge.serve.app import create_app
from lmforge.serve.db import api_keys, instances, rate_windows, tenant_months, utcnow
from lmforge.serve.routes.openai import Meter
from lmforge.serve.settings import Settings
from tests.serve.conftest import recorded_statements
from tests.serve.fake_engine import FakeEngine
from tests.serve.servers import (
    bearer,
    ledger_rows,
    metric,
    new_key,
    post_and_leave,
    sdk,
    serving_app,
    settled_row,
    wait_until,
)

MODEL = "smollm2-test"
REPLY = " Hello there, friend! How are you today?"
USER = [{"role": "user", "content": "Say hello."}]
IN_PRICE, OUT_PRICE = 2_000_000, 3_000_000  # $2 and $3 per million tokens, in micro-USD per million tokens


@pytest.fixture
def engine(tokenizer) -> FakeEngine:
    return FakeEngine(max_seq_len=512, script=tokenizer.encode(REPLY))


@contextmanager
def serving(database, engine, tokenizer, *, grace_s: float = 5.0, **settings) -> Iterator[str]:
    """The metered app on a free port for the block: its base URL."""
    settings = {"heartbeat_s": 0.2, "stale_after_s": 1.0} | settings
    app = create_app(Settings(model_name=MODEL, **settings), engine, tokenizer, db=database)
    with serving_app(app, grace_s) as url:
        yield url


@pytest.fixture
def url(database, engine, tokenizer) -> Iterator[str]:
    with serving(database, engine, tokenizer) as base:
        yield base


def assert_books_balance(database) -> None:
    """Every row settled and priced at its own prices; each tenant month's totals are the sum of its rows."""
    ledger = ledger_rows(database)
    assert all(r.status in ("completed", "cancelled", "failed") for r in ledger), ledger
    assert all(r.reserved_pusd == 0 and r.finished_at is not None for r in ledger)
    for r in ledger:
        cost = r.prompt_tokens * r.input_uusd_per_mtok + r.completion_tokens * r.output_uusd_per_mtok
        assert r.cost_pusd == cost
    with database.read() as conn:
        months = conn.execute(sa.select(tenant_months)).all()
    for m in months:
        mine = [
            r for r in ledger if r.tenant_id == m.tenant_id and metering.month_of(r.started_at) == m.month
        ]
        assert (m.spent_pusd, m.reserved_pusd) == (sum(r.cost_pusd for r in mine), 0)


def priced(database) -> None:
    metering.set_price(database, MODEL, input_usd="2", output_usd="3")


def cost(prompt: int, completion: int) -> int:
    return prompt * IN_PRICE + completion * OUT_PRICE


# --- authentication -----------------------------------------------------------------------------------


def test_missing_malformed_and_unknown_keys_are_401(url, database, engine):
    new_key(database)
    for headers in ({}, {"Authorization": "Basic dXNlcjpwYXNz"}, bearer("lmf-not-a-real-key-at-all")):
        for method, path, body in (
            ("POST", "/v1/chat/completions", {"model": MODEL, "messages": USER}),
            ("POST", "/v1/completions", {"model": MODEL, "prompt": "x"}),
            ("GET", "/v1/models", None),
            ("GET", f"/v1/models/{MODEL}", None),
        ):
            r = httpx.request(method, url + path, json=body, headers=headers)
            assert r.status_code == 401, (headers, path, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key"
            assert not any(h.startswith("x-ratelimit") for h in r.headers)
    with pytest.raises(openai.AuthenticationError) as e:
        sdk(url, "lmf-wrong").chat.completions.create(model=MODEL, messages=USER)
    assert e.value.status_code == 401 and "Incorrect API key" in e.value.body["message"]
    assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/ready").status_code == 200
    assert engine.requests == [] and ledger_rows(database) == []


def test_revoked_expired_and_not_allowed_keys_are_403(url, database, engine):
    revoked, revoked_secret = new_key(database)
    auth.revoke_key(database, str(revoked.id))
    expired, expired_secret = new_key(database)
    with database.write() as conn:  # create_key refuses a past expiry, so age the key in place
        past = utcnow() - timedelta(seconds=1)
        conn.execute(sa.update(api_keys).where(api_keys.c.id == expired.id).values(expires_at=past))
    _, narrow_secret = new_key(database, rpm=10, models=["another-model"])
    for secret, code in ((revoked_secret, "key_revoked"), (expired_secret, "key_expired")):
        with pytest.raises(openai.PermissionDeniedError) as e:
            sdk(url, secret).chat.completions.create(model=MODEL, messages=USER)
        assert e.value.status_code == 403 and e.value.body["code"] == code
        assert httpx.get(url + "/v1/models", headers=bearer(secret)).status_code == 403
    for stream in (False, True):
        r = httpx.post(
            url + "/v1/chat/completions",
            json={"model": MODEL, "messages": USER, "stream": stream},
            headers=bearer(narrow_secret),
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
        assert r.headers["x-ratelimit-remaining-requests"] == "10"  # authenticated, so headed; not counted
    # the model list shows a key only the models it may use; a pattern matches as in requests
    r = httpx.get(url + "/v1/models", headers=bearer(narrow_secret))
    assert r.status_code == 200 and r.json()["data"] == []
    _, pattern_secret = new_key(database, models=["smollm2-*"])
    r = httpx.get(url + "/v1/models", headers=bearer(pattern_secret))
    assert [m["id"] for m in r.json()["data"]] == [MODEL]
    # an unknown model is still a 404, whatever the key allows
    r = httpx.post(
        url + "/v1/completions", json={"model": "gpt-4", "prompt": "x"}, headers=bearer(narrow_secret)
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert engine.requests == [] and ledger_rows(database) == []


def test_a_key_revoked_after_the_server_cached_it_is_refused_with_nothing_consumed(url, database, engine):
    """The generation routes take their key from the process's cache; admit's own statement re-checks that it
    is not revoked, so a revocation by another process (here: straight to the database) holds at once."""
    priced(database)
    key, secret = new_key(database, rpm=10)
    ok = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=bearer(secret))
    assert ok.status_code == 200 and ok.headers["x-ratelimit-remaining-requests"] == "9"
    auth.revoke_key(database, str(key.id))
    for path, body in (  # the first finds the key cached and is refused by admit; the second reads it anew
        ("/v1/completions", {"model": MODEL, "prompt": "x"}),
        ("/v1/chat/completions", {"model": MODEL, "messages": USER, "stream": True}),
    ):
        with recorded_statements(database) as statements:
            r = httpx.post(url + path, json=body, headers=bearer(secret))
        key_lookups = sum("api_keys.key_hash" in sql for _, sql in statements)  # authenticate's read
        assert key_lookups == (0 if path == "/v1/completions" else 1), statements
        assert r.status_code == 403 and r.json()["error"]["code"] == "key_revoked", r.text
        assert r.json()["error"]["message"] == f"The API key {key.prefix}... has been revoked."
        assert not any(h.startswith("x-ratelimit") for h in r.headers)  # as any refused key
    assert httpx.get(url + "/v1/models", headers=bearer(secret)).status_code == 403
    assert len(engine.requests) == 1 and [r.request_id for r in ledger_rows(database)] == [ok.json()["id"]]
    with database.read() as conn:  # the refused requests charged nothing to the window
        assert conn.execute(sa.select(rate_windows.c.requests)).scalars().all() == [1]
    assert_books_balance(database)


# --- rate limits ---------------------------------------------------------------------------------------


def reset_seconds(value: str) -> int:
    m = re.fullmatch(r"(?:(\d+)m)?(\d+)s", value)
    assert m, value
    return int(m[1] or 0) * 60 + int(m[2])


def test_ratelimit_headers_on_every_authenticated_response(url, database, tokenizer):
    key, secret = new_key(database, rpm=5, tpm=10_000)
    client = sdk(url, secret)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=USER, max_tokens=5)
    prompt = raw.parse().usage.prompt_tokens
    h = raw.headers
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("5", "4")
    # the admission counts the prompt and max_tokens: the most the request may use
    assert (h["x-ratelimit-limit-tokens"], h["x-ratelimit-remaining-tokens"]) == (
        "10000",
        str(10_000 - prompt - 5),
    )
    assert 55 <= reset_seconds(h["x-ratelimit-reset-requests"]) <= 60
    assert 55 <= reset_seconds(h["x-ratelimit-reset-tokens"]) <= 60

    body = {"model": MODEL, "messages": USER, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=bearer(secret)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-ratelimit-remaining-requests"] == "3"
        assert r.headers["x-ratelimit-remaining-tokens"] == str(10_000 - 2 * prompt - 5 - 3)
        assert r.read().endswith(b"data: [DONE]\n\n")
    # prompts x n: the admission counts each prompt once and every choice's max_tokens
    body = {"model": MODEL, "prompt": ["a b c", "d"], "n": 2, "max_tokens": 3}
    r = httpx.post(url + "/v1/completions", json=body, headers=bearer(secret))
    assert r.json()["usage"] == {"prompt_tokens": 4, "completion_tokens": 12, "total_tokens": 16,
                                 "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip
    assert r.headers["x-ratelimit-remaining-tokens"] == str(10_000 - 2 * prompt - 5 - 3 - 16)
    assert r.headers["x-ratelimit-remaining-requests"] == "2"
    for r in (
        httpx.get(url + "/v1/models", headers=bearer(secret)),  # not counted, still headed
        httpx.post(
            url + "/v1/chat/completions", json={"model": MODEL, "messages": "hi"}, headers=bearer(secret)
        ),
    ):
        assert r.headers["x-ratelimit-remaining-requests"] == "2", r.text
    assert r.status_code == 400

    _, unlimited = new_key(database)
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1},
                   headers=bearer(unlimited))  # fmt: skip
    assert r.status_code == 200 and not any(h.startswith("x-ratelimit") for h in r.headers)


def test_rpm_n_plus_one_requests_get_exactly_one_429(url, database, engine):
    n = 4
    _, secret = new_key(database, rpm=n)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, headers=bearer(secret), timeout=10) as c:
            body = {"model": MODEL, "prompt": "Count:", "max_tokens": 2}
            return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(n + 1)))

    responses = asyncio.run(burst())
    assert sorted(r.status_code for r in responses) == [200] * n + [429]
    (refused,) = [r for r in responses if r.status_code == 429]
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert f"Limit {n}, Used {n}, Requested 1" in error["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-limit-requests"] == str(n)
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= reset_seconds(refused.headers["x-ratelimit-reset-requests"]) <= 60
    assert "x-should-retry" not in refused.headers  # it may succeed later: the SDK's backoff is welcome
    remaining = sorted(
        int(r.headers["x-ratelimit-remaining-requests"]) for r in responses if r.status_code == 200
    )
    assert remaining == list(range(n))
    assert len(engine.requests) == n and len(ledger_rows(database)) == n
    # every request was announced to the engine while it was admitted, the refused one too, and none still is
    assert (engine.arrivals, engine.arriving_now) == (n + 1, 0)
    with pytest.raises(openai.RateLimitError) as e:
        sdk(url, secret).completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert e.value.body["code"] == "rate_limit_exceeded"
    assert_books_balance(database)


def test_tpm_limit(url, database):
    _, secret = new_key(database, tpm=60)
    client = sdk(url, secret)
    with pytest.raises(openai.RateLimitError) as e:  # can never fit: not worth retrying
        client.completions.create(model=MODEL, prompt="hi", max_tokens=100)
    assert e.value.body["type"] == "tokens" and e.value.response.headers["x-should-retry"] == "false"
    first = client.completions.create(model=MODEL, prompt=[1, 2, 3, 4, 5], max_tokens=25)  # 30 of 60
    assert first.usage.total_tokens == 30
    client.completions.create(model=MODEL, prompt=[1, 2, 3, 4, 5], max_tokens=25)  # 60 of 60
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model=MODEL, prompt=[1], max_tokens=1)
    assert (
        e.value.body["type"] == "tokens" and e.value.response.headers["x-ratelimit-remaining-tokens"] == "0"
    )
    assert len(ledger_rows(database)) == 2


# --- budgets -------------------------------------------------------------------------------------------


def test_budget_exhausted_is_insufficient_quota_and_not_retried(url, database, engine):
    priced(database)
    key, secret = new_key(database, "acme")
    prompt = [1, 2, 3, 4, 5, 6, 7]
    one = cost(len(prompt), 5)  # each request: 7 prompt + at most 5 completion tokens
    metering.set_budget(database, "acme", str(metering.format_usd(2 * one + one // 2)))
    sent = []
    client = openai.OpenAI(
        base_url=f"{url}/v1",
        api_key=secret,
        max_retries=2,  # the SDK's default: a 429 is retried unless the server says not to
        http_client=httpx.Client(event_hooks={"request": [sent.append]}),
    )
    for _ in range(2):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (7, 5)
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=5)
    assert len(sent) == 3, "the SDK retried an insufficient_quota 429"
    assert e.value.status_code == 429
    assert e.value.body["code"] == "insufficient_quota" and e.value.body["type"] == "insufficient_quota"
    assert e.value.response.headers["x-should-retry"] == "false"
    # a smaller request still fits what is left
    r = client.completions.create(model=MODEL, prompt=[1], max_tokens=1)
    assert r.usage.total_tokens == 2
    ledger = ledger_rows(database)
    assert len(ledger) == 3 and len(engine.requests) == 3
    assert [r.cost_pusd for r in ledger] == [one, one, cost(1, 1)]
    budget = metering.budget_status(database, "acme", metering.month_of(utcnow()))
    assert budget.spent_pusd == 2 * one + cost(1, 1) <= budget.limit_pusd and budget.reserved_pusd == 0
    assert_books_balance(database)


# --- settling each way a request ends --------------------------------------------------------------------


def test_non_streamed_and_streamed_completions_bill_what_the_client_was_told(url, database):
    priced(database)
    _, secret = new_key(database)
    client = sdk(url, secret)
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=6)
    row = settled_row(database, r.id)
    assert (row.status, row.prompt_tokens, row.completion_tokens) == (
        "completed", r.usage.prompt_tokens, r.usage.completion_tokens)  # fmt: skip
    assert row.cost_pusd == cost(r.usage.prompt_tokens, 6) and row.model == MODEL and row.error is None

    # batch prompts x n: each prompt billed once, every choice's tokens billed
    r = client.completions.create(model=MODEL, prompt=["a b c", "d"], n=2, max_tokens=3)
    row = settled_row(database, r.id)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (4, 12)
    assert (row.prompt_tokens, row.completion_tokens, row.cost_pusd) == (4, 12, cost(4, 12))

    stream = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=7, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    told = chunks[-1].usage
    # settled before [DONE] was sent: no waiting
    (row,) = [x for x in ledger_rows(database) if x.request_id == chunks[0].id]
    assert (row.status, row.prompt_tokens, row.completion_tokens) == (
        "completed", told.prompt_tokens, told.completion_tokens)  # fmt: skip
    assert told.completion_tokens == 7

    completion_chunks = list(client.completions.create(model=MODEL, prompt="x", max_tokens=4, stream=True))
    row = settled_row(database, completion_chunks[0].id)
    assert (row.status, row.completion_tokens) == ("completed", 4)
    assert_books_balance(database)
    # /metrics counts the ledger's batches: four requests one after another, four admits and four settles
    for kind in ("admit", "settle"):
        for stat in ("count", "sum"):
            assert metric(url, f'lmforge_ledger_batch_size_{stat}{{kind="{kind}"}}') == 4.0, (kind, stat)


def test_the_request_paths_database_work_runs_on_the_one_ledger_thread(database, engine, tokenizer):
    priced(database)
    _, secret = new_key(database)
    with serving(
        database, engine, tokenizer, heartbeat_s=3600, stale_after_s=7200
    ) as base:  # no heartbeat now
        with recorded_statements(database) as statements:
            client = sdk(base, secret)
            client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3)
            list(client.completions.create(model=MODEL, prompt="x", max_tokens=2, stream=True))
    threads = [thread for thread, _ in statements]
    assert len(threads) >= 5 and {t.split("_")[0] for t in threads} == {"lmforge-ledger"}, statements
    # the key is read once: the second request finds it in the process's KeyCache
    assert sum(sql.lstrip().startswith("SELECT api_keys.id") for _, sql in statements) == 1, statements
    assert_books_balance(database)


def test_stream_cancelled_midway_bills_what_was_generated(url, database, engine):
    priced(database)
    _, secret = new_key(database)
    engine.delay = 0.02
    client = sdk(url, secret)
    for kind in ("chat", "completion"):
        if kind == "chat":
            stream = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1000, stream=True)
            contents = lambda c: c.choices[0].delta.content  # noqa: E731
        else:
            stream = client.completions.create(model=MODEL, prompt="x y z", max_tokens=1000, stream=True)
            contents = lambda c: c.choices[0].text  # noqa: E731
        received = 0
        for chunk in stream:
            received += bool(contents(chunk))
            if received == 3:
                break
        stream.close()
        row = settled_row(database, chunk.id)
        assert row.status == "cancelled" and row.error is None
        assert 3 <= row.completion_tokens < 1000 and row.prompt_tokens == len(engine.requests[-1][0])
        assert row.cost_pusd == cost(row.prompt_tokens, row.completion_tokens)
    assert_books_balance(database)


def test_client_leaving_before_the_stream_starts_is_settled(url, database, engine):
    """The client hangs up while the server waits for the first token: the request is aborted and settled."""
    priced(database)
    _, secret = new_key(database)
    engine.delay = 0.3
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1000, "stream": True}
    post_and_leave(url, "/v1/completions", body, secret, lambda: bool(engine.running), linger_s=0)
    (_, _, rid) = engine.requests[0]
    row = settled_row(database, rid.rsplit("-", 1)[0])
    assert row.status == "cancelled" and 1 <= row.completion_tokens <= 3  # the first token(s), not 1000
    deadline = time.monotonic() + 2
    while rid not in engine.aborted:
        assert time.monotonic() < deadline, "the engine request was not aborted"
        time.sleep(0.02)
    assert_books_balance(database)


def test_stream_whose_response_cannot_start_is_settled(database, engine, tokenizer):
    """An ASGI 2.4 server raises OSError from send() once the client is gone. If that happens at the response's
    start, the stream's event generator never begins (nor its cleanup): the request is still aborted and billed
    for what was generated, the first token."""
    priced(database)
    _, secret = new_key(database)
    app = create_app(Settings(model_name=MODEL), engine, tokenizer, db=database)
    body = json.dumps(
        {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1000, "stream": True}
    ).encode()
    headers = {"host": "test", "content-type": "application/json", "content-length": str(len(body)),
               "authorization": f"Bearer {secret}"}  # fmt: skip
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80),
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()], "state": {},
    }  # fmt: skip
    incoming = [{"type": "http.request", "body": body, "more_body": False}, {"type": "http.disconnect"}]
    sent = []

    async def receive() -> dict:
        return incoming.pop(0) if incoming else await asyncio.Future()

    async def send(message: dict) -> None:
        sent.append(message["type"])
        raise OSError("the client went away")

    asyncio.run(app(scope, receive, send))
    assert sent == ["http.response.start"]
    (_, _, rid) = engine.requests[0]
    assert rid in engine.aborted
    (row,) = ledger_rows(database)
    assert (row.status, row.completion_tokens) == ("cancelled", 1)
    assert row.cost_pusd == cost(row.prompt_tokens, 1) and row.prompt_tokens == len(engine.requests[0][0])
    assert_books_balance(database)


def test_client_leaving_a_non_streamed_request_bills_what_was_generated(url, database, engine):
    priced(database)
    _, secret = new_key(database)
    engine.delay = 0.02
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1000}
    post_and_leave(url, "/v1/completions", body, secret, lambda: bool(engine.running))
    (_, _, rid) = engine.requests[0]
    row = settled_row(database, rid.rsplit("-", 1)[0])
    assert row.status == "cancelled" and 1 <= row.completion_tokens < 1000
    assert row.cost_pusd == cost(row.prompt_tokens, row.completion_tokens)
    assert_books_balance(database)


def test_engine_errors_are_failed_rows(url, database, engine, tokenizer):
    priced(database)
    _, secret = new_key(database)
    engine.fail = RuntimeError("engine exploded")  # before the first token
    with pytest.raises(openai.InternalServerError):
        sdk(url, secret).completions.create(model=MODEL, prompt="x", max_tokens=5)
    (row,) = ledger_rows(database)
    assert (row.status, row.prompt_tokens, row.completion_tokens, row.cost_pusd) == ("failed", 0, 0, 0)
    assert "engine exploded" in row.error
    engine.fail = None

    original = engine.generate  # the second choice fails once the first has streamed a while

    async def flaky(prompt_ids, params, request_id, *, salt=""):
        if request_id.endswith("-1"):
            await asyncio.sleep(0.1)
            raise RuntimeError("engine exploded mid-stream")
        async for out in original(prompt_ids, params, request_id, salt=salt):
            yield out

    engine.generate, engine.delay = flaky, 0.01
    body = {"model": MODEL, "messages": USER, "n": 2, "max_tokens": 1000, "stream": True}
    r = httpx.post(url + "/v1/chat/completions", json=body, headers=bearer(secret))
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    assert events[-1] == "[DONE]" and "error" in json.loads(events[-2])
    streamed = sum(
        bool(c["choices"] and c["choices"][0]["delta"].get("content")) for c in map(json.loads, events[:-2])
    )
    row = settled_row(database, json.loads(events[0])["id"])
    assert row.status == "failed" and "mid-stream" in row.error
    assert row.completion_tokens >= streamed > 0 and row.cost_pusd == cost(
        row.prompt_tokens, row.completion_tokens
    )
    assert_books_balance(database)


def test_request_cancelled_by_shutdown_is_still_settled(database, engine, tokenizer):
    """uvicorn cancels the requests still running when the graceful shutdown times out: they are settled."""
    _, secret = new_key(database)
    engine.delay = 0.02
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1000}
    with serving(database, engine, tokenizer, grace_s=0.3) as base:
        pending = threading.Thread(
            target=lambda: httpx.post(
                base + "/v1/completions", json=body, headers=bearer(secret), timeout=10
            ),
            daemon=True,
        )
        pending.start()
        wait_until(lambda: bool(engine.running), "the request was admitted and is generating")
        time.sleep(0.2)
    (row,) = ledger_rows(database)
    assert row.status == "cancelled" and row.completion_tokens > 0 and row.reserved_pusd == 0
    assert_books_balance(database)


def test_a_request_cancelled_while_the_ledger_admits_it_releases_its_hold_at_once(
    database, engine, tokenizer
):
    """A task cancelled while its admit is on the ledger thread (uvicorn giving up on shutdown): the admit's
    outcome is still awaited, and the admission is released (settled as cancelled, nothing billed) before the
    cancellation goes on, so no hold waits for the stale-row reconciliation."""
    priced(database)
    key, _ = new_key(database)
    state = create_app(Settings(model_name=MODEL), engine, tokenizer, db=database).state.lmforge
    request = SimpleNamespace(state=SimpleNamespace(), headers={})  # what Meter reads of the request
    meter = Meter(request, state, key, MODEL, request_id="cmpl-1", prompt_tokens=5, max_completion_tokens=9,
                  billed=lambda: (5, 0))  # fmt: skip

    async def main() -> None:
        gate = threading.Event()
        busy = state.ledger.run(gate.wait, 30)  # the ledger thread is busy: the admit queues behind it
        admitting = asyncio.ensure_future(meter.admit())
        await asyncio.sleep(0.1)  # the admit is queued (its first loop turn) and waits for the ledger
        admitting.cancel()
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, gate.set)  # the ledger goes on while the cancelled task waits for the outcome
        with pytest.raises(asyncio.CancelledError):
            await admitting
        assert await busy

    asyncio.run(main())
    state.ledger.close()
    (row,) = ledger_rows(database)
    assert (row.request_id, row.status, row.prompt_tokens, row.completion_tokens, row.cost_pusd) == (
        "cmpl-1", "cancelled", 0, 0, 0)  # fmt: skip
    assert meter.admission is None and engine.requests == []
    assert_books_balance(database)


# --- tenants apart, processes that died ------------------------------------------------------------------


def test_prefix_cache_is_salted_per_tenant(url, database, engine):
    a, a_secret = new_key(database, "alpha")
    b, b_secret = new_key(database, "beta")
    salts = []
    original = engine.generate

    def recording(prompt_ids, params, request_id, *, salt=""):
        salts.append(salt)
        return original(prompt_ids, params, request_id, salt=salt)

    engine.generate = recording
    for secret in (a_secret, b_secret, a_secret):
        sdk(url, secret).chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
    assert salts == [f"tenant:{a.tenant_id}", f"tenant:{b.tenant_id}", f"tenant:{a.tenant_id}"]
    assert a.tenant_id != b.tenant_id


def test_start_up_settles_what_a_dead_process_left_pending(database, engine, tokenizer):
    priced(database)
    key, secret = new_key(database, rpm=100)
    long_ago = utcnow() - timedelta(minutes=5)
    dead = metering.register_instance(database, now=long_ago)
    held = metering.admit(
        database,
        key,
        MODEL,
        request_id="cmpl-orphan",
        prompt_tokens=10,
        max_completion_tokens=20,
        instance_id=dead,
    )
    assert held.reserved_pusd == cost(10, 20)
    with serving(database, engine, tokenizer, heartbeat_s=0.1, stale_after_s=0.5) as base:
        (row,) = ledger_rows(database)  # the lifespan ran before the first request could
        assert (row.status, row.error, row.cost_pusd) == ("failed", metering.STALE_ERROR, 0)
        assert_books_balance(database)
        r = sdk(base, secret).completions.create(model=MODEL, prompt="x", max_tokens=2)
        with database.read() as conn:
            beats = conn.execute(sa.select(instances)).all()
        assert [b.id for b in beats] == [
            ledger_rows(database)[-1].instance_id
        ]  # only this live process is left

        def heartbeat_at():
            with database.read() as conn:
                return conn.execute(sa.select(instances.c.heartbeat_at)).scalar_one()

        wait_until(lambda: heartbeat_at() > beats[0].heartbeat_at, "a heartbeat (every 0.1 s)", timeout=5)
    assert settled_row(database, r.id).status == "completed"
    with database.read() as conn:  # a clean shutdown unregisters the process
        assert conn.execute(sa.select(instances)).all() == []


# --- `lmforge serve`'s metering options: refused in a second, before any model loads -------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--no-auth", "--admin-token", "secret"], "--no-auth serves without a database"),
        (["--no-auth", "--database-url", "sqlite:///x.db"], "--no-auth serves without a database"),
        (["--heartbeat", "2", "--stale-after", "1"], "must be longer than the heartbeat interval"),
        (["--database-url", "mysql://u:p@h/db"], "unsupported database 'mysql'"),
    ],
)
def test_serve_refuses_bad_metering_options(args, fragment, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge", "serve", "no-such-model", *args],
        env={**os.environ, "LMFORGE_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert fragment in line, line
