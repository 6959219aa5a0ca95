"""Group-committed settles, on SQLite and PostgreSQL: `metering.settle_many` closes many requests in one
transaction exactly as one-by-one settles would, and the server's `Ledger` batches the settles of one event-loop
turn into one transaction without letting a settle that fails take the others down."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest

from lmforge.serve import auth, metering
from lmforge.serve import ledger as ledger_module
from lmforge.serve.db import utcnow
from lmforge.serve.ledger import ADMIT_LEAD_S, Ledger
from lmforge.serve.metering import settle_many, settlement
from tests.serve.conftest import assert_ledger_consistent, recorded_statements
from tests.serve.test_metering import (
    IN,
    OUT,
    T0,
    batch_request,
    go,
    ledger,
    month_row,
    ratelimit_tokens,
    setup,
)


def test_settle_many_is_exact_and_skips_settled_rows(database):
    """Two tenants, three keys, in one batch: each month gets its rows' costs, each TPM window its unused
    tokens back, and a row settled before keeps its first settlement."""
    a_key = setup(database, tpm=1000)
    b_key = setup(database, tpm=1000, tenant="beta")
    a2_key, _ = auth.create_key(database, "acme", tpm=1000)
    admitted = [
        go(database, a_key, "a1", prompt=10, max_tokens=20),
        go(database, b_key, "b1", prompt=30, max_tokens=40),
        go(database, a2_key, "a2", prompt=5, max_tokens=50),
        go(database, a_key, "a3", prompt=8, max_tokens=10),
    ]
    early = admitted[3]
    metering.settle(database, early, prompt_tokens=8, completion_tokens=2, status="cancelled")
    told = {"a1": (10, 7), "b1": (30, 40), "a2": (5, 0), "a3": (8, 10)}  # a3's second settlement is ignored
    later = T0 + timedelta(seconds=3)
    batch = []
    for a in admitted:
        prompt, completion = told[a.request_id]
        batch.append(
            settlement(a, prompt_tokens=prompt, completion_tokens=completion, status="completed", now=later)
        )
    with recorded_statements(database) as statements:
        settle_many(database, batch)
    if database.dialect == "postgresql":  # the whole batch is one statement (SQLite: one transaction)
        assert len(statements) == 1, statements
    rows = {r.request_id: r for r in ledger(database)}
    assert {rid: (r.status, r.completion_tokens) for rid, r in rows.items()} == {
        "a1": ("completed", 7), "b1": ("completed", 40), "a2": ("completed", 0), "a3": ("cancelled", 2),
    }  # fmt: skip
    assert rows["a1"].finished_at == later and rows["a3"].finished_at != later
    acme = (10 * IN + 7 * OUT) + (5 * IN) + (8 * IN + 2 * OUT)
    beta = 30 * IN + 40 * OUT
    assert month_row(database, tenant_id=a_key.tenant_id) == (acme, 0)
    assert month_row(database, tenant_id=b_key.tenant_id) == (beta, 0)
    # each window keeps only what was used: a1 17 + a3 10 (settled early) on a_key, 70 on b_key, 5 on a2_key
    assert ratelimit_tokens(database, a_key) == 17 + 10
    assert ratelimit_tokens(database, b_key) == 70
    assert ratelimit_tokens(database, a2_key) == 5
    assert_ledger_consistent(database)


def test_the_ledger_settles_one_loop_turn_in_one_transaction(database, monkeypatch):
    key = setup(database, tpm=10_000)
    admitted = [go(database, key, f"r{i}", prompt=10, max_tokens=20) for i in range(20)]
    batches: list[int] = []
    real = metering.settle_many

    def counted(db, settlements):
        batches.append(len(settlements))
        return real(db, settlements)

    monkeypatch.setattr(metering, "settle_many", counted)

    wakes: list[int] = []  # the ledger thread's calls into the loop: one per batch, however many it settles

    async def main() -> None:
        loop = asyncio.get_running_loop()
        real_wake = loop.call_soon_threadsafe
        monkeypatch.setattr(
            loop, "call_soon_threadsafe", lambda *a, **k: (wakes.append(1), real_wake(*a, **k))[1]
        )
        ledger_thread = Ledger(database)
        try:
            first = [ledger_thread.settle(settlement(a, prompt_tokens=10, completion_tokens=i, status="completed"))
                     for i, a in enumerate(admitted[:15])]  # fmt: skip
            await asyncio.gather(*first)
            # settles that come while a batch is being written wait for the next one
            rest = [ledger_thread.settle(settlement(a, prompt_tokens=10, completion_tokens=1, status="cancelled"))
                    for a in admitted[15:]]  # fmt: skip
            await asyncio.gather(*rest)
        finally:
            ledger_thread.close()

    asyncio.run(main())
    assert batches == [15, 5] and len(wakes) == 2
    assert [r.status for r in ledger(database)] == ["completed"] * 15 + ["cancelled"] * 5
    spent = sum(10 * IN + i * OUT for i in range(15)) + 5 * (10 * IN + 1 * OUT)
    assert month_row(database) == (spent, 0)
    assert ratelimit_tokens(database, key) == sum(10 + i for i in range(15)) + 5 * 11
    assert_ledger_consistent(database)


def test_batched_rows_keep_text_and_times_exactly(database):
    """A batch travels to PostgreSQL as one JSON text (`metering._batch_rows`): request ids and error messages
    with quotes, backslashes, newlines and non-ASCII text, and times to the microsecond, come back exactly as
    they went in (SQLite binds each row's values as they are: the same outcome)."""
    key = setup(database)
    odd = ['r "one"', "r\\two\n", "r-\u00e9\u4e2d-\U0001f600"]
    now = utcnow().replace(microsecond=123456)
    admitted = metering.admit_many(database, [batch_request(key, rid) for rid in odd], now=now)
    assert [a.request_id for a in admitted] == odd
    later = now + timedelta(seconds=1, microseconds=654321)
    errors = ['bad "quote"', "back\\slash\nnew line", "\u00fcml\u00e4ut \u4e2d\u6587"]
    settle_many(database, [settlement(a, prompt_tokens=10, completion_tokens=2, status="failed", error=e,
                                      now=later) for a, e in zip(admitted, errors, strict=True)])  # fmt: skip
    rows = ledger(database)
    assert [(r.request_id, r.error, r.started_at, r.finished_at) for r in rows] == [
        (rid, e, now, later) for rid, e in zip(odd, errors, strict=True)
    ]
    assert_ledger_consistent(database)


def test_the_ledger_admits_one_loop_turn_in_one_batch_after_its_settles(database, monkeypatch):
    """The admits of one event-loop turn go to one `admit_many` (one statement on PostgreSQL), after the settles
    queued with them: a hold a settle releases is there for the admits of the same turn. A caller cancelled
    before its admit ran is not admitted; a refusal goes to its own caller only."""
    key = setup(database, rpm=100)
    now = utcnow()  # the ledger admits at the time it runs
    month = metering.month_of(now)
    metering.set_budget(database, "acme", "0.00003", month=month)  # 30_000_000 pUSD
    hold = 10 * IN + 20 * OUT  # 13_500_000 pUSD: two holds fit, a third does not
    first = [go(database, key, "r0", now=now), go(database, key, "r1", now=now)]
    calls: list[tuple[str, int]] = []
    for name in ("admit_many", "settle_many"):
        real = getattr(metering, name)
        monkeypatch.setattr(metering, name, lambda db, xs, *a, _real=real, _name=name, **k: (
            calls.append((_name, len(xs))), _real(db, xs, *a, **k))[1])  # fmt: skip

    async def main() -> list[object]:
        ledger_thread = Ledger(database)
        try:
            released = ledger_thread.settle(settlement(first[0], prompt_tokens=10, completion_tokens=0,
                                                       status="completed"))  # fmt: skip
            admits = [ledger_thread.admit(batch_request(key, f"a{i}")) for i in range(3)]
            admits[1].cancel()  # its caller left before the ledger thread's turn
            return await asyncio.gather(released, *admits, return_exceptions=True)
        finally:
            ledger_thread.close()

    released, a0, a1, a2 = asyncio.run(main())
    assert calls == [("settle_many", 1), ("admit_many", 2)]
    assert released is None and isinstance(a1, asyncio.CancelledError)
    assert isinstance(a0, metering.Admission) and a0.headers["x-ratelimit-remaining-requests"] == "97"
    assert isinstance(a2, metering.QuotaExceeded)  # r1 + a0 hold 27_000_000; a2 would make 40_500_000
    assert [r.request_id for r in ledger(database)] == ["r0", "r1", "a0"]
    assert month_row(database, month=month) == (10 * IN, 2 * hold)
    assert_ledger_consistent(database)


def test_a_settle_that_fails_does_not_fail_its_batch(database):
    """A settlement the database refuses (here a NULL status) fails alone: the batch is retried one by one, the
    others are committed, and the refused request stays pending with its hold, as after a failed settle."""
    key = setup(database)
    admitted = [go(database, key, f"r{i}", prompt=10, max_tokens=20) for i in range(5)]
    settlements = [settlement(a, prompt_tokens=10, completion_tokens=3, status="completed") for a in admitted]
    settlements[2]["p_status"] = None

    async def main() -> list[object]:
        ledger_thread = Ledger(database)
        try:
            return await asyncio.gather(*map(ledger_thread.settle, settlements), return_exceptions=True)
        finally:
            ledger_thread.close()

    outcomes = asyncio.run(main())
    assert [o is None for o in outcomes] == [True, True, False, True, True]
    assert [r.status for r in ledger(database)] == [
        "completed",
        "completed",
        "pending",
        "completed",
        "completed",
    ]
    assert month_row(database) == (4 * (10 * IN + 3 * OUT), 10 * IN + 20 * OUT)
    assert_ledger_consistent(database)


@pytest.mark.parametrize("status", ["pending", "refunded"])
def test_settlement_checks_its_arguments(database, status):
    key = setup(database)
    a = go(database, key, "r1")
    with pytest.raises(ValueError, match="status must be one of"):
        settlement(a, prompt_tokens=1, completion_tokens=1, status=status)
    with pytest.raises(ValueError, match="negative token counts"):
        settlement(a, prompt_tokens=-1, completion_tokens=1, status="completed")


def test_admits_for_the_engine_wait_for_its_step_end_and_settles_do_not(database, monkeypatch):
    """`at_step_end` admits wait until ADMIT_LEAD_S before the engine's running step should end (at most
    ADMIT_WAIT_MAX_S), and the admits that come meanwhile share their batch; a settle, or an admit for an
    upstream model, does not wait, and a settle takes the waiting admits with it."""
    key = setup(database, rpm=100)
    a0 = go(database, key, "r0")
    calls: list[tuple[str, int]] = []
    for name in ("admit_many", "settle_many"):
        real = getattr(metering, name)
        monkeypatch.setattr(metering, name, lambda db, xs, *a, _real=real, _name=name, **k: (
            calls.append((_name, len(xs))), _real(db, xs, *a, **k))[1])  # fmt: skip
    monkeypatch.setattr(ledger_module, "ADMIT_WAIT_MAX_S", 5.0)
    step_end = {"at": 0.0}

    async def timed(*futures) -> float:
        t = time.monotonic()
        await asyncio.gather(*futures)
        return time.monotonic() - t

    async def main() -> list[float]:
        ledger_thread = Ledger(database, lambda now: max(0.0, step_end["at"] - now))
        try:
            # the step ends in 0.6 s (and the lead): the second admit, 50 ms after the first, has 0.55 s to spare
            step_end["at"] = time.monotonic() + 0.6 + ADMIT_LEAD_S
            first = ledger_thread.admit(batch_request(key, "a0"), at_step_end=True)
            await asyncio.sleep(0.05)
            second = ledger_thread.admit(batch_request(key, "a1"), at_step_end=True)
            waits = [0.05 + await timed(first, second)]
            # a settle comes while two admits wait for a step 10 s away: all go at once, the settle first
            step_end["at"] = time.monotonic() + 10.0
            waiting = [ledger_thread.admit(batch_request(key, f"b{i}"), at_step_end=True) for i in range(2)]
            settled = ledger_thread.settle(
                settlement(a0, prompt_tokens=10, completion_tokens=1, status="completed")
            )
            waits.append(await timed(settled, *waiting))
            # an admit that does not go to this process's engine (an upstream model) never waits
            waits.append(await timed(ledger_thread.admit(batch_request(key, "c0"))))
            # nor does one past ADMIT_WAIT_MAX_S
            monkeypatch.setattr(ledger_module, "ADMIT_WAIT_MAX_S", 0.15)
            waits.append(await timed(ledger_thread.admit(batch_request(key, "d0"), at_step_end=True)))
            return waits
        finally:
            ledger_thread.close()

    at_step_end, with_settle, upstream, capped = asyncio.run(main())
    assert calls == [("admit_many", 2), ("settle_many", 1), ("admit_many", 2), ("admit_many", 1),
                     ("admit_many", 1)]  # fmt: skip
    assert 0.59 <= at_step_end < 3.0
    assert with_settle < 3.0 and upstream < 3.0  # not the 5 s that the 10 s step would allow
    assert 0.14 <= capped < 3.0
    assert [r.request_id for r in ledger(database)] == ["r0", "a0", "a1", "b0", "b1", "c0", "d0"]
    assert_ledger_consistent(database)
