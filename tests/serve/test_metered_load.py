"""Metering under load, crashes and replicas: real `lmforge serve` processes on 127.0.0.1 with a tiny
random-weight model, the official `openai` SDK as the client, and the ledger read straight from the database.

(a) 200 concurrent requests from 10 keys (non-streamed and streamed, chat and completions, some cancelled
    mid-stream): one ledger row per admitted request, its tokens the ones its client was told, tenant totals the
    sum of rows; a budget that allows only part of the load, and an RPM limit, hold exactly.
(b) kill -9 during such a load, restart: the dead process's pending holds are released at start-up, no row is
    half-written, the totals still equal the sum of rows.
(c) two server processes on one PostgreSQL database: the budget and the RPM limit hold across both.

Each server runs with LMFORGE_THREADS=1; the client is one asyncio loop in the test process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import sqlalchemy as sa
import torch

from lmforge import checkpoint
from lmforge.data.tokenizer import Tokenizer
from lmforge.models.config import ModelConfig
from lmforge.models.gpt import build_model
from lmforge.serve import auth, metering
from lmforge.serve.db import Database, tenant_months
from tests.serve.conftest import pg_url
from tests.serve.servers import free_port, ledger_rows, wait_ready

pytestmark = pytest.mark.slow

MODEL = "tiny"
PRICE = ("0.5", "1.5")  # $ per million prompt / completion tokens
IN_PRICE, OUT_PRICE = 500_000, 1_500_000  # the same in micro-USD per million tokens
CAPPED_PROMPT = list(range(1000, 1008))  # 8 prompt tokens
CAPPED_MAX = 8
CAPPED_COST = len(CAPPED_PROMPT) * IN_PRICE + CAPPED_MAX * OUT_PRICE
CAPPED_ALLOWED = 7  # the budget: 7.5 capped requests
RPM = 15  # key 7's limit; it sends 20 requests
QUESTIONS = ["What is the capital of France?", "Write a haiku.", "List three fruits.", "Who wrote Hamlet?"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_metadata) -> Path:
    """A 1-layer random model with SmolLM2's tokenizer and chat template: fast enough for 200 requests."""
    tokenizer = Tokenizer.from_gguf_metadata(smollm2_metadata)
    cfg = ModelConfig(vocab_size=49152, n_layer=1, n_head=2, n_embd=32, intermediate_size=64, max_seq_len=512)
    torch.manual_seed(0)
    return checkpoint.save(tmp_path_factory.mktemp("tiny") / MODEL, build_model(cfg), tokenizer)


class Server:
    """`lmforge serve` in a subprocess, its output in a log file (a full pipe would stall it)."""

    def __init__(self, model: Path, home: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / f"serve-{self.port}.log"
        env = {**os.environ, "LMFORGE_THREADS": "1", "LMFORGE_HOME": str(home)}
        env.pop("LMFORGE_DATABASE_URL", None)  # the ledger is --database-url's or the one in LMFORGE_HOME
        cmd = [sys.executable, "-m", "lmforge", "serve", str(model), "--served-name", MODEL,
               "--port", str(self.port), "--log-level", "warning", "--kv-cache-mb", "32",
               "--heartbeat", "0.5", "--stale-after", "2", *args]  # fmt: skip
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> Server:
        wait_ready(self.url, self.proc, self.log.read_text)
        return self

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


# --- the load ----------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one client saw."""

    key: int
    kind: str
    status: str  # completed | cancelled | insufficient_quota | rate_limit_exceeded | lost (server died)
    request_id: str | None = None
    prompt_tokens: int | None = None  # as told in `usage`
    completion_tokens: int | None = None
    received: int = 0  # content deltas seen


def plan(i: int) -> tuple[int, str]:
    """Request i: its key (0-9) and kind. Keys 8 and 9 (the capped tenant) send identical priced requests."""
    key = i % 10
    if key >= 8:
        return key, "capped-stream" if i % 20 >= 10 else "capped"
    return key, ("chat", "chat-stream", "completion", "completion-stream", "cancel")[(i // 10) % 5]


async def one(client: openai.AsyncOpenAI, key: int, kind: str, i: int) -> Outcome:
    out = Outcome(key, kind, "completed")
    messages = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
    usage_opt = {"include_usage": True}
    try:
        if kind == "chat":
            r = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12)
            out.request_id, told = r.id, r.usage
        elif kind == "completion":  # two prompts, two choices each: 4 engine requests
            r = await client.completions.create(
                model=MODEL, prompt=["Once upon", "a time"], n=2, max_tokens=5
            )
            out.request_id, told = r.id, r.usage
        elif kind in ("capped", "capped-stream"):
            stream = kind == "capped-stream"
            r = await client.completions.create(
                model=MODEL,
                prompt=CAPPED_PROMPT,
                max_tokens=CAPPED_MAX,
                extra_body={"ignore_eos": True},
                stream=stream,
                **({"stream_options": usage_opt} if stream else {}),
            )
            if stream:
                chunks = [c async for c in r]
                out.request_id, told = chunks[0].id, chunks[-1].usage
            else:
                out.request_id, told = r.id, r.usage
        elif kind in ("chat-stream", "cancel"):
            cancel = kind == "cancel"
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=messages,
                max_tokens=400 if cancel else 12,
                stream=True,
                stream_options=usage_opt,
                extra_body={"ignore_eos": cancel},
            )
            told = None
            async for chunk in stream:
                out.request_id = chunk.id
                if chunk.choices and chunk.choices[0].delta.content:
                    out.received += 1
                told = chunk.usage or told
                if cancel and out.received == 2:
                    await stream.close()  # the client hangs up mid-stream
                    out.status = "cancelled"
                    return out
        else:  # completion-stream
            stream = await client.completions.create(
                model=MODEL, prompt="The weather today", max_tokens=10, stream=True, stream_options=usage_opt
            )
            chunks = [c async for c in stream]
            out.request_id, told = chunks[0].id, chunks[-1].usage
            out.received = sum(bool(c.choices and c.choices[0].text) for c in chunks)
        out.prompt_tokens, out.completion_tokens = told.prompt_tokens, told.completion_tokens
    except openai.RateLimitError as e:
        out.status = e.body["code"]
    except (openai.APIConnectionError, openai.APIError, httpx.HTTPError):
        out.status = "lost"
    return out


def set_up_tenants(db: Database) -> list[str]:
    """5 tenants x 2 keys; the last tenant has a budget for 7.5 of its requests; key 7 has an RPM limit."""
    metering.set_price(db, MODEL, input_usd=PRICE[0], output_usd=PRICE[1])
    secrets = []
    for t in range(5):
        name = "capped" if t == 4 else f"tenant{t}"
        auth.create_tenant(db, name)
        for k in range(2):
            rpm = RPM if 2 * t + k == 7 else None
            secrets.append(auth.create_key(db, name, name=f"key{2 * t + k}", rpm=rpm)[1])
    budget = CAPPED_ALLOWED * CAPPED_COST + CAPPED_COST // 2
    metering.set_budget(db, "capped", metering.format_usd(budget))
    return secrets


def clients(urls: list[str], secrets: list[str]) -> list[openai.AsyncOpenAI]:
    """One client per key; with several servers, each key alternates between them request by request."""
    return [
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0, timeout=120)
        for secret in secrets
        for url in urls
    ]


async def load(urls: list[str], secrets: list[str], n: int = 200) -> list[Outcome]:
    pool = clients(urls, secrets)

    def client(i: int, key: int) -> openai.AsyncOpenAI:
        return pool[key * len(urls) + (i // 10) % len(urls)]

    try:
        return await asyncio.gather(
            *(one(client(i, k), k, kind, i) for i in range(n) for k, kind in [plan(i)])
        )
    finally:
        for c in pool:
            await c.close()


def months(db: Database) -> list:
    with db.read() as conn:
        return conn.execute(sa.select(tenant_months)).all()


def assert_consistent(db: Database, *, settled: bool = True, settle_s: float = 0.0) -> list:
    """No half-written row; each tenant month's spent/reserved are the sums of its rows. The ledger, once no
    row is pending or `settle_s` has passed (cancelled rows settle as their streams unwind, just after the
    clients hang up)."""
    deadline = time.monotonic() + settle_s
    rows = ledger_rows(db)
    while any(r.status == "pending" for r in rows) and time.monotonic() < deadline:
        time.sleep(0.1)
        rows = ledger_rows(db)
    for r in rows:
        if r.status == "pending":
            assert not settled, r
            assert r.finished_at is None and r.cost_pusd == 0 and r.reserved_pusd > 0, r
        else:
            assert r.status in ("completed", "cancelled", "failed"), r
            assert r.finished_at is not None and r.reserved_pusd == 0, r
            assert (
                r.cost_pusd
                == r.prompt_tokens * r.input_uusd_per_mtok + r.completion_tokens * r.output_uusd_per_mtok
            )
    for m in months(db):
        mine = [r for r in rows if r.tenant_id == m.tenant_id and metering.month_of(r.started_at) == m.month]
        assert m.spent_pusd == sum(r.cost_pusd for r in mine if r.status != "pending")
        assert m.reserved_pusd == sum(r.reserved_pusd for r in mine if r.status == "pending")
    return rows


def assert_told_equals_billed(outcomes: list[Outcome], rows: list) -> None:
    by_id = {r.request_id: r for r in rows}
    assert len(by_id) == len(rows)  # one row per request
    admitted = [o for o in outcomes if o.status in ("completed", "cancelled")]
    assert {o.request_id for o in admitted} == set(by_id)  # and a row for every admitted request, no other
    for o in admitted:
        row = by_id[o.request_id]
        assert row.status == o.status, (o, row)
        if o.status == "completed":
            assert (row.prompt_tokens, row.completion_tokens) == (o.prompt_tokens, o.completion_tokens), (
                o,
                row,
            )
        else:  # the client hung up: what was generated is billed, at least what it saw
            assert o.received <= row.completion_tokens < 400 and row.prompt_tokens > 0, (o, row)


def assert_limits_held(outcomes: list[Outcome], rows: list, db: Database) -> None:
    capped = [o for o in outcomes if o.key >= 8]
    assert sum(o.status == "completed" for o in capped) == CAPPED_ALLOWED
    assert sum(o.status == "insufficient_quota" for o in capped) == len(capped) - CAPPED_ALLOWED
    budget = metering.budget_status(db, "capped", metering.month_of(rows[0].started_at))
    assert (
        budget.spent_pusd == CAPPED_ALLOWED * CAPPED_COST <= budget.limit_pusd and budget.reserved_pusd == 0
    )
    limited = [o for o in outcomes if o.key == 7]
    assert sum(o.status == "rate_limit_exceeded" for o in limited) == len(limited) - RPM
    assert sum(o.status in ("completed", "cancelled") for o in limited) == RPM


# --- the tests -----------------------------------------------------------------------------------------


def test_200_concurrent_requests_bill_exactly(tiny_model, tmp_path):
    home = tmp_path
    server = Server(tiny_model, home).wait_ready()  # no --database-url: SQLite in LMFORGE_HOME, created
    db = Database(f"sqlite:///{home / 'lmforge.db'}")
    try:
        db.check()  # the server created and upgraded it
        secrets = set_up_tenants(db)  # keys are looked up per request: no restart needed
        t0 = time.monotonic()
        outcomes = asyncio.run(load([server.url], secrets))
        took = time.monotonic() - t0
        assert took < 50, f"the load took {took:.0f} s: the RPM window (60 s) would have reset"
        statuses = {o.status for o in outcomes}
        assert statuses <= {"completed", "cancelled", "insufficient_quota", "rate_limit_exceeded"}, outcomes
        assert sum(o.status == "cancelled" for o in outcomes) >= 28  # 32 sent, key 7 may lose 4 to its RPM
        rows = assert_consistent(db, settle_s=10)
        assert_told_equals_billed(outcomes, rows)
        assert_limits_held(outcomes, rows, db)
        for t in ("tenant0", "tenant1", "tenant2", "tenant3", "capped"):  # the invoice agrees with the rows
            report = metering.usage_report(db, t, metering.month_of(rows[0].started_at))
            mine = [r for r in rows if r.tenant_id == auth.list_keys(db, t)[0].tenant_id]
            assert report.totals.requests == len(mine)
            assert report.totals.cost_pusd == sum(r.cost_pusd for r in mine) == report.budget.spent_pusd
            assert report.totals.completion_tokens == sum(r.completion_tokens for r in mine)
    finally:
        assert server.stop() == 0, server.log.read_text()
        db.close()


def test_kill_9_mid_load_then_restart_releases_every_hold(tiny_model, tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    db = Database(url)
    db.upgrade()
    secrets = set_up_tenants(db)
    server = Server(tiny_model, tmp_path, "--database-url", url).wait_ready()

    async def crash() -> tuple[list[Outcome], list[Outcome]]:
        pool = clients([server.url], secrets[:8])
        started: set[int] = set()

        async def long_stream(i: int) -> Outcome:
            out = Outcome(i % 8, "long", "completed")
            try:
                stream = await pool[i % 8].chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": QUESTIONS[i % 4]}],
                    max_tokens=450,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
                async for chunk in stream:
                    out.request_id = chunk.id
                    started.add(i)
            except (openai.APIConnectionError, openai.APIError, httpx.HTTPError):
                out.status = "lost"
            return out

        shorts = [one(pool[i % 8], i % 8, "chat", i) for i in range(20)]
        longs = [asyncio.create_task(long_stream(i)) for i in range(30)]
        done = await asyncio.gather(*shorts)
        while len(started) < 30:
            await asyncio.sleep(0.01)
        server.proc.kill()  # SIGKILL: no drain, no settling, no unregistering
        server.proc.wait()
        lost = await asyncio.gather(*longs)
        for c in pool:
            await c.close()
        return done, lost

    done, lost = asyncio.run(crash())
    killed_at = time.monotonic()
    assert all(o.status == "completed" for o in done) and all(o.status == "lost" for o in lost)
    before = assert_consistent(db, settled=False)  # every row whole, the held totals intact
    pending = {r.request_id for r in before if r.status == "pending"}
    assert pending == {o.request_id for o in lost}
    assert sum(m.reserved_pusd for m in months(db)) > 0

    time.sleep(
        max(0.0, killed_at + 2.5 - time.monotonic())
    )  # the dead process is now stale (--stale-after 2)
    restarted = Server(tiny_model, tmp_path, "--database-url", url).wait_ready()
    try:
        after = assert_consistent(db)  # start-up reconciliation ran before /ready said ready
        assert sum(m.reserved_pusd for m in months(db)) == 0
        for r in after:
            if r.request_id in pending:
                assert (r.status, r.error, r.completion_tokens, r.cost_pusd) == (
                    "failed", metering.STALE_ERROR, 0, 0)  # fmt: skip
        assert_told_equals_billed(done, [r for r in after if r.request_id not in pending])
        more = asyncio.run(load([restarted.url], secrets[:8], n=8))
        assert all(o.status in ("completed", "cancelled") for o in more)
        assert len(assert_consistent(db, settle_s=10)) == len(after) + len(more)
    finally:
        assert restarted.stop() == 0, restarted.log.read_text()
        db.close()


@pytest.mark.postgres
def test_two_servers_on_one_postgres_hold_budget_and_rpm(tiny_model, tmp_path):
    with pg_url() as url:
        refused = subprocess.run(
            [sys.executable, "-m", "lmforge", "serve", str(tiny_model), "--database-url", url],
            env={**os.environ, "LMFORGE_HOME": str(tmp_path), "LMFORGE_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        (line,) = refused.stderr.strip().splitlines()
        assert "lmforge db upgrade" in line and "lmforge:lmforge@" not in line  # no password shown

        db = Database(url)
        db.upgrade()
        secrets = set_up_tenants(db)
        servers = [Server(tiny_model, tmp_path, "--database-url", url) for _ in range(2)]  # starting together
        try:
            for s in servers:
                s.wait_ready()
            outcomes = asyncio.run(load([s.url for s in servers], secrets))
            rows = assert_consistent(db, settle_s=10)
            assert_told_equals_billed(outcomes, rows)
            assert_limits_held(outcomes, rows, db)
            # each server alone saw 20 of the capped tenant's 40 requests and 10 of key 7's 20, so either
            # could have admitted all of them: only limits shared through the database admit 7 and 15 in all
            assert len({r.instance_id for r in rows}) == 2
            (limited,) = [k.id for k in auth.list_keys(db) if k.rpm is not None]
            assert len({r.instance_id for r in rows if r.key_id == limited}) == 2
        finally:
            for s in servers:
                assert s.stop() == 0, s.log.read_text()
            db.close()
