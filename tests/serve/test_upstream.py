"""Upstream models through the metered gateway, over real HTTP: two servers on 127.0.0.1, the official `openai`
SDK as the client, both ledgers read straight from their databases.

The upstream is another lmforge server (uvicorn in a thread around `create_app`), metered with its own SQLite
ledger and key, with the fake engine: its replies and token counts are exact and repeatable, it can be made
slow (cancellations, timeouts), and it starts in milliseconds where a subprocess with a model takes seconds. The
gateway sees a real OpenAI-compatible HTTP server, so nothing on the path under test is faked. The gateway is a
pure gateway (no local model, as `lmforge serve --no-model`), on SQLite and on PostgreSQL; the last tests run
the real `lmforge serve --no-model --upstreams FILE` command.

What is checked: the upstream's text and usage reach the client unchanged; the gateway's ledger row holds
exactly that usage, which is also the upstream's own ledger row; holds, refusals and allow-lists act before the
upstream is contacted; a client that leaves closes the upstream request and is billed as documented in
lmforge/serve/upstream.py; upstream errors keep their status; unreachable and slow upstreams are 502 and 504.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.serve import metering
from lmforge.serve.app import create_app
from lmforge.serve.db import Database
from lmforge.serve.protocol import ChatCompletionRequest
from lmforge.serve.settings import Settings, UpstreamSettings
from lmforge.serve.upstream import (
    MESSAGE_OVERHEAD_TOKENS,
    PROMPT_OVERHEAD_TOKENS,
    REQUEST_OVERHEAD_TOKENS,
    NoEngine,
    prompt_bound,
)
from tests.serve.fake_engine import FakeEngine
from tests.serve.servers import (
    bearer,
    free_port,
    ledger_rows,
    new_key,
    post_and_leave,
    sdk,
    serving_app,
    wait_ready,
)

REMOTE = "smollm2-test"  # the upstream's own name for its model
MODEL = "remote-chat"  # the name the gateway serves it under
REPLY = " Hello there, friend! How are you today?"
USER = [{"role": "user", "content": "Say hello."}]
USER_BOUND = 38 + MESSAGE_OVERHEAD_TOKENS + REQUEST_OVERHEAD_TOKENS  # {"role":"user","content":"Say hello."}
PROMPT = "Once upon a time"
PROMPT_BOUND = 16 + PROMPT_OVERHEAD_TOKENS
DEFAULT_MAX = 8  # the upstream entry's max_tokens
IN_PRICE, OUT_PRICE = 2_000_000, 3_000_000  # $2 and $3 per million tokens


def settled(db: Database, count: int, timeout: float = 5.0) -> list:
    """The ledger once it has `count` rows, none pending."""
    deadline = time.monotonic() + timeout
    while True:
        ledger = ledger_rows(db)
        if len(ledger) == count and all(r.status != "pending" for r in ledger):
            return ledger
        assert time.monotonic() < deadline, ledger
        time.sleep(0.02)


def first(tokenizer: Tokenizer, n: int) -> str:
    """The upstream's text for max_tokens=n: the first n tokens of REPLY."""
    return tokenizer.decode(tokenizer.encode(REPLY)[:n])


def cost(prompt: int, completion: int) -> int:
    return prompt * IN_PRICE + completion * OUT_PRICE


class Upstream:
    """The upstream lmforge server: its engine, its ledger and the gateway's key on it."""

    def __init__(self, engine: FakeEngine, db: Database, url: str, secret: str) -> None:
        self.engine, self.db, self.url, self.secret = engine, db, url, secret

    def client(self) -> openai.OpenAI:
        return sdk(self.url, self.secret)


@pytest.fixture
def upstream(tokenizer, tmp_path, monkeypatch) -> Iterator[Upstream]:
    db = Database(f"sqlite:///{tmp_path / 'upstream.db'}")
    db.upgrade()
    _, secret = new_key(db, "gateway")
    monkeypatch.setenv("LMF_TEST_UPSTREAM_KEY", secret)
    monkeypatch.setenv("LMF_TEST_WRONG_KEY", "lmf-this-key-is-wrong-SECRETPART")
    engine = FakeEngine(max_seq_len=512, script=tokenizer.encode(REPLY))
    settings = Settings(model_name=REMOTE, heartbeat_s=0.2, stale_after_s=1.0)
    with serving_app(create_app(settings, engine, tokenizer, db=db)) as url:
        yield Upstream(engine, db, url, secret)
    db.close()


def upstream_entries(url: str) -> tuple[UpstreamSettings, ...]:
    key = "LMF_TEST_UPSTREAM_KEY"
    return (
        UpstreamSettings(MODEL, f"{url}/v1", REMOTE, api_key_env=key, max_tokens=DEFAULT_MAX, timeout_s=10),
        UpstreamSettings("slow", f"{url}/v1", REMOTE, api_key_env=key, timeout_s=0.3),
        UpstreamSettings("misnamed", f"{url}/v1/", "no-such-model", api_key_env=key),
        UpstreamSettings("wrong-key", f"{url}/v1", REMOTE, api_key_env="LMF_TEST_WRONG_KEY"),
        UpstreamSettings("down", f"http://127.0.0.1:{free_port()}/v1", owned_by="vllm"),
    )


@pytest.fixture
def gateway(database, upstream) -> Iterator[str]:
    """A pure gateway (no local model) in front of the upstream, metered with `database`."""
    settings = Settings(
        model_name=None, upstreams=upstream_entries(upstream.url), heartbeat_s=0.2, stale_after_s=1.0
    )
    with serving_app(create_app(settings, NoEngine(created=1_700_000_000), None, db=database)) as url:
        yield url


def priced(db: Database) -> None:
    metering.set_price(db, MODEL, input_usd="2", output_usd="3")


# --- models ------------------------------------------------------------------------------------------------


def test_models_lists_the_upstream_models(gateway, database):
    _, secret = new_key(database)
    client = sdk(gateway, secret)
    cards = httpx.get(gateway + "/v1/models", headers=bearer(secret)).json()["data"]
    assert [c["id"] for c in cards] == [MODEL, "slow", "misnamed", "wrong-key", "down"]
    assert cards[0] == {"id": MODEL, "object": "model", "created": 1_700_000_000, "owned_by": "upstream",
                        "max_model_len": None, "root": REMOTE, "parent": None}  # fmt: skip
    assert cards[-1]["owned_by"] == "vllm"  # an entry's own owned_by
    assert client.models.retrieve(MODEL).root == REMOTE
    r = httpx.post(gateway + "/v1/chat/completions", json={"model": "gpt-4", "messages": USER},
                   headers=bearer(secret))  # fmt: skip
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "'remote-chat', 'slow'" in r.json()["error"]["message"]
    assert httpx.get(gateway + "/ready").json() == {"status": "ready"}


def test_a_gateway_with_a_local_model_lists_both(database, upstream, tokenizer):
    settings = Settings(model_name="local", upstreams=upstream_entries(upstream.url)[:1])
    app = create_app(settings, FakeEngine(script=[1, 2, 3]), tokenizer, db=database)
    _, secret = new_key(database)
    with serving_app(app) as url:
        client = sdk(url, secret)
        assert [m.id for m in client.models.list().data] == ["local", MODEL]
        local = client.completions.create(model="local", prompt=[5, 6], max_tokens=2)
        remote = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    assert local.usage.prompt_tokens == 2 and remote.usage.completion_tokens == 2
    assert [(r.model, r.status) for r in ledger_rows(database)] == [
        ("local", "completed"),
        (MODEL, "completed"),
    ]


# --- what the client gets, and what is billed ------------------------------------------------------------


def test_non_streamed_chat_and_completion_bill_the_upstream_usage(gateway, database, upstream, tokenizer):
    priced(database)
    _, secret = new_key(database, tpm=100_000)
    client = sdk(gateway, secret)
    direct = upstream.client().chat.completions.create(model=REMOTE, messages=USER, max_tokens=6)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=USER, max_tokens=6)
    r = raw.parse()
    assert r.choices[0].message.content == direct.choices[0].message.content == first(tokenizer, 6)
    assert r.usage == direct.usage and r.usage.completion_tokens == 6
    assert r.model == MODEL and r.id.startswith("chatcmpl-") and r.id != direct.id
    # the hold: the prompt bound (>= the real prompt) + max_tokens, counted against the key's TPM
    assert USER_BOUND >= r.usage.prompt_tokens
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(100_000 - USER_BOUND - 6)
    (row,) = [x for x in settled(database, 1) if x.request_id == r.id]
    assert (row.status, row.model, row.prompt_tokens, row.completion_tokens, row.cost_pusd) == (
        "completed", MODEL, r.usage.prompt_tokens, 6, cost(r.usage.prompt_tokens, 6))  # fmt: skip
    up_rows = settled(upstream.db, 2)  # the direct call, then the gateway's
    assert (up_rows[1].prompt_tokens, up_rows[1].completion_tokens) == (row.prompt_tokens, 6)
    assert upstream.engine.requests[-1][1].max_tokens == 6

    # no max_tokens: the entry's default is held and sent, so the upstream cannot go past it
    c = client.completions.create(model=MODEL, prompt=PROMPT)
    assert upstream.engine.requests[-1][1].max_tokens == DEFAULT_MAX
    assert c.choices[0].text == first(tokenizer, DEFAULT_MAX) and c.choices[0].finish_reason == "length"
    assert c.usage.completion_tokens == DEFAULT_MAX and c.usage.prompt_tokens == 4 <= PROMPT_BOUND
    row = [x for x in settled(database, 2) if x.request_id == c.id][0]
    assert (row.prompt_tokens, row.completion_tokens) == (4, DEFAULT_MAX)
    assert (settled(upstream.db, 3)[-1].prompt_tokens, settled(upstream.db, 3)[-1].completion_tokens) == (
        4,
        8,
    )

    # several prompts x n: each prompt once, every output's tokens
    b = client.completions.create(model=MODEL, prompt=["a b c", "d"], n=2, max_tokens=3)
    assert (b.usage.prompt_tokens, b.usage.completion_tokens) == (4, 12)
    row = [x for x in settled(database, 3) if x.request_id == b.id][0]
    assert (row.prompt_tokens, row.completion_tokens) == (4, 12)


def test_streams_bill_the_upstream_usage_whether_or_not_the_client_asks_for_it(
    gateway, database, upstream, tokenizer
):
    priced(database)
    _, secret = new_key(database)
    client = sdk(gateway, secret)
    direct = list(upstream.client().chat.completions.create(
        model=REMOTE, messages=USER, max_tokens=7, stream=True, stream_options={"include_usage": True}))  # fmt: skip
    told = direct[-1].usage

    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, max_tokens=7, stream=True))
    assert all(c.usage is None for c in chunks)  # not asked for: the upstream's usage chunk is not passed on
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == first(tokenizer, 7)
    assert chunks[-1].choices[0].finish_reason == "length" and {c.id for c in chunks} == {chunks[0].id}
    (row,) = settled(database, 1)
    assert (row.request_id, row.status) == (chunks[0].id, "completed")
    assert (row.prompt_tokens, row.completion_tokens) == (told.prompt_tokens, told.completion_tokens) == (
        told.prompt_tokens, 7)  # fmt: skip

    chunks = list(client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=7, stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[-1].usage == told and chunks[-1].choices == []
    row = settled(database, 2)[-1]
    assert (row.prompt_tokens, row.completion_tokens, row.cost_pusd) == (
        told.prompt_tokens, 7, cost(told.prompt_tokens, 7))  # fmt: skip

    text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, stream=True,
                                     stream_options={"include_usage": True})  # fmt: skip
    chunks = list(text)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == first(tokenizer, 4)
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].usage.prompt_tokens == 4
    row = settled(database, 3)[-1]
    assert (row.request_id, row.prompt_tokens, row.completion_tokens) == (chunks[0].id, 4, 4)
    up = settled(upstream.db, 4)
    assert [(r.prompt_tokens, r.completion_tokens) for r in up[1:]] == [
        (told.prompt_tokens, 7), (told.prompt_tokens, 7), (4, 4)]  # fmt: skip
    metering_totals = metering.usage_report(database, "acme", metering.month_of(row.started_at)).totals
    assert metering_totals.cost_pusd == sum(r.cost_pusd for r in ledger_rows(database))
    # /metrics counts the forwarded tokens per upstream, apart from the (absent) local engine's
    metrics = httpx.get(f"{gateway}/metrics").text
    ledger = ledger_rows(database)
    for name, column in (("prompt", "prompt_tokens"), ("generation", "completion_tokens")):
        found = re.search(
            rf'^lmforge_upstream_{name}_tokens_total{{upstream="{MODEL}"}} (\S+)$', metrics, re.M
        )
        assert found and float(found[1]) == sum(getattr(r, column) for r in ledger), metrics
    assert re.search(r"^lmforge_generation_tokens_total 0\.0$", metrics, re.M)


# --- refusals before the upstream is contacted -------------------------------------------------------------


def test_budget_refuses_before_contacting_the_upstream(gateway, database, upstream):
    priced(database)
    _, secret = new_key(database)
    metering.set_budget(database, "acme", metering.format_usd(cost(USER_BOUND, 5) - 1))
    with pytest.raises(openai.RateLimitError) as e:
        sdk(gateway, secret).chat.completions.create(model=MODEL, messages=USER, max_tokens=5)
    assert e.value.body["code"] == "insufficient_quota"
    assert e.value.response.headers["x-should-retry"] == "false"
    assert upstream.engine.requests == [] and ledger_rows(database) == []
    # a request whose hold fits goes through
    r = sdk(gateway, secret).chat.completions.create(model=MODEL, messages=USER, max_tokens=4)
    assert r.usage.completion_tokens == 4 and len(upstream.engine.requests) == 1


def test_a_keys_model_allow_list_applies_to_upstream_models(gateway, database, upstream):
    _, narrow = new_key(database, models=["some-other-model"])
    _, allowed = new_key(database, models=[MODEL])
    with pytest.raises(openai.PermissionDeniedError) as e:
        sdk(gateway, narrow).chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
    assert e.value.body["code"] == "model_not_allowed"
    r = httpx.post(gateway + "/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True},
                   headers=bearer(narrow))  # fmt: skip
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    r = httpx.post(gateway + "/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 401
    assert upstream.engine.requests == [] and ledger_rows(database) == []
    assert sdk(gateway, allowed).chat.completions.create(model=MODEL, messages=USER, max_tokens=2).usage
    assert len(upstream.engine.requests) == 1


def test_rate_limits_and_unbounded_fields(gateway, database, upstream):
    _, secret = new_key(database, rpm=2)
    client = sdk(gateway, secret)
    for _ in range(2):
        client.completions.create(model=MODEL, prompt="x", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert e.value.body["code"] == "rate_limit_exceeded"
    assert len(upstream.engine.requests) == 2
    # fields that would let the upstream generate past the hold are refused
    _, other = new_key(database)
    for field, value in (("best_of", 3), ("n_predict", 1000), ("use_beam_search", True)):
        body = {"model": MODEL, "prompt": "x", "max_tokens": 2, field: value}
        r = httpx.post(gateway + "/v1/completions", json=body, headers=bearer(other))
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    assert len(upstream.engine.requests) == 2


# --- ends other than completion -------------------------------------------------------------------------


def test_cancelled_stream_closes_the_upstream_request_and_bills_what_was_received(
    gateway, database, upstream
):
    priced(database)
    _, secret = new_key(database)
    upstream.engine.delay = 0.02
    stream = sdk(gateway, secret).chat.completions.create(
        model=MODEL, messages=USER, max_tokens=1000, stream=True
    )
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received == 3:
            break
    stream.close()
    (row,) = settled(database, 1)
    assert (row.request_id, row.status, row.error) == (chunk.id, "cancelled", None)
    # no usage came: the prompt bound and one token per content chunk the gateway received
    assert row.prompt_tokens == USER_BOUND and 3 <= row.completion_tokens < 1000
    assert row.cost_pusd == cost(USER_BOUND, row.completion_tokens)
    (up,) = settled(upstream.db, 1)  # the upstream saw its client (the gateway) leave
    assert up.status == "cancelled" and row.completion_tokens <= up.completion_tokens < 1000
    assert upstream.engine.requests[0][2] in upstream.engine.aborted


def test_client_leaving_a_non_streamed_request_closes_the_upstream_request(gateway, database, upstream):
    _, secret = new_key(database)
    upstream.engine.delay = 0.02
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1000}
    post_and_leave(gateway, "/v1/completions", body, secret, lambda: bool(upstream.engine.running))
    (row,) = settled(database, 1)
    assert (row.status, row.prompt_tokens, row.completion_tokens) == ("cancelled", PROMPT_BOUND, 0)
    (up,) = settled(upstream.db, 1)
    assert up.status == "cancelled" and 1 <= up.completion_tokens < 1000
    assert upstream.engine.requests[0][2] in upstream.engine.closed


def test_upstream_errors_pass_through_with_their_status(gateway, database, upstream):
    _, secret = new_key(database)
    client = sdk(gateway, secret)
    too_long = [{"role": "user", "content": "word " * 600}]  # past the upstream's 512-token context
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=too_long, max_tokens=5, stream=stream)
        assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "messages"
        assert "maximum context length is 512 tokens" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:  # the entry names a model the upstream does not serve
        client.completions.create(model="misnamed", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "'no-such-model'" in e.value.body["message"]
    # the upstream refusing this server's own key is not the client's 401: a 502 that does not quote the key
    r = httpx.post(
        gateway + "/v1/completions", json={"model": "wrong-key", "prompt": "x"}, headers=bearer(secret)
    )
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_auth_failed"
    assert "PART" not in r.text and "lmf-" not in r.text
    ledger = settled(database, 4)
    assert [(x.status, x.prompt_tokens, x.completion_tokens) for x in ledger] == [("failed", 0, 0)] * 4
    assert "upstream HTTP 400" in ledger[0].error and "upstream HTTP 401" in ledger[3].error
    assert upstream.engine.requests == []


def test_unreachable_upstream_is_502_and_slow_one_504(gateway, database, upstream):
    _, secret = new_key(database)
    client = sdk(gateway, secret)
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="down", messages=USER, max_tokens=2, stream=stream)
        assert e.value.status_code == 502 and e.value.body["code"] == "upstream_unavailable"
        assert e.value.body["type"] == "upstream_error"
    upstream.engine.delay = 0.5  # no first token within the entry's 0.3 s
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="slow", prompt="x", max_tokens=3, stream=stream)
        assert e.value.status_code == 504 and e.value.body["code"] == "upstream_timeout"
        assert "0.3 s" in e.value.body["message"]
    ledger = settled(database, 4)
    assert [(x.model, x.status, x.completion_tokens) for x in ledger] == [
        ("down", "failed", 0), ("down", "failed", 0), ("slow", "failed", 0), ("slow", "failed", 0)]  # fmt: skip
    assert "ConnectError" in ledger[0].error and "ReadTimeout" in ledger[2].error


def test_usage_endpoint_lists_upstream_requests_with_ratelimit_headers(gateway, database):
    priced(database)
    _, secret = new_key(database, rpm=10, tpm=10_000)
    r = sdk(gateway, secret).chat.completions.create(model=MODEL, messages=USER, max_tokens=3)
    got = httpx.get(gateway + "/v1/usage", headers=bearer(secret))
    assert got.status_code == 200
    # the key is authenticated by require_key, which leaves it for the x-ratelimit-* headers
    assert got.headers["x-ratelimit-limit-requests"] == "10"
    assert got.headers["x-ratelimit-remaining-requests"] == "9"  # /v1/usage itself is not counted
    assert got.headers["x-ratelimit-remaining-tokens"] == str(
        10_000 - r.usage.prompt_tokens - r.usage.completion_tokens
    )  # settled: the unused part of the hold went back
    body = got.json()
    assert body["models"] == [{"model": MODEL, "requests": 1, "prompt_tokens": r.usage.prompt_tokens,
                               "completion_tokens": 3, "cost_usd": metering.format_usd(
                                   cost(r.usage.prompt_tokens, 3))}]  # fmt: skip
    assert body["recent"][0]["request_id"] == r.id


# --- the hold's prompt bound -------------------------------------------------------------------------------


def test_prompt_bound_covers_a_real_tokenizer_and_chat_template(tokenizer):
    conversations = [
        USER,
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}],
        [{"role": "user", "content": "Ünïcödé 😀 日本語のテキスト " * 20},
         {"role": "assistant", "content": "\n\n\t  spaces   and\nnewlines  "},
         {"role": "user", "content": [{"type": "text", "text": "parts " * 50}]}],
        [{"role": "user", "content": "a"}] * 30,
    ]  # fmt: skip
    for messages in conversations:
        payload = {"model": MODEL, "messages": messages}
        body = ChatCompletionRequest.model_validate(payload)
        real = len(
            tokenizer.encode(tokenizer.apply_chat_template(body.message_dicts(), add_generation_prompt=True))
        )
        assert real <= prompt_bound(body, payload), messages
    payload = {"model": MODEL, "messages": USER}
    assert prompt_bound(ChatCompletionRequest.model_validate(payload), payload) == USER_BOUND


# --- settings and the command ------------------------------------------------------------------------------


def test_upstream_settings_are_checked():
    assert UpstreamSettings("a", "http://h:1/v1/").url == "http://h:1/v1"
    assert UpstreamSettings("a", "http://h:1/v1").model == "a"
    for kwargs, fragment in (
        ({"url": "h:1/v1"}, "url must be an http(s) base URL"),
        ({"api_key_env": "sk-abc123"}, "not the key itself"),
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"timeout_s": 0}, "timeout_s must be positive"),
    ):
        with pytest.raises(UserError, match=re.escape(fragment)):
            UpstreamSettings("a", **({"url": "http://h/v1"} | kwargs))
    one = UpstreamSettings("a", "http://h/v1")
    with pytest.raises(UserError, match="given more than once: a"):
        Settings(model_name=None, upstreams=(one, one))
    with pytest.raises(UserError, match="has the name of the local model"):
        Settings(model_name="a", upstreams=(one,))


def write_upstreams(path, entries: list[dict]) -> str:
    path.write_text(json.dumps(entries))  # JSON is YAML
    return str(path)


@pytest.mark.parametrize(
    ("entries", "args", "fragment"),
    [
        ([{"name": "m", "url": "http://h/v1", "api_key": "x"}], [],
         "unknown key 'upstreams[0].api_key'; did you mean 'upstreams[0].api_key_env'?"),
        ([{"name": "m", "url": "http://h/v1", "api_key_env": "LMF_TEST_UNSET_VAR"}], [],
         "reads its API key from $LMF_TEST_UNSET_VAR, which is not set"),
        ([{"name": "m"}], [], "must be a mapping with at least name and url"),
        ([{"name": "m", "url": "http://h/v1", "max_tokens": "many"}], [],
         "upstreams[0].max_tokens must be an integer, got 'many'"),
        ([{"name": "m", "url": "http://h/v1"}], ["some-model"], "--no-model serves no local model"),
        (None, [], "--no-model needs something to serve"),
    ],
)  # fmt: skip
def test_serve_refuses_bad_upstream_options(entries, args, fragment, tmp_path):
    cmd = [sys.executable, "-m", "lmforge", "serve", *args, "--no-model", "--no-auth"]
    if entries is not None:
        cmd += ["--upstreams", write_upstreams(tmp_path / "up.yaml", entries)]
    env = {k: v for k, v in os.environ.items() if k != "LMF_TEST_UNSET_VAR"} | {"LMFORGE_HOME": str(tmp_path)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert fragment in line, line


def test_lmforge_serve_no_model_is_a_metered_gateway(upstream, tokenizer, tmp_path):
    """The real command: `lmforge serve --no-model --upstreams FILE` in front of the upstream, metered with
    SQLite in LMFORGE_HOME; the key comes from the same database."""
    home = tmp_path / "home"
    home.mkdir()
    db = Database(f"sqlite:///{home / 'lmforge.db'}")
    db.upgrade()
    _, secret = new_key(db)
    config = write_upstreams(tmp_path / "up.yaml", [
        {"name": MODEL, "url": f"{upstream.url}/v1", "model": REMOTE, "api_key_env": "LMF_TEST_UPSTREAM_KEY",
         "max_tokens": 5, "timeout_s": 30}])  # fmt: skip
    port = free_port()
    env = {**os.environ, "LMFORGE_HOME": str(home)}
    env.pop("LMFORGE_DATABASE_URL", None)
    cmd = [sys.executable, "-m", "lmforge", "serve", "--no-model", "--upstreams", config, "--port", str(port),
           "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, proc.stdout.read, timeout=60)
        client = sdk(url, secret)
        assert [m.id for m in client.models.list().data] == [MODEL]
        r = client.chat.completions.create(model=MODEL, messages=USER)
        assert (
            r.choices[0].message.content == first(tokenizer, 5) and r.usage.completion_tokens == 5
        )  # the default
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    (row,) = ledger_rows(db)
    assert (row.request_id, row.status, row.prompt_tokens, row.completion_tokens) == (
        r.id, "completed", r.usage.prompt_tokens, 5)  # fmt: skip
    db.close()
