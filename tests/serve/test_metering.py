"""Metering on SQLite and PostgreSQL: exact costs, budgets under racing threads, rate windows, prices over time,
idempotent settling, reconciling dead processes, and the totals table against the ledger."""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa

from lmforge.errors import UserError
from lmforge.serve import auth, metering
from lmforge.serve.db import api_keys, instances, rate_windows, tenant_months, usage
from lmforge.serve.metering import QuotaExceeded, RateLimited, admit, settle
from tests.serve.conftest import assert_ledger_consistent, open_test_database, recorded_statements

T0 = datetime(2026, 11, 10, 12, 0, 0, tzinfo=UTC)
IN, OUT = 150_000, 600_000  # $0.15 / $0.60 per million tokens, in micro-USD per million tokens


def setup(db, *, rpm=None, tpm=None, tenant="acme", price=True):
    if tenant not in {t.name for t in auth.list_tenants(db)}:
        auth.create_tenant(db, tenant)
    key, _ = auth.create_key(db, tenant, rpm=rpm, tpm=tpm)
    if price and not metering.list_prices(db, "m"):
        metering.set_price(db, "m", input_usd="0.15", output_usd="0.60", now=T0 - timedelta(days=30))
    return key


def go(db, key, rid, *, prompt=10, max_tokens=20, now=T0, model="m", instance="i1"):
    return admit(
        db,
        key,
        model,
        request_id=rid,
        prompt_tokens=prompt,
        max_completion_tokens=max_tokens,
        instance_id=instance,
        now=now,
    )


def month_row(db, tenant_id=1, month="2026-11"):
    with db.read() as conn:
        row = conn.execute(
            sa.select(tenant_months.c.spent_pusd, tenant_months.c.reserved_pusd).where(
                tenant_months.c.tenant_id == tenant_id, tenant_months.c.month == month
            )
        ).first()
    return tuple(row) if row else None


def ledger(db):
    with db.read() as conn:
        return conn.execute(sa.select(usage).order_by(usage.c.id)).all()


def test_money_parsing_and_formatting():
    assert metering.parse_usd("0.15", places=6, what="p") == 150_000
    assert metering.parse_usd("25", places=12, what="b") == 25 * 10**12
    assert metering.parse_usd("0.1500000", places=6, what="p") == 150_000  # trailing zeros are not precision
    assert metering.parse_usd("0.000001", places=6, what="p") == 1
    with pytest.raises(UserError, match="the input price has more than 6 decimal places: 0.0000001"):
        metering.parse_usd("0.0000001", places=6, what="the input price")
    with pytest.raises(UserError, match="cannot be negative"):
        metering.parse_usd("-1", places=6, what="x")
    for bad in ("abc", "", "1,5", "NaN", "Infinity"):
        with pytest.raises(UserError):
            metering.parse_usd(bad, places=6, what="x")
    assert metering.format_usd(123_000_000) == "0.000123"
    assert metering.format_usd(0) == "0.00"
    assert metering.format_usd(25 * 10**12) == "25.00"
    assert metering.format_usd(1_500_000_000_000) == "1.50"
    assert metering.format_usd(1) == "0.000000000001"
    assert metering.format_price(150_000) == "0.15"
    assert metering.month_range("2026-12") == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    for bad in ("2026-13", "2026-00", "2026-1", "26-11", "2026/11", "november"):
        with pytest.raises(UserError, match="a month is YYYY-MM"):
            metering.parse_month(bad)
    assert metering.parse_when("2026-12-31", what="x", end_of_day=True) == datetime(2027, 1, 1, tzinfo=UTC)
    assert metering.parse_when("2026-12-01T10:00+02:00", what="x") == datetime(2026, 12, 1, 8, tzinfo=UTC)
    with pytest.raises(UserError, match="must be a date YYYY-MM-DD"):
        metering.parse_when("2026-02-30", what="x")


def test_admit_and_settle_are_exact(database):
    key = setup(database)
    metering.set_budget(database, "acme", "25", month="2026-11")
    a = go(database, key, "r1", prompt=10, max_tokens=20)
    hold = 10 * IN + 20 * OUT
    assert (a.reserved_pusd, a.reserved_tokens, a.month, a.headers) == (hold, 30, "2026-11", {})
    assert (a.input_uusd_per_mtok, a.output_uusd_per_mtok) == (IN, OUT)
    assert month_row(database) == (0, hold)
    (row,) = ledger(database)
    assert (row.status, row.prompt_tokens, row.reserved_pusd, row.instance_id) == ("pending", 10, hold, "i1")
    settle(
        database, a, prompt_tokens=10, completion_tokens=7, status="completed", now=T0 + timedelta(seconds=2)
    )
    cost = 10 * IN + 7 * OUT  # 5_700_000 pUSD = $0.0000057
    assert month_row(database) == (cost, 0)
    (row,) = ledger(database)
    assert (row.status, row.completion_tokens, row.cost_pusd, row.reserved_pusd) == ("completed", 7, cost, 0)
    assert row.finished_at == T0 + timedelta(seconds=2) and row.error is None
    report = metering.usage_report(database, "acme", "2026-11")
    assert report.totals.cost_pusd == cost and metering.format_usd(cost) == "0.0000057"
    assert report.budget.spent_pusd == cost and report.budget.limit_pusd == 25 * 10**12
    assert_ledger_consistent(database)


def test_the_request_path_costs_one_statement_per_step_on_postgres(database):
    """The hot path's round trips (performance, not correctness): on PostgreSQL authenticate, admit and settle
    are one autocommit statement each, 3 round trips for a key the server has not cached yet (2 once it has);
    SQLite's in-process statements are not counted."""
    key = setup(database, rpm=100, tpm=10_000)
    metering.set_budget(database, "acme", "25", month="2026-11")
    _, secret = auth.create_key(database, "acme", rpm=100, tpm=10_000)
    with recorded_statements(database) as statements:
        assert auth.authenticate(database, f"Bearer {secret}").tenant == "acme"
        a = go(database, key, "r1")
        settle(database, a, prompt_tokens=10, completion_tokens=7, status="completed")
    if database.dialect == "postgresql":
        assert len(statements) == 3, statements
    assert month_row(database) == (10 * IN + 7 * OUT, 0)
    assert_ledger_consistent(database)


def test_a_batch_of_admits_is_one_statement_on_postgres(database):
    """admit_many (the server's batches of admits): requests that all fit are admitted by one statement on
    PostgreSQL, each with the x-ratelimit-* headers its own admit would have given."""
    key = setup(database, rpm=100, tpm=10_000)
    metering.set_budget(database, "acme", "25", month="2026-11")
    batch = [batch_request(key, f"r{i}", prompt=10, max_tokens=20) for i in range(5)]
    with recorded_statements(database) as statements:
        admitted = metering.admit_many(database, batch, now=T0)
    if database.dialect == "postgresql":
        assert len(statements) == 1, statements
    assert [a.request_id for a in admitted] == [f"r{i}" for i in range(5)]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in admitted] == ["99", "98", "97", "96", "95"]
    assert [a.headers["x-ratelimit-remaining-tokens"] for a in admitted] == [
        "9970",
        "9940",
        "9910",
        "9880",
        "9850",
    ]
    assert month_row(database) == (0, 5 * (10 * IN + 20 * OUT))
    assert [(r.request_id, r.status) for r in ledger(database)] == [(f"r{i}", "pending") for i in range(5)]
    assert_ledger_consistent(database)


def batch_request(key, rid, *, prompt=10, max_tokens=20, model="m", instance="i1"):
    return {"key": key, "model": model, "request_id": rid, "prompt_tokens": prompt,
            "max_completion_tokens": max_tokens, "instance_id": instance}  # fmt: skip


def test_a_batch_of_admits_is_what_the_same_admits_one_by_one_give(database, tmp_path, monkeypatch):
    """A random history of batches (keys with and without limits, a tight budget, windows expiring, keys revoked,
    a request id used twice, settles between batches) on one database with admit_many and on another with one
    admit per request: every request gets the same Admission or the same refusal, and the databases end equal.
    On PostgreSQL the batches that fit ran as one statement; the ones with a refusal fell back to single admits."""
    kind = "sqlite" if database.dialect == "sqlite" else "postgres"
    singles = {"n": 0}
    admit_one = metering._admit_one

    def counted(db, *args):  # single admits of the batched database
        singles["n"] += db is database
        return admit_one(db, *args)

    monkeypatch.setattr(metering, "_admit_one", counted)
    with open_test_database(kind, tmp_path / "reference") as reference:
        dbs = (database, reference)
        keys = []
        for db in dbs:
            auth.create_tenant(db, "acme")
            auth.create_tenant(db, "globex")
            metering.set_price(db, "a", input_usd="0.15", output_usd="0.6", now=T0 - timedelta(days=60))
            metering.set_price(db, "b", input_usd="3", output_usd="15", now=T0 - timedelta(days=60))
            metering.set_budget(db, "globex", "0.004", month="2026-11")
            keys.append([
                auth.create_key(db, "acme", rpm=6, tpm=2500)[0],
                auth.create_key(db, "acme")[0],
                auth.create_key(db, "globex", tpm=1500)[0],
                auth.create_key(db, "globex", rpm=4)[0],
            ])  # fmt: skip
        rng = random.Random(11)
        now, opened, outcomes, batches = T0, ([], []), [], {"one statement": 0, "one by one": 0}
        for step in range(40):
            now += timedelta(seconds=rng.choice([0, 1, 3, 25]))
            if step == 30:  # a key revoked (at `now`): refused from here on
                for db in dbs:
                    with db.write() as conn:
                        conn.execute(sa.update(api_keys).where(api_keys.c.id == 4).values(revoked_at=now))
            if opened[0] and rng.random() < 0.3:
                picked = rng.sample(range(len(opened[0])), rng.randint(1, len(opened[0])))
                for db, open_ in zip(dbs, opened, strict=True):
                    told = [metering.settlement(open_[i], prompt_tokens=open_[i].reserved_tokens // 3,
                                                completion_tokens=1, status="completed", now=now) for i in picked]  # fmt: skip
                    metering.settle_many(db, told)
                    for i in sorted(picked, reverse=True):
                        del open_[i]
            size = rng.randint(1, 8)
            # mostly keys 1 and 2 (batches that fit); now and then two batches of 4 all on key 0 (RPM 6): the
            # second overflows its window by 2
            if step % 7 in (3, 4):
                size = 4
            ks = (
                [0] * size if step % 7 in (3, 4) else [rng.choice([0, 1, 1, 1, 2, 2, 3]) for _ in range(size)]
            )
            # models a, b and an unpriced one (no hold); now and then more tokens than key 2's TPM allows at all
            picks = [
                (k, rng.choice(["a", "b", "free"]), rng.choice([rng.randint(0, 400)] * 9 + [1600]))
                for k in ks
            ]
            rids = [f"s{step}-{9 - j}" for j in range(size)]  # ids that sort against the batch's order
            if step % 9 == 4:
                rids[-1] = rids[0]  # a request id used twice in one batch
            before = singles["n"]
            batched = metering.admit_many(
                database, [batch_request(keys[0][k], rid, prompt=20, max_tokens=m, model=model)
                           for (k, model, m), rid in zip(picks, rids, strict=True)], now=now,
            )  # fmt: skip
            ran_singly = singles["n"] - before
            refused = []  # per request: refused by the reference (None: admitted, "early": too large for its TPM)
            for (k, model, m), rid, got in zip(picks, rids, batched, strict=True):
                try:
                    expected = go(reference, keys[1][k], rid, prompt=20, max_tokens=m, model=model, now=now)
                except Exception as e:  # noqa: BLE001
                    refused.append("early" if "Request too large" in str(e) else type(e).__name__)
                    outcomes.append("too large" if refused[-1] == "early" else type(e).__name__)
                    assert type(got) is type(e), (got, e)
                    assert str(got).replace(keys[0][k].prefix, "KEY") == str(e).replace(
                        keys[1][k].prefix, "KEY"
                    )
                    assert getattr(got, "headers", None) == getattr(e, "headers", None)
                    continue
                assert isinstance(got, metering.Admission), got
                assert dataclasses.replace(got, usage_id=0, key=None) == dataclasses.replace(
                    expected, usage_id=0, key=None
                )
                if opened[0] and opened[0][-1].started_at == now:  # rows inserted in the batch's order
                    assert got.usage_id > opened[0][-1].usage_id
                opened[0].append(got)
                opened[1].append(expected)
                refused.append(None)
            # Which path each run of requests took (a request too large for its TPM is refused on its own and
            # splits the batch): SQLite and a lone request, one admit each; on PostgreSQL one statement for a run
            # that fits, else one admit per request.
            expected_singles = 0
            for run in "".join("|" if r == "early" else ("x" if r else ".") for r in refused).split("|"):
                if kind == "sqlite" or len(run) == 1:
                    expected_singles += len(run)
                elif run:
                    way = "one by one" if "x" in run else "one statement"
                    expected_singles += len(run) if way == "one by one" else 0
                    batches[way] += 1
            assert ran_singly == expected_singles, (refused, ran_singly)
        assert {"QuotaExceeded", "RateLimited", "AuthError", "ValueError"} <= set(outcomes), outcomes
        assert outcomes.count("too large") >= 3, outcomes
        assert kind == "sqlite" or min(batches.values()) >= 5, batches
        for db in dbs:
            assert_ledger_consistent(db)
        assert [table_rows(database, t) for t in (rate_windows, tenant_months)] == [
            table_rows(reference, t) for t in (rate_windows, tenant_months)
        ]
        assert usage_rows(database) == usage_rows(reference)


def test_racing_batches_never_exceed_a_budget_or_a_window(database):
    """Threads admitting batches at once (several servers' ledger threads) take each window and month row's
    latest version: 8 threads x 4 batches of 3 against a budget for 17 holds and an RPM of 20 admit exactly 17."""
    key = setup(database, rpm=20)
    hold = 10 * IN + 20 * OUT
    limit = 17 * hold + hold - 1
    metering.set_budget(database, "acme", str(Decimal(limit).scaleb(-12)), month="2026-11")
    barrier = threading.Barrier(8)
    outcomes: list = []

    def worker(t: int) -> None:
        barrier.wait()
        for b in range(4):
            batch = [batch_request(key, f"t{t}-{b}-{j}") for j in range(3)]
            outcomes.extend(metering.admit_many(database, batch, now=T0 + timedelta(milliseconds=t)))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    admitted = [o for o in outcomes if isinstance(o, metering.Admission)]
    assert len(outcomes) == 96 and len(admitted) == 17
    assert all(isinstance(o, QuotaExceeded) for o in outcomes if o not in admitted), outcomes
    assert month_row(database) == (0, 17 * hold)
    assert len(ledger(database)) == 17
    assert metering.ratelimit_headers(database, key, T0)["x-ratelimit-remaining-requests"] == "3"
    assert sorted(int(a.headers["x-ratelimit-remaining-requests"]) for a in admitted) == list(range(3, 20))
    assert_ledger_consistent(database)


def table_rows(db, table):
    with db.read() as conn:
        return sorted(tuple(r) for r in conn.execute(sa.select(table)).all())


def usage_rows(db):
    """The ledger without its ids (PostgreSQL's sequence also counts the rows a refused statement rolled back)."""
    with db.read() as conn:
        rows = conn.execute(sa.select(usage).order_by(usage.c.request_id)).all()
    return [{**r._mapping, "id": 0} for r in rows]


def test_admit_refuses_a_revoked_key_and_consumes_nothing(database):
    """A server authenticates a metered request from its KeyCache; admit's statement is what sees a revocation
    made since (by another process), and refuses the request before charging anything."""
    key = setup(database, rpm=100, tpm=10_000)
    metering.set_budget(database, "acme", "25", month="2026-11")
    first = go(database, key, "r1")
    with database.write() as conn:  # revoked at T0 + 1 s, as `lmforge admin key revoke` would
        conn.execute(
            sa.update(api_keys).where(api_keys.c.id == key.id).values(revoked_at=T0 + timedelta(seconds=1))
        )
    go(database, key, "r2")  # at T0 the key was not revoked yet
    before = (month_row(database), ledger(database), ratelimit_tokens(database, key))
    with pytest.raises(auth.AuthError) as e:
        go(database, key, "r3", now=T0 + timedelta(seconds=1))
    assert (e.value.status, e.value.code) == (403, "key_revoked") and key.prefix in e.value.message
    assert (month_row(database), ledger(database), ratelimit_tokens(database, key)) == before
    assert [r.request_id for r in before[1]] == ["r1", "r2"] and before[2] == 60
    # a request admitted before the revocation still settles
    settle(database, first, prompt_tokens=10, completion_tokens=3, status="completed")
    assert_ledger_consistent(database)


def test_admit_refuses_a_key_expired_since_it_was_read(database):
    """Expiry is checked from the cached key on every request, and admit re-checks it from the row too (an
    operator who shortens a key's life in the database is obeyed at once)."""
    key = setup(database, rpm=100)
    with database.write() as conn:
        conn.execute(sa.update(api_keys).where(api_keys.c.id == key.id).values(expires_at=T0))
    with pytest.raises(auth.AuthError) as e:
        go(database, key, "r1", now=T0)  # `key` was read before: it has no expiry
    assert (e.value.status, e.value.code) == (403, "key_expired") and T0.isoformat() in e.value.message
    assert (month_row(database), ledger(database), ratelimit_tokens(database, key)) == (None, [], None)
    go(database, key, "r2", now=T0 - timedelta(seconds=1))  # a second before, it was still live


def test_settle_is_idempotent(database):
    key = setup(database, tpm=1000)
    a = go(database, key, "r1", prompt=10, max_tokens=20)
    settle(database, a, prompt_tokens=10, completion_tokens=5, status="cancelled")
    before = (month_row(database), ledger(database), ratelimit_tokens(database, key))
    settle(database, a, prompt_tokens=10, completion_tokens=20, status="completed")  # ignored
    settle(database, a, prompt_tokens=10, completion_tokens=5, status="cancelled")
    assert (month_row(database), ledger(database), ratelimit_tokens(database, key)) == before
    assert before[1][0].status == "cancelled" and before[2] == 15
    with pytest.raises(ValueError, match="status must be one of"):
        settle(database, a, prompt_tokens=1, completion_tokens=1, status="pending")
    assert_ledger_consistent(database)


def ratelimit_tokens(db, key):
    with db.read() as conn:
        return conn.execute(sa.select(rate_windows.c.tokens).where(rate_windows.c.key_id == key.id)).scalar()


def test_no_price_is_free_but_metered(database):
    key = setup(database, price=False)
    metering.set_budget(database, "acme", "0", month="2026-11")  # even a zero budget allows free models
    a = go(database, key, "r1", model="free-model", prompt=100, max_tokens=50)
    assert a.reserved_pusd == 0
    settle(database, a, prompt_tokens=100, completion_tokens=50, status="completed")
    (row,) = ledger(database)
    assert (row.prompt_tokens, row.completion_tokens, row.cost_pusd) == (100, 50, 0)
    report = metering.usage_report(database, "acme", "2026-11")
    assert [(m.model, m.requests, m.prompt_tokens, m.completion_tokens) for m in report.models] == [
        ("free-model", 1, 100, 50)
    ]
    assert_ledger_consistent(database)


def test_quota_refusal_consumes_nothing(database):
    key = setup(database, rpm=100, tpm=10_000)
    hold = 10 * IN + 20 * OUT
    metering.set_budget(database, "acme", str(Decimal(2 * hold - 1).scaleb(-12)), month="2026-11")
    a = go(database, key, "r1")
    assert month_row(database) == (0, hold)
    state = (ledger(database), month_row(database), ratelimit_tokens(database, key))
    with pytest.raises(QuotaExceeded) as e:
        go(database, key, "r2")
    assert (ledger(database), month_row(database), ratelimit_tokens(database, key)) == state
    assert e.value.headers["x-should-retry"] == "false"
    assert e.value.headers["x-ratelimit-remaining-requests"] == "99"  # r2 was not counted
    assert e.value.headers["x-ratelimit-remaining-tokens"] == str(10_000 - 30)
    assert (e.value.status, e.value.code) == (429, "insufficient_quota")
    assert "budget of tenant 'acme' for 2026-11 is $0.000026999999" in e.value.message
    # settling r1 below its hold frees the difference: r2 now fits
    settle(database, a, prompt_tokens=10, completion_tokens=0, status="completed")
    go(database, key, "r2")
    assert month_row(database) == (10 * IN, hold)
    # a request bigger than the whole budget is refused outright
    with pytest.raises(QuotaExceeded):
        go(database, key, "big", prompt=10, max_tokens=5_000, now=T0)
    assert_ledger_consistent(database)


@pytest.mark.parametrize("settle_while_racing", [False, True])
def test_budget_is_never_exceeded_by_racing_threads(database, settle_while_racing):
    key = setup(database)
    hold = 10 * IN + 20 * OUT
    allowed = 17
    limit = allowed * hold + hold - 1  # room for 17 holds, not 18
    metering.set_budget(database, "acme", str(Decimal(limit).scaleb(-12)), month="2026-11")
    n = 50
    barrier = threading.Barrier(n + 1)
    admitted, refused, errors, peaks = [], [], [], []
    done = threading.Event()

    def worker(i: int) -> None:
        try:
            barrier.wait()
            a = go(database, key, f"r{i}", now=T0 + timedelta(milliseconds=i))
            admitted.append(a)
            if settle_while_racing:  # actual cost is 10 + 20 tokens: the whole hold becomes spent
                settle(database, a, prompt_tokens=10, completion_tokens=20, status="completed")
        except QuotaExceeded:
            refused.append(i)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def monitor() -> None:
        barrier.wait()
        while not done.is_set():
            row = month_row(database)
            if row:
                peaks.append(sum(row))
            time.sleep(0.001)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    watcher = threading.Thread(target=monitor)
    for t in (*threads, watcher):
        t.start()
    for t in threads:
        t.join(60)
    done.set()
    watcher.join(10)
    assert errors == []
    assert len(admitted) == allowed and len(refused) == n - allowed
    assert peaks and max(peaks) <= limit
    spent, reserved = month_row(database)
    assert spent + reserved == allowed * hold <= limit
    assert len(ledger(database)) == allowed
    assert_ledger_consistent(database)


def test_rpm_window_and_headers(database):
    key = setup(database, rpm=3)
    remaining = [go(database, key, f"r{i}").headers for i in range(3)]
    assert remaining[0] == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-reset-requests": "1m0s",
    }
    assert [h["x-ratelimit-remaining-requests"] for h in remaining] == ["2", "1", "0"]
    with pytest.raises(RateLimited) as e:
        go(database, key, "r3", now=T0 + timedelta(seconds=12.5))
    assert (e.value.status, e.value.code, e.value.type) == (429, "rate_limit_exceeded", "requests")
    assert e.value.headers == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "48s",
        "retry-after": "48",
    }
    assert "Limit 3, Used 3, Requested 1. Please try again in 48s." in e.value.message
    assert len(ledger(database)) == 3  # the refused request left no row
    assert metering.ratelimit_headers(database, key, T0 + timedelta(seconds=59.5)) == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1s",
    }
    # the window opened at the first request and lasts 60 s: then a new one opens with this request
    h = go(database, key, "r4", now=T0 + timedelta(seconds=60)).headers
    assert (h["x-ratelimit-remaining-requests"], h["x-ratelimit-reset-requests"]) == ("2", "1m0s")
    assert (
        metering.ratelimit_headers(database, key, T0 + timedelta(seconds=200))[
            "x-ratelimit-remaining-requests"
        ]
        == "3"
    )
    unlimited = setup(database)
    assert go(database, unlimited, "u1").headers == {}
    assert metering.ratelimit_headers(database, unlimited) == {}


def test_rpm_n_plus_one_racing_gives_exactly_one_429(database):
    n = 10
    key = setup(database, rpm=n)
    barrier = threading.Barrier(n + 1)
    outcomes: list[str] = []

    def worker(i: int) -> None:
        barrier.wait()
        try:
            go(database, key, f"r{i}", now=T0 + timedelta(seconds=1))
            outcomes.append("ok")
        except RateLimited as e:
            outcomes.append(e.headers["x-ratelimit-remaining-requests"])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["0"] + ["ok"] * n


def test_tpm_counts_prompt_plus_max_and_gives_back_the_unused(database):
    key = setup(database, tpm=100)
    a = go(database, key, "r1", prompt=10, max_tokens=50)
    assert a.headers == {
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "40",
        "x-ratelimit-reset-tokens": "1m0s",
    }
    with pytest.raises(RateLimited) as e:
        go(database, key, "r2", prompt=10, max_tokens=50, now=T0 + timedelta(seconds=30))
    assert e.value.type == "tokens" and e.value.headers["x-ratelimit-remaining-tokens"] == "40"
    assert "Limit 100, Used 60, Requested 60." in e.value.message
    settle(database, a, prompt_tokens=10, completion_tokens=5, status="completed")  # 45 unused come back
    assert ratelimit_tokens(database, key) == 15
    b = go(database, key, "r2", prompt=10, max_tokens=50, now=T0 + timedelta(seconds=30))
    assert b.headers["x-ratelimit-remaining-tokens"] == "25"
    assert b.headers["x-ratelimit-reset-tokens"] == "30s"
    # a request larger than the whole limit can never pass: no retry
    with pytest.raises(RateLimited) as e:
        go(database, key, "r3", prompt=60, max_tokens=41, now=T0 + timedelta(seconds=90))
    assert e.value.headers["x-should-retry"] == "false" and "Request too large" in e.value.message
    # settling in a later window gives nothing back to the new one
    c = go(database, key, "r4", prompt=10, max_tokens=50, now=T0 + timedelta(seconds=90))
    settle(database, b, prompt_tokens=10, completion_tokens=0, status="completed")
    assert ratelimit_tokens(database, key) == 60
    settle(database, c, prompt_tokens=10, completion_tokens=50, status="completed")
    assert ratelimit_tokens(database, key) == 60


def test_prices_take_effect_on_their_date_and_old_usage_keeps_its_price(database):
    auth.create_tenant(database, "acme")
    key, _ = auth.create_key(database, "acme")
    metering.set_price(database, "m", input_usd="0.15", output_usd="0.60", now=T0)
    change = T0 + timedelta(days=1)
    metering.set_price(database, "m", input_usd="1", output_usd="2.000001", effective_from=change, now=T0)
    early = go(database, key, "early", now=change - timedelta(hours=1))
    late = go(database, key, "late", now=change)
    assert (early.input_uusd_per_mtok, early.output_uusd_per_mtok) == (IN, OUT)
    assert (late.input_uusd_per_mtok, late.output_uusd_per_mtok) == (1_000_000, 2_000_001)
    # settled after the change, the early request is still billed at the price it started under
    settle(
        database, early, prompt_tokens=10, completion_tokens=20, status="completed", now=change + timedelta(1)
    )
    settle(
        database, late, prompt_tokens=10, completion_tokens=20, status="completed", now=change + timedelta(1)
    )
    costs = {r.request_id: r.cost_pusd for r in ledger(database)}
    assert costs == {"early": 10 * IN + 20 * OUT, "late": 10 * 1_000_000 + 20 * 2_000_001}
    # a new price later does not touch either row
    metering.set_price(database, "m", input_usd="9", output_usd="9", now=change + timedelta(days=2))
    assert {r.request_id: r.cost_pusd for r in ledger(database)} == costs
    assert [(p.effective_from, p.input_uusd_per_mtok) for p in metering.list_prices(database)] == [
        (T0, IN),
        (change, 1_000_000),
        (change + timedelta(days=2), 9_000_000),
    ]
    # re-setting a scheduled price replaces it
    metering.set_price(
        database, "m", input_usd="3", output_usd="3", effective_from=T0 + timedelta(days=9), now=T0
    )
    metering.set_price(
        database, "m", input_usd="4", output_usd="4", effective_from=T0 + timedelta(days=9), now=T0
    )
    assert [p.input_uusd_per_mtok for p in metering.list_prices(database, "m")][-1] == 4_000_000
    with pytest.raises(UserError, match="is in the past"):
        metering.set_price(database, "m", input_usd="1", output_usd="1", effective_from=T0, now=change)
    with pytest.raises(UserError, match="the output price has more than 6 decimal places"):
        metering.set_price(database, "m", input_usd="1", output_usd="0.0000001")
    with pytest.raises(UserError, match="the input price cannot be negative"):
        metering.set_price(database, "m", input_usd="-0.1", output_usd="1")


def test_budgets(database):
    auth.create_tenant(database, "acme")
    b = metering.set_budget(database, "acme", "25.5", month="2026-11")
    assert (b.tenant, b.month, b.limit_pusd, b.spent_pusd) == ("acme", "2026-11", 25_500_000_000_000, 0)
    metering.set_budget(database, "acme", "30", month="2026-11")
    metering.set_budget(database, "acme", "0.000000000001", month="2026-12")
    assert [(x.month, x.limit_pusd) for x in metering.list_budgets(database)] == [
        ("2026-11", 30 * 10**12),
        ("2026-12", 1),
    ]
    assert metering.budget_status(database, "acme", "2027-01").limit_pusd is None
    with pytest.raises(UserError, match="more than 12 decimal places"):
        metering.set_budget(database, "acme", "0.0000000000001")
    with pytest.raises(UserError, match="a month is YYYY-MM"):
        metering.set_budget(database, "acme", "1", month="2026-13")
    with pytest.raises(UserError, match="no tenant named 'nope'"):
        metering.set_budget(database, "nope", "1")


def test_reconcile_releases_dead_instances_holds_only(database):
    key = setup(database)
    alive = metering.register_instance(database, now=T0 - timedelta(minutes=5))
    dead = metering.register_instance(database, now=T0 - timedelta(minutes=5))
    metering.heartbeat(database, alive, now=T0)
    metering.heartbeat(database, dead, now=T0 - timedelta(seconds=61))
    a = go(database, key, "alive", instance=alive)
    d = go(database, key, "dead", instance=dead)
    gone = go(database, key, "gone", instance="never-registered")
    hold = a.reserved_pusd
    assert month_row(database) == (0, 3 * hold)
    assert metering.reconcile_stale(database, stale_after_s=60, now=T0) == 2
    rows = {r.request_id: r for r in ledger(database)}
    assert rows["alive"].status == "pending" and rows["alive"].reserved_pusd == hold
    for rid in ("dead", "gone"):
        r = rows[rid]
        assert (r.status, r.error, r.completion_tokens, r.cost_pusd, r.reserved_pusd) == (
            "failed",
            "server stopped before the request finished",
            0,
            0,
            0,
        )
    assert month_row(database) == (0, hold)
    with database.read() as conn:
        assert list(conn.execute(sa.select(instances.c.id)).scalars()) == [alive]
    # the dead process comes back: its late settle changes nothing, its heartbeat re-registers it
    settle(database, d, prompt_tokens=10, completion_tokens=20, status="completed")
    settle(database, gone, prompt_tokens=10, completion_tokens=20, status="completed")
    assert month_row(database) == (0, hold)
    metering.heartbeat(database, dead, now=T0 + timedelta(seconds=1))
    assert metering.reconcile_stale(database, stale_after_s=60, now=T0 + timedelta(seconds=1)) == 0
    settle(database, a, prompt_tokens=10, completion_tokens=20, status="completed")
    assert month_row(database) == (hold, 0)
    metering.unregister_instance(database, alive)
    with database.read() as conn:
        assert list(conn.execute(sa.select(instances.c.id)).scalars()) == [dead]
    assert_ledger_consistent(database)


def test_totals_equal_the_ledger_after_a_random_history(database):
    rng = random.Random(5)
    auth.create_tenant(database, "acme")
    auth.create_tenant(database, "globex")
    keys = [auth.create_key(database, t, tpm=5000)[0] for t in ("acme", "acme", "globex")]
    metering.set_price(database, "a", input_usd="0.15", output_usd="0.6", now=T0 - timedelta(days=60))
    metering.set_price(database, "b", input_usd="3", output_usd="15", now=T0 - timedelta(days=60))
    metering.set_budget(database, "globex", "0.001", month="2026-11")
    a_instance = metering.register_instance(database, now=T0 - timedelta(days=60))
    open_: list = []
    now = datetime(2026, 11, 30, 23, 50, tzinfo=UTC)  # straddles a month boundary
    refused = 0
    for i in range(150):
        now += timedelta(seconds=rng.randint(1, 20))
        if open_ and rng.random() < 0.45:
            adm = open_.pop(rng.randrange(len(open_)))
            settle(
                database,
                adm,
                prompt_tokens=10,
                completion_tokens=rng.randint(0, adm.reserved_tokens - 10),
                status=rng.choice(["completed", "completed", "cancelled", "failed"]),
                now=now,
            )
            continue
        try:
            open_.append(
                go(
                    database,
                    rng.choice(keys),
                    f"r{i}",
                    prompt=10,
                    max_tokens=rng.randint(1, 300),
                    model=rng.choice(["a", "b", "free"]),
                    now=now,
                    instance=rng.choice([a_instance, "crashed"]),
                )
            )
        except (QuotaExceeded, RateLimited):
            refused += 1
    metering.heartbeat(database, a_instance, now=now)
    metering.reconcile_stale(database, stale_after_s=60, now=now)
    assert refused > 0 and open_
    assert_ledger_consistent(database)
    months = {m for (_, m) in month_cells(database)}
    assert months == {"2026-11", "2026-12"}
    for adm in open_:
        settle(database, adm, prompt_tokens=10, completion_tokens=1, status="completed", now=now)
    assert_ledger_consistent(database)
    with database.read() as conn:
        assert conn.execute(sa.select(sa.func.sum(tenant_months.c.reserved_pusd))).scalar() == 0
    for tenant in ("acme", "globex"):
        for month in ("2026-11", "2026-12"):
            report = metering.usage_report(database, tenant, month)
            assert report.totals.cost_pusd == report.budget.spent_pusd and report.pending == 0
    assert metering.usage_report(database, "globex", "2026-11").budget.spent_pusd <= 10**9


def month_cells(db):
    with db.read() as conn:
        return conn.execute(sa.select(tenant_months.c.tenant_id, tenant_months.c.month)).all()


def test_duplicate_request_id_is_refused_and_consumes_nothing(database):
    key = setup(database, rpm=10)
    go(database, key, "same")
    state = (month_row(database), len(ledger(database)))
    with pytest.raises(ValueError, match="request id 'same' is already in the ledger"):
        go(database, key, "same")
    assert (month_row(database), len(ledger(database))) == state
    assert metering.ratelimit_headers(database, key, T0)["x-ratelimit-remaining-requests"] == "9"


def test_reports(database):
    setup(database)
    k2 = setup(database, tenant="globex")
    k1 = auth.list_keys(database, "acme")[0]
    metering.set_price(database, "z-big", input_usd="3", output_usd="15", now=T0 - timedelta(days=30))
    day1, day2 = datetime(2026, 11, 1, 0, 0, 1, tzinfo=UTC), datetime(2026, 11, 3, 23, 59, 59, tzinfo=UTC)
    plan = [
        ("a1", k1, "m", day1, 100, 40, "completed"),
        ("a2", k1, "z-big", day1, 1000, 200, "completed"),
        ("a3", k1, "m", day2, 50, 3, "cancelled"),
        ("a4", k1, "m", datetime(2026, 10, 31, 23, 59, 59, tzinfo=UTC), 7, 7, "completed"),  # October
        ("g1", k2, "m", day1, 999, 999, "completed"),  # another tenant
    ]
    for rid, key, model, when, p, c, status in plan:
        adm = go(database, key, rid, model=model, prompt=p, max_tokens=c + 10, now=when)
        settle(database, adm, prompt_tokens=p, completion_tokens=c, status=status, now=when)
    go(database, k1, "a5", now=day2 + timedelta(seconds=-1))  # still running
    report = metering.usage_report(database, "acme", "2026-11")
    m_cost = (100 + 50) * IN + (40 + 3) * OUT
    big_cost = 1000 * 3_000_000 + 200 * 15_000_000
    assert [
        (m.model, m.requests, m.prompt_tokens, m.completion_tokens, m.cost_pusd) for m in report.models
    ] == [
        ("m", 2, 150, 43, m_cost),
        ("z-big", 1, 1000, 200, big_cost),
    ]
    assert report.totals == metering.ModelUsage("total", 3, 1150, 243, m_cost + big_cost)
    assert report.pending == 1
    assert metering.usage_csv(report) == (
        "tenant,month,model,requests,prompt_tokens,completion_tokens,cost_usd\n"
        "acme,2026-11,m,2,150,43,0.0000483\n"
        "acme,2026-11,z-big,1,1000,200,0.006\n"
        "acme,2026-11,total,3,1150,243,0.0060483\n"
    )
    daily = metering.daily_usage(database, "acme", "2026-11")
    assert len(daily) == 30 and daily[0].date == "2026-11-01" and daily[-1].date == "2026-11-30"
    assert daily[0] == metering.DailyUsage(
        "2026-11-01", 2, 100 + 40 + 1000 + 200, 100 * IN + 40 * OUT + big_cost
    )
    assert daily[2] == metering.DailyUsage("2026-11-03", 1, 53, 50 * IN + 3 * OUT)
    assert sum(d.requests for d in daily) == 3 and daily[1].requests == 0
    recent = metering.recent_requests(database, "acme", limit=3)
    assert [r.request_id for r in recent] == ["a3", "a5", "a2"]  # a1 and a2 started together: newest id first
    assert recent[1].status == "pending" and recent[0].key_prefix == k1.prefix
    assert {r.request_id for r in metering.recent_requests(database, "globex")} == {"g1"}
    assert metering.usage_report(database, "acme", "2026-10").totals.requests == 1
    empty = metering.usage_report(database, "acme", "2025-01")
    assert empty.models == [] and empty.totals.cost_pusd == 0
    assert metering.usage_csv(empty).splitlines()[1:] == ["acme,2025-01,total,0,0,0,0.00"]
