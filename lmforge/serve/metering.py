"""Metering: rate limits, budget holds and the usage ledger; prices and budgets; usage reports.

The request path is two write transactions around generation (on PostgreSQL one statement each; all of it on
raw DB-API cursors, `Database.raw()`):

    admit()   the key is not revoked or expired (auth.KeyCache)        -> auth.AuthError 403
              rate window +1 request, +(prompt + max_tokens) tokens     -> RateLimited if over RPM/TPM
              tenant's month: reserved += the request's maximum cost   -> QuotaExceeded if over the budget
              a 'pending' ledger row
              (admit_many: the requests that arrive together, as one statement on PostgreSQL when all fit)
    settle()  ledger row -> completed | cancelled | failed, with the tokens the client was told
              month: the hold moves to spent (the actual cost); the TPM window gets the unused tokens back
              (settle_many: several requests' settles in one transaction, the server's group commit)

Each check-and-charge is ONE conditional upsert (`INSERT .. ON CONFLICT DO UPDATE .. WHERE <still fits>
RETURNING`), atomic on SQLite (one writer at a time) and on PostgreSQL (the conflicting row is locked and the
WHERE re-checked on its newest version), so limits hold across any number of server processes with no
per-process counter as the source of truth. A refusal rolls the whole transaction back: nothing is consumed.
`tenant_months` keeps running totals in the same transactions as the ledger, so that
spent = sum(cost of settled rows) and reserved = sum(holds of pending rows) at every commit.

Lock order (PostgreSQL deadlock freedom), everywhere: ledger rows (a settle's; an admit's row is new), then rate
windows in key order, then tenant months in tenant order. The data-modifying CTEs of one statement run in no
set order, so each statement's months CTE reads its windows CTE, which makes PostgreSQL run that one first.

A server process that dies leaves pending rows; `reconcile_stale` (at start-up and on every heartbeat, by any
live process) fails the rows of processes that stopped heartbeating and releases their holds.

Money is integers: prices in micro-USD per million tokens, costs in picodollars, so
`cost = prompt_tokens * input_price + completion_tokens * output_price` exactly.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import secrets
import socket
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from lmforge.errors import UserError
from lmforge.serve.auth import ApiKey, check_live, get_key, get_tenant, revoked
from lmforge.serve.db import (
    BigId,
    Database,
    UTCDateTime,
    api_keys,
    budgets,
    instances,
    prices,
    rate_windows,
    tenant_months,
    tenants,
    usage,
    utcnow,
)

log = logging.getLogger(__name__)

PUSD_PER_USD = 10**12
WINDOW = timedelta(seconds=60)
PENDING = "pending"
FINAL_STATUSES = ("completed", "cancelled", "failed")
STALE_ERROR = "server stopped before the request finished"


# --------------------------------------------------------------------------------------- money and months


def parse_usd(value: str | Decimal | int, *, places: int, what: str) -> int:
    """Decimal dollars -> an integer count of 10**-places dollars; UserError for anything else."""
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise UserError(f"{what} must be an amount in dollars like 0.15, got {value!r}") from None
    if not amount.is_finite():
        raise UserError(f"{what} must be a finite amount in dollars, got {value!r}")
    if amount < 0:
        raise UserError(f"{what} cannot be negative, got {value}")
    scaled = amount.scaleb(places)
    if scaled != scaled.to_integral_value():
        raise UserError(f"{what} has more than {places} decimal places: {value}")
    return int(scaled)


def format_usd(pusd: int) -> str:
    """Picodollars as exact decimal dollars, at least 2 decimals: 123_000_000 -> "0.000123", 0 -> "0.00"."""
    text = f"{Decimal(pusd).scaleb(-12):.12f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


def format_price(uusd_per_mtok: int) -> str:
    """Micro-USD per million tokens as dollars per million tokens: 150_000 -> "0.15"."""
    return format_usd(uusd_per_mtok * 10**6)


_MONTH = re.compile(r"(\d{4})-(\d{2})")


def parse_month(text: str) -> str:
    m = _MONTH.fullmatch(text.strip())
    if m is None or not 1 <= int(m.group(2)) <= 12 or int(m.group(1)) < 1970:
        raise UserError(f"a month is YYYY-MM (e.g. 2026-11), got {text!r}")
    return text.strip()


def month_of(when: datetime) -> str:
    return f"{when.astimezone(UTC):%Y-%m}"


def month_range(month: str) -> tuple[datetime, datetime]:
    """[first instant, first instant of the next month) in UTC."""
    year, mon = (int(p) for p in parse_month(month).split("-"))
    start = datetime(year, mon, 1, tzinfo=UTC)
    end = datetime(year + mon // 12, mon % 12 + 1, 1, tzinfo=UTC)
    return start, end


def parse_when(text: str, *, what: str, end_of_day: bool = False) -> datetime:
    """A UTC instant from `YYYY-MM-DD` or ISO 8601 (a bare date or time is UTC). With `end_of_day`, a bare date
    means "through that day": the instant the next day begins."""
    text = text.strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            when = datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC)
            return when + timedelta(days=1) if end_of_day else when
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"{what} must be a date YYYY-MM-DD or an ISO 8601 time, got {text!r}") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _upsert(table: sa.Table, conn: sa.Connection, **values: Any) -> Any:
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(table).values(**values)


# ------------------------------------------------------------------------------------------- the hot path


@dataclass(frozen=True)
class Admission:
    """An admitted request: what settle() needs to close its ledger row and give back its holds."""

    usage_id: int
    request_id: str
    key: ApiKey
    model: str
    reserved_pusd: int
    reserved_tokens: int
    headers: dict[str, str]  # x-ratelimit-* after this request was counted
    month: str  # the budget month the hold was taken from (the month the request started in)
    started_at: datetime
    input_uusd_per_mtok: int  # the prices in force when the request started: the ones it is billed at
    output_uusd_per_mtok: int
    window_start: datetime | None  # the rate window charged; None for a key without limits


class RateLimited(Exception):
    """RPM or TPM exceeded: HTTP 429, code "rate_limit_exceeded", with Retry-After in `headers`."""

    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, headers: dict[str, str], *, type: str = "requests") -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers
        self.type = type  # "requests" | "tokens" (OpenAI's error type for rate limits)


class QuotaExceeded(Exception):
    """The tenant's monthly budget would be exceeded: HTTP 429, code "insufficient_quota", never retried."""

    status = 429
    code = "insufficient_quota"
    type = "insufficient_quota"

    def __init__(self, message: str, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers


def _duration(seconds: float) -> str:
    """OpenAI's reset format, whole seconds rounded up: 12 -> "12s", 60 -> "1m0s"."""
    s = max(0, math.ceil(seconds - 1e-9))
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"


def _headers(key: ApiKey, window_start: datetime | None, requests: int, tokens: int, now: datetime) -> dict:
    if window_start is None or window_start + WINDOW <= now:
        requests, tokens, reset = 0, 0, 0.0
    else:
        reset = (window_start + WINDOW - now).total_seconds()
    headers = {}
    if key.rpm is not None:
        headers["x-ratelimit-limit-requests"] = str(key.rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(0, key.rpm - requests))
        headers["x-ratelimit-reset-requests"] = _duration(reset)
    if key.tpm is not None:
        headers["x-ratelimit-limit-tokens"] = str(key.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, key.tpm - tokens))
        headers["x-ratelimit-reset-tokens"] = _duration(reset)
    return headers


def ratelimit_headers(db: Database, key: ApiKey, now: datetime | None = None) -> dict[str, str]:
    """The key's x-ratelimit-* headers as things stand (read-only); {} for a key without limits."""
    if key.rpm is None and key.tpm is None:
        return {}
    now = now or utcnow()
    with db.read() as conn:
        row = conn.execute(sa.select(rate_windows).where(rate_windows.c.key_id == key.id)).first()
    if row is None:
        return _headers(key, None, 0, 0, now)
    return _headers(key, row.window_start, row.requests, row.tokens, now)


def _rate_limit_error(key: ApiKey, row: Any, tokens: int, now: datetime) -> RateLimited:
    headers = _headers(key, row.window_start, row.requests, row.tokens, now)
    wait = _duration((row.window_start + WINDOW - now).total_seconds())
    headers["retry-after"] = str(max(1, math.ceil((row.window_start + WINDOW - now).total_seconds())))
    if key.rpm is not None and row.requests + 1 > key.rpm:
        message = (
            f"Rate limit reached for requests per minute (RPM) on API key {key.prefix}...: "
            f"Limit {key.rpm}, Used {row.requests}, Requested 1. Please try again in {wait}."
        )
        return RateLimited(message, headers, type="requests")
    message = (
        f"Rate limit reached for tokens per minute (TPM) on API key {key.prefix}...: Limit {key.tpm}, "
        f"Used {row.tokens}, Requested {tokens}. Please try again in {wait}."
    )
    return RateLimited(message, headers, type="tokens")


@dataclass(frozen=True)
class _Statements:
    """The hot path's statements on SQLite, built once and run with parameters: building a Core statement
    costs about ten times more than running a built one (measured: 2 ms vs 0.2 ms for the window upsert).
    SQLite runs them one by one in its transaction (cheap: no round trips); PostgreSQL runs _PG_ADMIT,
    _PG_ADMIT_MANY and _PG_SETTLE_MANY below instead."""

    charge_window: Any
    lookup: Any
    reserve: Any
    reserve_within: Any
    insert_pending: Any
    close_row: Any
    refund_tokens: Any
    settle_month: Any


NO_RPM = 2**31 - 1  # stands for "no limit" in the window upsert's WHERE (the column is an INTEGER)
NO_TPM = 2**62


@functools.cache
def _sqlite_statements() -> _Statements:
    insert = sqlite.insert
    B = sa.bindparam
    now = B("p_now", type_=UTCDateTime)
    tenant_id, month = B("p_tenant_id", type_=sa.Integer), B("p_month", type_=sa.String)

    rw = rate_windows
    window = insert(rw).values(
        key_id=B("p_key_id", type_=sa.Integer),
        window_start=now,
        requests=1,
        tokens=B("p_tokens", type_=sa.BigInteger),
    )
    expired = rw.c.window_start <= B("p_cutoff", type_=UTCDateTime)  # the window is 60 s old: a new one opens
    fits = sa.and_(
        rw.c.requests + 1 <= B("p_rpm", type_=sa.Integer),
        rw.c.tokens + window.excluded.tokens <= B("p_tpm", type_=sa.BigInteger),
    )
    charge_window = window.on_conflict_do_update(
        index_elements=[rw.c.key_id],
        set_={
            "window_start": sa.case((expired, window.excluded.window_start), else_=rw.c.window_start),
            "requests": sa.case((expired, 1), else_=rw.c.requests + 1),
            "tokens": sa.case((expired, window.excluded.tokens), else_=rw.c.tokens + window.excluded.tokens),
        },
        where=sa.or_(expired, fits),
    ).returning(rw.c.window_start, rw.c.requests, rw.c.tokens)

    price = (
        sa.select(prices.c.input_uusd_per_mtok, prices.c.output_uusd_per_mtok)
        .where(prices.c.model == B("p_model", type_=sa.String), prices.c.effective_from <= now)
        .order_by(prices.c.effective_from.desc())
        .limit(1)
        .subquery()
    )
    lookup = sa.select(
        sa.select(price.c.input_uusd_per_mtok).scalar_subquery(),
        sa.select(price.c.output_uusd_per_mtok).scalar_subquery(),
        sa.select(budgets.c.limit_pusd)
        .where(budgets.c.tenant_id == tenant_id, budgets.c.month == month)
        .scalar_subquery(),
        sa.exists().where(  # the key is neither revoked nor expired (auth.KeyCache)
            api_keys.c.id == B("p_key_id", type_=sa.Integer),
            sa.or_(api_keys.c.revoked_at.is_(None), api_keys.c.revoked_at > now),
            sa.or_(api_keys.c.expires_at.is_(None), api_keys.c.expires_at > now),
        ),
    )

    tm = tenant_months
    hold = insert(tm).values(
        tenant_id=tenant_id, month=month, spent_pusd=0, reserved_pusd=B("p_hold", type_=sa.BigInteger)
    )
    grow = {"reserved_pusd": tm.c.reserved_pusd + hold.excluded.reserved_pusd}
    reserve = hold.on_conflict_do_update(index_elements=[tm.c.tenant_id, tm.c.month], set_=grow)
    reserve_within = hold.on_conflict_do_update(
        index_elements=[tm.c.tenant_id, tm.c.month],
        set_=grow,
        where=tm.c.spent_pusd + tm.c.reserved_pusd + hold.excluded.reserved_pusd
        <= B("p_limit", type_=sa.BigInteger),
    ).returning(tm.c.reserved_pusd)

    insert_pending = (
        sa.insert(usage)
        .values(
            request_id=B("p_request_id", type_=sa.String),
            tenant_id=tenant_id,
            key_id=B("p_key_id", type_=sa.Integer),
            model=B("p_model", type_=sa.String),
            status=PENDING,
            prompt_tokens=B("p_prompt", type_=sa.Integer),
            completion_tokens=0,
            cost_pusd=0,
            reserved_pusd=B("p_hold", type_=sa.BigInteger),
            input_uusd_per_mtok=B("p_in", type_=sa.BigInteger),
            output_uusd_per_mtok=B("p_out", type_=sa.BigInteger),
            started_at=now,
            instance_id=B("p_instance", type_=sa.String),
        )
        .returning(usage.c.id)
    )

    close_row = (
        sa.update(usage)
        .where(usage.c.id == B("p_usage_id", type_=sa.BigInteger), usage.c.status == PENDING)
        .values(
            status=B("p_status", type_=sa.String),
            prompt_tokens=B("p_prompt", type_=sa.Integer),
            completion_tokens=B("p_completion", type_=sa.Integer),
            cost_pusd=B("p_cost", type_=sa.BigInteger),
            reserved_pusd=0,
            finished_at=now,
            error=B("p_error", type_=sa.Text),
        )
    )
    unused = B("p_unused", type_=sa.BigInteger)
    refund_tokens = (
        sa.update(rw)
        .where(
            rw.c.key_id == B("p_key_id", type_=sa.Integer),
            rw.c.window_start == B("p_window_start", type_=UTCDateTime),
            rw.c.tokens >= unused,
        )
        .values(tokens=rw.c.tokens - unused)
    )
    spend = insert(tm).values(
        tenant_id=tenant_id, month=month, spent_pusd=B("p_cost", type_=sa.BigInteger), reserved_pusd=0
    )
    settle_month = spend.on_conflict_do_update(
        index_elements=[tm.c.tenant_id, tm.c.month],
        set_={
            "spent_pusd": tm.c.spent_pusd + spend.excluded.spent_pusd,
            "reserved_pusd": tm.c.reserved_pusd - B("p_hold", type_=sa.BigInteger),
        },
    )
    return _Statements(
        charge_window, lookup, reserve, reserve_within, insert_pending, close_row, refund_tokens, settle_month
    )


# PostgreSQL runs admit and settle as ONE statement each (data-modifying CTEs, which SQLite lacks): a round trip
# costs ~0.1 ms of CPU on each side of the socket, and the multi-statement path above took 11 per request
# (BEGIN, 4 + 3 statements, COMMIT x2) -- on a 2-core server that CPU comes straight out of the engine's share.
# The CTEs run on one snapshot but every conditional upsert re-checks its WHERE on the locked, latest row, as
# the multi-statement path does. Both run in autocommit, one round trip each: when the budget refuses a hold, the
# rate window charged in the same statement must not stay charged, so the statement then fails on purpose (a
# division by zero, BUDGET_REFUSED) and PostgreSQL rolls all of it back -- plain SQL has no RAISE, and a
# transaction around the statement would cost two more round trips on every request to serve a rare refusal.
def _admitted_columns() -> list[sa.ColumnClause]:
    """What _PG_ADMIT and _PG_ADMIT_MANY return first per admitted request, in this order (a text statement's
    columns are matched by position): its ledger row, the key's rate window after it, its hold and its prices."""
    return [
        sa.column("usage_id", BigId),
        sa.column("window_start", UTCDateTime),
        sa.column("requests", sa.Integer),
        sa.column("tokens", sa.BigInteger),
        sa.column("hold", sa.BigInteger),
        sa.column("p_in", sa.BigInteger),
        sa.column("p_out", sa.BigInteger),
    ]


# What both admit statements ask: the key is live at :p_now (neither revoked nor expired, as auth.check_live);
# the price of a model in force at :p_now.
_LIVE_KEY = "(revoked_at IS NULL OR revoked_at > :p_now) AND (expires_at IS NULL OR expires_at > :p_now)"


def _price_in_force(model: str) -> str:
    return (
        f"SELECT input_uusd_per_mtok, output_uusd_per_mtok FROM prices WHERE model = {model} "
        "AND effective_from <= :p_now ORDER BY effective_from DESC LIMIT 1"
    )


_PG_ADMIT = (
    sa.text(
        f"""
WITH live AS (
    SELECT EXISTS (SELECT 1 FROM api_keys WHERE id = :p_key_id AND {_LIVE_KEY}) AS ok
), w AS (
    INSERT INTO rate_windows AS rw (key_id, window_start, requests, tokens)
    SELECT :p_key_id, :p_now, 1, :p_tokens FROM live WHERE live.ok AND :p_limited
    ON CONFLICT (key_id) DO UPDATE SET
        window_start = CASE WHEN rw.window_start <= :p_cutoff THEN excluded.window_start ELSE rw.window_start END,
        requests = CASE WHEN rw.window_start <= :p_cutoff THEN 1 ELSE rw.requests + 1 END,
        tokens = CASE WHEN rw.window_start <= :p_cutoff THEN excluded.tokens ELSE rw.tokens + excluded.tokens END
    WHERE rw.window_start <= :p_cutoff
       OR (rw.requests + 1 <= :p_rpm AND rw.tokens + excluded.tokens <= :p_tpm)
    RETURNING rw.window_start, rw.requests, rw.tokens
), go AS (
    SELECT live.ok AND (NOT :p_limited OR EXISTS (SELECT 1 FROM w)) AS ok, live.ok AS key_ok FROM live
), held AS (
    SELECT coalesce(p.input_uusd_per_mtok, 0) AS p_in, coalesce(p.output_uusd_per_mtok, 0) AS p_out,
           b.limit_pusd AS p_limit,
           :p_prompt * coalesce(p.input_uusd_per_mtok, 0) + :p_max * coalesce(p.output_uusd_per_mtok, 0) AS hold
    FROM (SELECT 1) AS one
    LEFT JOIN LATERAL ({_price_in_force(":p_model")}) AS p ON true
    LEFT JOIN budgets AS b ON b.tenant_id = :p_tenant_id AND b.month = :p_month
), reserved AS (
    INSERT INTO tenant_months AS tm (tenant_id, month, spent_pusd, reserved_pusd)
    SELECT :p_tenant_id, :p_month, 0, hold FROM held, go
    WHERE go.ok AND hold > 0 AND (p_limit IS NULL OR hold <= p_limit)
    ON CONFLICT (tenant_id, month) DO UPDATE SET reserved_pusd = tm.reserved_pusd + excluded.reserved_pusd
    WHERE (SELECT p_limit FROM held) IS NULL
       OR tm.spent_pusd + tm.reserved_pusd + excluded.reserved_pusd <= (SELECT p_limit FROM held)
    RETURNING 1
), admitted AS (
    INSERT INTO usage (request_id, tenant_id, key_id, model, status, prompt_tokens, completion_tokens, cost_pusd,
                       reserved_pusd, input_uusd_per_mtok, output_uusd_per_mtok, started_at, instance_id)
    SELECT :p_request_id, :p_tenant_id, :p_key_id, :p_model, 'pending', :p_prompt, 0, 0,
           hold, p_in, p_out, :p_now, :p_instance
    FROM held, go
    WHERE go.ok AND (hold = 0 OR EXISTS (SELECT 1 FROM reserved))
    RETURNING id
)
SELECT (SELECT id FROM admitted) AS usage_id, w.window_start, w.requests, w.tokens, held.hold, held.p_in, held.p_out,
       go.key_ok, go.ok AS window_ok,
       1 / CASE WHEN go.ok AND NOT EXISTS (SELECT 1 FROM admitted) THEN 0 ELSE 1 END AS budget_ok
FROM held CROSS JOIN go LEFT JOIN w ON true
"""
    )
    .bindparams(
        sa.bindparam("p_now", type_=UTCDateTime),
        sa.bindparam("p_cutoff", type_=UTCDateTime),
        sa.bindparam("p_limited", type_=sa.Boolean),
        sa.bindparam("p_tokens", type_=sa.BigInteger),
        sa.bindparam("p_tpm", type_=sa.BigInteger),
        sa.bindparam("p_prompt", type_=sa.BigInteger),
        sa.bindparam("p_max", type_=sa.BigInteger),
    )
    .columns(
        *_admitted_columns(),
        sa.column("key_ok", sa.Boolean),
        sa.column("window_ok", sa.Boolean),
        sa.column("budget_ok", sa.Integer),
    )
)
# SQLSTATE division_by_zero: how _PG_ADMIT refuses a hold, and _PG_ADMIT_MANY a batch that does not fit
BUDGET_REFUSED = "22012"


def _batch_rows(columns: tuple[tuple[str, str], ...], *, ordinality: bool = False) -> str:
    """A batch's rows, bound as one JSON array :p_rows (`_batch_arg`), as a table `b` with a column per
    (name, SQL type) in `columns` (and `ord`, 1-based, if `ordinality`). One JSON text, not an array per column:
    psycopg works out each list's element type in Python, ~10 us a list, 10-12 lists a statement."""
    typed = ", ".join(f"{name} {sqltype}" for name, sqltype in columns)
    if not ordinality:
        return f"json_to_recordset(CAST(:p_rows AS json)) AS b({typed})"
    names = ", ".join([name for name, _ in columns] + ["ord"])
    return f"ROWS FROM (json_to_recordset(CAST(:p_rows AS json)) AS ({typed})) WITH ORDINALITY AS b({names})"


def _batch_arg(columns: tuple[tuple[str, str], ...], rows: list[dict[str, Any]]) -> dict[str, str]:
    """`_batch_rows`'s parameter: the rows (each holds p_<name>) as a JSON array of objects, times in ISO 8601."""
    names = [(name, f"p_{name}") for name, _ in columns]
    return {"p_rows": json.dumps([{name: row[arg] for name, arg in names} for row in rows], default=_iso)}


def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} in a ledger batch")


_ADMIT_MANY_COLUMNS = (("request_id", "text"), ("key_id", "bigint"), ("tenant_id", "bigint"), ("model", "text"),
                       ("prompt", "bigint"), ("max", "bigint"), ("limited", "boolean"), ("rpm", "bigint"),
                       ("tpm", "bigint"), ("instance", "text"))  # fmt: skip

# admit_many on PostgreSQL: a batch of admits as ONE statement (one round trip, one commit), the requests as rows in
# order (`_batch_rows`), all at one time. It only ever admits the whole batch: each rate window is charged with its
# requests' count and tokens summed, each tenant month with its requests' holds summed, which is what the same
# admits one after the other would leave, and as they would, every one of them passes when the totals fit (the
# charges only grow). If anything would be refused -- a key no longer live, a window or a budget over its limit --
# the statement changes nothing: it writes nothing for a dead key, and otherwise fails on purpose (BUDGET_REFUSED),
# rolling back what it charged. Windows are taken in key order and months in tenant order. Per request it returns
# its ledger row and the window as its lone admit would have left it (the requests of its key before it in the batch
# counted): its x-ratelimit-* headers.
_PG_ADMIT_MANY = (
    sa.text(
        f"""
WITH b AS (
    SELECT * FROM {_batch_rows(_ADMIT_MANY_COLUMNS, ordinality=True)}
), priced AS (
    SELECT b.*, b.prompt + b.max AS tokens, coalesce(p.input_uusd_per_mtok, 0) AS p_in,
           coalesce(p.output_uusd_per_mtok, 0) AS p_out,
           b.prompt * coalesce(p.input_uusd_per_mtok, 0) + b.max * coalesce(p.output_uusd_per_mtok, 0) AS hold
    FROM b LEFT JOIN LATERAL ({_price_in_force("b.model")}) AS p ON true
), live AS (
    SELECT count(*) = (SELECT count(DISTINCT key_id) FROM b) AS ok FROM api_keys
    WHERE id IN (SELECT key_id FROM b) AND {_LIVE_KEY}
), k AS (
    SELECT key_id, count(*) AS n, sum(tokens) AS tokens, min(rpm) AS rpm, min(tpm) AS tpm
    FROM priced WHERE limited GROUP BY key_id
), w AS (
    INSERT INTO rate_windows AS rw (key_id, window_start, requests, tokens)
    SELECT key_id, :p_now, n, tokens FROM k, live WHERE live.ok AND n <= rpm AND tokens <= tpm ORDER BY key_id
    ON CONFLICT (key_id) DO UPDATE SET
        window_start = CASE WHEN rw.window_start <= :p_cutoff THEN excluded.window_start ELSE rw.window_start END,
        requests = CASE WHEN rw.window_start <= :p_cutoff THEN excluded.requests
                        ELSE rw.requests + excluded.requests END,
        tokens = CASE WHEN rw.window_start <= :p_cutoff THEN excluded.tokens ELSE rw.tokens + excluded.tokens END
    WHERE rw.window_start <= :p_cutoff
       OR (rw.requests + excluded.requests <= (SELECT rpm FROM k WHERE k.key_id = rw.key_id)
           AND rw.tokens + excluded.tokens <= (SELECT tpm FROM k WHERE k.key_id = rw.key_id))
    RETURNING rw.key_id, rw.window_start, rw.requests, rw.tokens
), t AS (
    SELECT priced.tenant_id, sum(hold) AS hold, min(bu.limit_pusd) AS p_limit FROM priced
    LEFT JOIN budgets AS bu ON bu.tenant_id = priced.tenant_id AND bu.month = :p_month
    GROUP BY priced.tenant_id
), reserved AS (
    INSERT INTO tenant_months AS tm (tenant_id, month, spent_pusd, reserved_pusd)
    SELECT tenant_id, :p_month, 0, hold FROM t, live
    WHERE live.ok AND hold > 0 AND (p_limit IS NULL OR hold <= p_limit)
      AND (SELECT count(*) FROM w) >= 0  -- reads w: the windows are locked before the months (lock order)
    ORDER BY tenant_id
    ON CONFLICT (tenant_id, month) DO UPDATE SET reserved_pusd = tm.reserved_pusd + excluded.reserved_pusd
    WHERE (SELECT p_limit FROM t WHERE t.tenant_id = tm.tenant_id) IS NULL
       OR tm.spent_pusd + tm.reserved_pusd + excluded.reserved_pusd
          <= (SELECT p_limit FROM t WHERE t.tenant_id = tm.tenant_id)
    RETURNING tm.tenant_id
), admitted AS (
    INSERT INTO usage (request_id, tenant_id, key_id, model, status, prompt_tokens, completion_tokens, cost_pusd,
                       reserved_pusd, input_uusd_per_mtok, output_uusd_per_mtok, started_at, instance_id)
    SELECT request_id, tenant_id, key_id, model, 'pending', prompt, 0, 0, hold, p_in, p_out, :p_now, instance
    FROM priced, live WHERE live.ok ORDER BY ord
    RETURNING id, request_id
), verdict AS (
    SELECT (SELECT count(*) FROM w) = (SELECT count(*) FROM k)
       AND (SELECT count(*) FROM reserved) = (SELECT count(*) FROM t WHERE hold > 0) AS ok
)
SELECT admitted.id AS usage_id, w.window_start,
       w.requests - k.n + row_number() OVER (PARTITION BY priced.key_id ORDER BY priced.ord) AS requests,
       w.tokens - k.tokens + sum(priced.tokens) OVER (PARTITION BY priced.key_id ORDER BY priced.ord) AS tokens,
       priced.hold, priced.p_in, priced.p_out, 1 / CASE WHEN verdict.ok THEN 1 ELSE 0 END AS admitted
FROM priced JOIN admitted ON admitted.request_id = priced.request_id CROSS JOIN verdict
LEFT JOIN k ON k.key_id = priced.key_id LEFT JOIN w ON w.key_id = priced.key_id
ORDER BY priced.ord
"""
    )
    .bindparams(
        sa.bindparam("p_now", type_=UTCDateTime),
        sa.bindparam("p_cutoff", type_=UTCDateTime),
    )
    .columns(*_admitted_columns(), sa.column("admitted", sa.Integer))
)

_SETTLE_MANY_COLUMNS = (("usage_id", "bigint"), ("status", "text"), ("prompt", "bigint"), ("completion", "bigint"),
                        ("cost", "bigint"), ("now", "timestamptz"), ("error", "text"), ("key_id", "bigint"),
                        ("window_start", "timestamptz"), ("unused", "bigint"), ("month", "text"),
                        ("hold", "bigint"))  # fmt: skip

# settle_many on PostgreSQL: ONE statement for a whole batch or a single settle (one round trip, one commit,
# atomic by itself), the settles as rows (`_batch_rows`). Only rows still pending are closed, and only those give
# their tokens back and move their holds to spent, summed per rate window and per tenant month.
_PG_SETTLE_MANY = sa.text(
    f"""
WITH batch AS (
    SELECT * FROM {_batch_rows(_SETTLE_MANY_COLUMNS)}
), closed AS (
    UPDATE usage AS u SET status = b.status, prompt_tokens = b.prompt, completion_tokens = b.completion,
        cost_pusd = b.cost, reserved_pusd = 0, finished_at = b.now, error = b.error
    FROM batch AS b
    WHERE u.id = b.usage_id AND u.status = '{PENDING}'
    RETURNING u.id, u.tenant_id
), done AS (
    SELECT b.*, closed.tenant_id FROM batch AS b JOIN closed ON closed.id = b.usage_id
), refunded AS (
    UPDATE rate_windows AS w SET tokens = w.tokens - r.unused
    FROM (SELECT key_id, window_start, sum(unused) AS unused FROM done WHERE unused > 0
          GROUP BY key_id, window_start ORDER BY key_id) AS r
    WHERE w.key_id = r.key_id AND w.window_start = r.window_start AND w.tokens >= r.unused
    RETURNING 1
), spent AS (
    INSERT INTO tenant_months AS tm (tenant_id, month, spent_pusd, reserved_pusd)
    SELECT tenant_id, month, sum(cost), -sum(hold) FROM done
    WHERE (cost > 0 OR hold > 0)
      AND (SELECT count(*) FROM refunded) >= 0  -- reads refunded: windows locked before months (lock order)
    GROUP BY tenant_id, month ORDER BY tenant_id, month
    ON CONFLICT (tenant_id, month) DO UPDATE SET spent_pusd = tm.spent_pusd + excluded.spent_pusd,
        reserved_pusd = tm.reserved_pusd + excluded.reserved_pusd
)
SELECT count(*) FROM closed
"""
)


def admit(
    db: Database,
    key: ApiKey,
    model: str,
    *,
    request_id: str,
    prompt_tokens: int,
    max_completion_tokens: int,
    instance_id: str | None,
    now: datetime | None = None,
) -> Admission:
    """Admit a request in ONE transaction (rate window, budget hold, pending ledger row), or raise RateLimited /
    QuotaExceeded / auth.AuthError (a key revoked or expired since it was cached) having consumed nothing."""
    request = {"key": key, "model": model, "request_id": request_id, "prompt_tokens": prompt_tokens,
               "max_completion_tokens": max_completion_tokens, "instance_id": instance_id}  # fmt: skip
    (outcome,) = admit_many(db, [request], now)
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def admit_many(db: Database, requests: list[dict[str, Any]], now: datetime | None = None) -> list[Any]:
    """Admit several requests (each `admit`'s keyword arguments but `db`), as `admit` would one after the other
    in the order given, all at one time `now`: per request its Admission or the exception `admit` would raise.

    On PostgreSQL the batch runs as ONE statement (_PG_ADMIT_MANY) when every request in it is admitted -- one
    round trip and one commit instead of one each; when any would be refused, that statement fails and changes
    nothing, and the requests are admitted one by one, so each refusal is exactly the one a lone admit gives.
    A request too large for its key's TPM is refused at its turn: its headers count the requests before it."""
    now = now or utcnow()
    results: list[Any] = [None] * len(requests)
    run: list[tuple[int, dict[str, Any], dict[str, Any]]] = []  # admitted together
    for i, r in enumerate(requests):
        try:
            args = _admit_args(r, now)
        except ValueError as e:
            results[i] = e
            continue
        if _too_large(r["key"], args):
            _admit_together(db, run, results)
            run = []
            results[i] = _too_large_error(db, r["key"], args)
        else:
            run.append((i, r, args))
    _admit_together(db, run, results)
    return results


def _admit_together(
    db: Database, run: list[tuple[int, dict[str, Any], dict[str, Any]]], results: list
) -> None:
    if db.dialect == "postgresql" and len(run) > 1:
        admitted = _admit_postgres_many(db, [(r["key"], args) for _, r, args in run])
        if admitted is not None:
            for (i, _, _), admission in zip(run, admitted, strict=True):
                results[i] = admission
            return
    for i, r, args in run:
        try:
            results[i] = _admit_one(db, r["key"], args)
        except Exception as e:  # noqa: BLE001 - the request's own outcome, as admit would raise it
            results[i] = e


def _admit_args(request: dict[str, Any], now: datetime) -> dict[str, Any]:
    """admit's statement parameters for `request` (admit's keyword arguments); ValueError for negative counts."""
    key, prompt_tokens, max_completion_tokens = (
        request["key"],
        request["prompt_tokens"],
        request["max_completion_tokens"],
    )
    if prompt_tokens < 0 or max_completion_tokens < 0:
        raise ValueError(f"negative token counts: {prompt_tokens}, {max_completion_tokens}")
    return {
        "p_key_id": key.id,
        "p_tenant_id": key.tenant_id,
        "p_model": request["model"],
        "p_month": month_of(now),
        "p_now": now,
        "p_cutoff": now - WINDOW,
        "p_tokens": prompt_tokens + max_completion_tokens,
        "p_rpm": NO_RPM if key.rpm is None else key.rpm,
        "p_tpm": NO_TPM if key.tpm is None else key.tpm,
        "p_prompt": prompt_tokens,
        "p_max": max_completion_tokens,
        "p_request_id": request["request_id"],
        "p_instance": request["instance_id"],
        "p_limited": key.rpm is not None or key.tpm is not None,
    }


def _too_large(key: ApiKey, args: dict[str, Any]) -> bool:
    """The request may use more tokens than its key allows in a minute: refused without a transaction."""
    return key.tpm is not None and args["p_tokens"] > key.tpm


def _too_large_error(db: Database, key: ApiKey, args: dict[str, Any]) -> RateLimited:
    tokens = args["p_tokens"]
    return RateLimited(
        f"Request too large for API key {key.prefix}...: it may use {tokens} tokens (prompt + max_tokens) "
        f"but the key's limit is {key.tpm} tokens per minute. Lower max_tokens or shorten the prompt.",
        ratelimit_headers(db, key, args["p_now"]) | {"x-should-retry": "false"},
        type="tokens",
    )


def _admit_one(db: Database, key: ApiKey, args: dict[str, Any]) -> Admission:
    try:
        if db.dialect == "postgresql":
            with db.raw(transaction=False) as cur:  # one statement (see _PG_ADMIT)
                usage_id, window, in_price, out_price, hold = _admit_postgres(db, cur, args)
        else:
            with db.raw(transaction=True) as cur:
                usage_id, window, in_price, out_price, hold = _admit_statements(db, cur, args)
    except sa.exc.IntegrityError:
        raise ValueError(f"request id {args['p_request_id']!r} is already in the ledger") from None
    except _Refused as refused:  # rolled back: nothing was consumed; the error reads the state that refused
        if refused.by == "key":  # revoked or expired since the key was cached: its row says which
            check_live(get_key(db, key.id), args["p_now"])
            raise revoked(key) from None  # (live again by now: the refusal stands)
        raise (
            _quota_exceeded(db, key, args) if refused.by == "budget" else _rate_limited(db, key, args)
        ) from None
    return _admission(key, args, usage_id, window, in_price, out_price, hold)


def _admission(
    key: ApiKey, args: dict[str, Any], usage_id: int, window: Any, in_price: int, out_price: int, hold: int
) -> Admission:
    """The Admission of an admitted request; `window` (window_start, requests, tokens) is its key's rate window
    after it, None (or a NULL window_start) for a key without limits."""
    now = args["p_now"]
    window_start = None if window is None else window.window_start
    return Admission(
        usage_id=usage_id,
        request_id=args["p_request_id"],
        key=key,
        model=args["p_model"],
        reserved_pusd=hold,
        reserved_tokens=args["p_tokens"],
        headers={}
        if window_start is None
        else _headers(key, window_start, window.requests, window.tokens, now),
        month=args["p_month"],
        started_at=now,
        input_uusd_per_mtok=in_price,
        output_uusd_per_mtok=out_price,
        window_start=window_start,
    )


# The errors after which _PG_ADMIT_MANY changed nothing and its requests are admitted one by one instead: its
# own refusal (BUDGET_REFUSED), a request id already in the ledger, a deadlock or serialization failure with
# another process. Any other error (a lost connection: the batch may have committed) goes to every caller.
_RETRY_ONE_BY_ONE = {BUDGET_REFUSED, "23505", "40P01", "40001"}


def _admit_postgres_many(db: Database, batch: list[tuple[ApiKey, dict]]) -> list | None:
    """The batch's Admissions from one _PG_ADMIT_MANY statement, or None if any request would be refused: then
    nothing changed."""
    first = batch[0][1]  # the batch's time: the same in every request's args
    args = _batch_arg(_ADMIT_MANY_COLUMNS, [request_args for _, request_args in batch])
    args |= {name: first[name] for name in ("p_now", "p_cutoff", "p_month")}
    try:
        with db.raw(transaction=False) as cur:
            rows = db.prepared(_PG_ADMIT_MANY).all(cur, args)
    except sa.exc.DBAPIError as e:
        if getattr(e.orig, "sqlstate", None) in _RETRY_ONE_BY_ONE:
            return None
        raise
    if len(rows) != len(batch):  # a key revoked or expired since it was cached: nothing was written
        return None
    return [
        _admission(key, args, row.usage_id, row, row.p_in, row.p_out, row.hold)
        for (key, args), row in zip(batch, rows, strict=True)
    ]


class _Refused(Exception):
    """Raised inside admit's transaction (or after its statement) to roll it back: `by` the key (revoked or
    expired since the process cached it: auth.KeyCache), the rate window or the budget."""

    def __init__(self, by: str) -> None:
        self.by = by


def _admit_statements(db: Database, cur: Any, args: dict) -> tuple:
    """admit's transaction as a statement per step (SQLite)."""
    q = _sqlite_statements()
    in_price, out_price, limit, live = db.prepared(q.lookup).first(cur, args)
    if not live:
        raise _Refused("key")
    window = None
    if args["p_limited"]:
        window = db.prepared(q.charge_window).first(cur, args)
        if window is None:
            raise _Refused("window")
    in_price, out_price = in_price or 0, out_price or 0
    hold = args["p_prompt"] * in_price + args["p_max"] * out_price
    if hold:
        hold_args = args | {"p_hold": hold}
        if limit is None:
            db.prepared(q.reserve).execute(cur, hold_args)
        elif hold > limit or db.prepared(q.reserve_within).first(cur, hold_args | {"p_limit": limit}) is None:
            raise _Refused("budget")
    row = db.prepared(q.insert_pending).first(
        cur, args | {"p_hold": hold, "p_in": in_price, "p_out": out_price}
    )
    return row[0], window, in_price, out_price, hold


def _admit_postgres(db: Database, cur: Any, args: dict) -> tuple:
    """admit as one autocommit statement (PostgreSQL; see _PG_ADMIT)."""
    try:
        row = db.prepared(_PG_ADMIT).first(cur, args)
    except db.dbapi_error as e:
        if getattr(e, "sqlstate", None) == BUDGET_REFUSED:
            raise _Refused("budget") from None
        raise
    if not row.key_ok:
        raise _Refused("key")
    if not row.window_ok:
        raise _Refused("window")
    return row.usage_id, (row if args["p_limited"] else None), row.p_in, row.p_out, row.hold


def _rate_limited(db: Database, key: ApiKey, args: dict) -> RateLimited:
    with db.read() as conn:
        current = conn.execute(sa.select(rate_windows).where(rate_windows.c.key_id == key.id)).one()
    return _rate_limit_error(key, current, args["p_tokens"], args["p_now"])


def _quota_exceeded(db: Database, key: ApiKey, args: dict) -> QuotaExceeded:
    """The refusal's message and headers, read after the rollback: the window as if this request had not come."""
    tm, rw = tenant_months, rate_windows
    month, now = args["p_month"], args["p_now"]
    with db.read() as conn:
        # the price and budget lookup is a plain SELECT: SQLite's hot-path statement serves both backends here
        in_price, out_price, limit, _ = conn.execute(_sqlite_statements().lookup, args).one()
        row = conn.execute(sa.select(tm).where(tm.c.tenant_id == key.tenant_id, tm.c.month == month)).first()
        window = conn.execute(sa.select(rw).where(rw.c.key_id == key.id)).first()
    hold = args["p_prompt"] * (in_price or 0) + args["p_max"] * (out_price or 0)
    spent, reserved = (row.spent_pusd, row.reserved_pusd) if row is not None else (0, 0)
    headers = {"x-should-retry": "false"}
    if window is not None:
        headers |= _headers(key, window.window_start, window.requests, window.tokens, now)
    else:  # the key's first request: no window yet
        headers |= _headers(key, None, 0, 0, now)
    return QuotaExceeded(
        f"You exceeded your current quota: the budget of tenant '{key.tenant}' for {month} is "
        f"${format_usd(limit)}, ${format_usd(spent)} is spent and ${format_usd(reserved)} is held by running "
        f"requests, and this request may cost up to ${format_usd(hold)}. Ask your administrator to raise the "
        "budget, or lower max_tokens.",
        headers,
    )


def settlement(
    admission: Admission,
    *,
    prompt_tokens: int,
    completion_tokens: int,
    status: str,
    error: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """What `settle_many` needs to close an admitted request's row with the tokens the client was told: its cost
    at the admission's prices, and the TPM tokens it did not use."""
    if status not in FINAL_STATUSES:
        raise ValueError(f"status must be one of {FINAL_STATUSES}, got {status!r}")
    if prompt_tokens < 0 or completion_tokens < 0:
        raise ValueError(f"negative token counts: {prompt_tokens}, {completion_tokens}")
    if now is not None and now.tzinfo is None:  # as UTCDateTime: the PostgreSQL batch's rows bypass it
        raise ValueError(f"naive datetime {now!r}: lmforge stores timezone-aware UTC datetimes")
    a = admission
    cost = prompt_tokens * a.input_uusd_per_mtok + completion_tokens * a.output_uusd_per_mtok
    if cost > a.reserved_pusd:
        log.warning(
            "request %s cost %d pUSD, more than the %d pUSD held (%d+%d tokens, %d reserved)",
            a.request_id,
            cost,
            a.reserved_pusd,
            prompt_tokens,
            completion_tokens,
            a.reserved_tokens,
        )
    unused = a.reserved_tokens - prompt_tokens - completion_tokens
    return {
        "p_usage_id": a.usage_id,
        "p_status": status,
        "p_prompt": prompt_tokens,
        "p_completion": completion_tokens,
        "p_cost": cost,
        "p_now": now or utcnow(),
        "p_error": error,
        "p_key_id": a.key.id,
        "p_window_start": a.window_start,
        "p_unused": unused if a.window_start is not None and a.key.tpm is not None and unused > 0 else 0,
        "p_tenant_id": a.key.tenant_id,
        "p_month": a.month,
        "p_hold": a.reserved_pusd,
    }


def settle(db: Database, admission: Admission, **told: Any) -> None:
    """Close the request's ledger row with the tokens the client was told (`settlement()`'s arguments), in ONE
    transaction; the hold moves to spent as the actual cost and unused TPM tokens go back to the window. A
    second call is a no-op."""
    settle_many(db, [settlement(admission, **told)])


def settle_many(db: Database, settlements: list[dict[str, Any]]) -> None:
    """Settle several requests (`settlement()`s) in ONE transaction: a group commit, one commit for all of them
    (on PostgreSQL one statement, _PG_SETTLE_MANY). Each is closed as `settle` would close it alone, and one
    settled before is skipped. On PostgreSQL the batch takes its rate windows in key order and its tenant months
    in tenant order; should two processes' batches still wait on each other, PostgreSQL's deadlock detection
    fails one of them, and the server's ledger then settles that batch one by one (`serve.ledger`)."""
    if not settlements:
        return
    if db.dialect == "postgresql":
        with db.raw(transaction=False) as cur:
            db.prepared(_PG_SETTLE_MANY).execute(
                cur, _batch_arg(_SETTLE_MANY_COLUMNS, settlements)
            ).fetchall()
        return
    q = _sqlite_statements()
    with db.raw(transaction=True) as cur:
        for args in settlements:
            if not db.prepared(q.close_row).execute(cur, args).rowcount:
                continue  # settled before, or failed by reconcile_stale: its hold is already released
            if args["p_unused"]:
                db.prepared(q.refund_tokens).execute(cur, args)
            if args["p_cost"] or args["p_hold"]:
                db.prepared(q.settle_month).execute(cur, args)


# -------------------------------------------------------------------------------------- server processes


def register_instance(db: Database, now: datetime | None = None) -> str:
    """Register this server process; returns its id (stamped on its ledger rows)."""
    now = now or utcnow()
    instance_id = f"{socket.gethostname()[:60]}-{os.getpid()}-{secrets.token_hex(4)}"
    with db.write() as conn:
        conn.execute(sa.insert(instances).values(id=instance_id, started_at=now, heartbeat_at=now))
    return instance_id


def heartbeat(db: Database, instance_id: str, now: datetime | None = None) -> None:
    """Say the process is alive (re-registering it if a reconcile had given it up for dead)."""
    now = now or utcnow()
    with db.write() as conn:
        stmt = _upsert(instances, conn, id=instance_id, started_at=now, heartbeat_at=now)
        conn.execute(stmt.on_conflict_do_update(index_elements=[instances.c.id], set_={"heartbeat_at": now}))


def unregister_instance(db: Database, instance_id: str) -> None:
    """A clean shutdown: forget the process (any request it left pending is reconciled at once)."""
    with db.write() as conn:
        conn.execute(sa.delete(instances).where(instances.c.id == instance_id))


def reconcile_stale(db: Database, *, stale_after_s: float, now: datetime | None = None) -> int:
    """Fail the pending requests of processes silent for `stale_after_s` (or unregistered) and release their
    holds: the client never got an answer, so nothing is billed. Returns how many rows it closed."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=stale_after_s)
    live = sa.select(instances.c.id).where(instances.c.heartbeat_at > cutoff)
    with db.write() as conn:
        candidates = conn.execute(
            sa.select(usage.c.id, usage.c.tenant_id, usage.c.started_at, usage.c.reserved_pusd).where(
                usage.c.status == PENDING,
                sa.or_(usage.c.instance_id.is_(None), usage.c.instance_id.not_in(live)),
            )
        ).all()
        if candidates:
            closed = set(
                conn.execute(
                    sa.update(usage)
                    .where(usage.c.id.in_([c.id for c in candidates]), usage.c.status == PENDING)
                    .values(
                        status="failed",
                        error=STALE_ERROR,
                        prompt_tokens=0,
                        completion_tokens=0,
                        cost_pusd=0,
                        reserved_pusd=0,
                        finished_at=now,
                    )
                    .returning(usage.c.id)
                ).scalars()
            )
            released: dict[tuple[int, str], int] = {}
            for c in candidates:
                if c.id in closed and c.reserved_pusd:
                    month = (c.tenant_id, month_of(c.started_at))
                    released[month] = released.get(month, 0) + c.reserved_pusd
            tm = tenant_months
            for (tenant_id, month), amount in sorted(released.items()):
                conn.execute(
                    sa.update(tm)
                    .where(tm.c.tenant_id == tenant_id, tm.c.month == month)
                    .values(reserved_pusd=tm.c.reserved_pusd - amount)
                )
        else:
            closed = set()
        conn.execute(sa.delete(instances).where(instances.c.heartbeat_at <= cutoff))
    if closed:
        log.warning("released %d request(s) left pending by stopped server processes", len(closed))
    return len(closed)


# ---------------------------------------------------------------------------------------- prices, budgets


@dataclass(frozen=True)
class Price:
    model: str
    effective_from: datetime
    input_uusd_per_mtok: int
    output_uusd_per_mtok: int


@dataclass(frozen=True)
class Budget:
    tenant: str
    month: str
    limit_pusd: int | None  # None = no budget (unlimited)
    spent_pusd: int = 0
    reserved_pusd: int = 0


def set_price(
    db: Database,
    model: str,
    *,
    input_usd: str | Decimal | int,
    output_usd: str | Decimal | int,
    effective_from: datetime | None = None,
    now: datetime | None = None,
) -> Price:
    """Set `model`'s price in dollars per million prompt / completion tokens (at most 6 decimals), from now or
    from a future instant. Requests keep the price in force when they started, so history is never rewritten
    (an effective date in the past is refused)."""
    model = model.strip()
    if not model:
        raise UserError("the price needs a model name")
    in_price = parse_usd(input_usd, places=6, what="the input price")
    out_price = parse_usd(output_usd, places=6, what="the output price")
    now = now or utcnow()
    if effective_from is None:
        effective_from = now
    elif effective_from.tzinfo is None:
        raise UserError("the effective date needs a timezone")
    elif effective_from < now - timedelta(seconds=1):
        raise UserError(
            f"the effective date {effective_from.isoformat()} is in the past; prices apply from now or later"
        )
    effective_from = effective_from.astimezone(UTC)
    with db.write() as conn:
        stmt = _upsert(
            prices,
            conn,
            model=model,
            effective_from=effective_from,
            input_uusd_per_mtok=in_price,
            output_uusd_per_mtok=out_price,
        )
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[prices.c.model, prices.c.effective_from],
                set_={"input_uusd_per_mtok": in_price, "output_uusd_per_mtok": out_price},
            )
        )
    return Price(model, effective_from, in_price, out_price)


def list_prices(db: Database, model: str | None = None) -> list[Price]:
    """Every price row (history and scheduled changes), by model then date."""
    query = sa.select(prices).order_by(prices.c.model, prices.c.effective_from)
    if model is not None:
        query = query.where(prices.c.model == model)
    with db.read() as conn:
        rows = conn.execute(query).all()
    found = [Price(r.model, r.effective_from, r.input_uusd_per_mtok, r.output_uusd_per_mtok) for r in rows]
    return sorted(found, key=lambda p: (p.model, p.effective_from))  # code-point order on every database


def set_budget(
    db: Database,
    tenant: str,
    usd: str | Decimal | int,
    *,
    month: str | None = None,
    now: datetime | None = None,
) -> Budget:
    """Limit `tenant`'s spending in `month` (default: this month) to `usd` dollars. Lowering it below what is
    already spent refuses further paid requests; it never rewrites the ledger."""
    limit = parse_usd(usd, places=12, what="the budget")
    month = parse_month(month) if month is not None else month_of(now or utcnow())
    with db.write() as conn:
        owner = get_tenant(conn, tenant)
        stmt = _upsert(budgets, conn, tenant_id=owner.id, month=month, limit_pusd=limit)
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[budgets.c.tenant_id, budgets.c.month], set_={"limit_pusd": limit}
            )
        )
    return budget_status(db, tenant, month)


def budget_status(db: Database, tenant: str, month: str) -> Budget:
    month = parse_month(month)
    with db.read() as conn:
        owner = get_tenant(conn, tenant)
        return _budget(conn, owner.id, owner.name, month)


def _budget(conn: sa.Connection, tenant_id: int, tenant: str, month: str) -> Budget:
    limit = conn.execute(
        sa.select(budgets.c.limit_pusd).where(budgets.c.tenant_id == tenant_id, budgets.c.month == month)
    ).scalar()
    tm = tenant_months
    row = conn.execute(sa.select(tm).where(tm.c.tenant_id == tenant_id, tm.c.month == month)).first()
    spent, reserved = (row.spent_pusd, row.reserved_pusd) if row is not None else (0, 0)
    return Budget(tenant, month, limit, spent, reserved)


def list_budgets(db: Database, tenant: str | None = None) -> list[Budget]:
    """Every budget set (by tenant, then month), with what is spent and held in that month."""
    query = (
        sa.select(
            tenants.c.name,
            budgets.c.month,
            budgets.c.limit_pusd,
            tenant_months.c.spent_pusd,
            tenant_months.c.reserved_pusd,
        )
        .join(tenants, tenants.c.id == budgets.c.tenant_id)
        .outerjoin(
            tenant_months,
            sa.and_(
                tenant_months.c.tenant_id == budgets.c.tenant_id, tenant_months.c.month == budgets.c.month
            ),
        )
        .order_by(tenants.c.id, budgets.c.month)
    )
    with db.read() as conn:
        if tenant is not None:
            query = query.where(budgets.c.tenant_id == get_tenant(conn, tenant).id)
        rows = conn.execute(query).all()
    return [Budget(r.name, r.month, r.limit_pusd, r.spent_pusd or 0, r.reserved_pusd or 0) for r in rows]


# ------------------------------------------------------------------------------------------------ reports


@dataclass(frozen=True)
class ModelUsage:
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_pusd: int


@dataclass(frozen=True)
class UsageReport:
    """A tenant's settled requests in one month, per model, with totals: the invoice's lines."""

    tenant: str
    month: str
    models: list[ModelUsage]
    totals: ModelUsage
    budget: Budget  # limit (None = unlimited), spent and currently held
    pending: int  # requests still running (not in the lines until they are settled)


@dataclass(frozen=True)
class DailyUsage:
    date: str  # YYYY-MM-DD (UTC)
    requests: int
    tokens: int  # prompt + completion
    cost_pusd: int


@dataclass(frozen=True)
class UsageRecord:
    request_id: str
    model: str
    status: str
    prompt_tokens: int
    completion_tokens: int
    cost_pusd: int
    started_at: datetime
    finished_at: datetime | None
    key_prefix: str


def _in_month(tenant_id: int, month: str) -> sa.ColumnElement[bool]:
    start, end = month_range(month)
    return sa.and_(usage.c.tenant_id == tenant_id, usage.c.started_at >= start, usage.c.started_at < end)


def usage_report(db: Database, tenant: str, month: str) -> UsageReport:
    """Per model: settled requests, tokens and cost in `month` (by start time, UTC); totals; the budget."""
    month = parse_month(month)
    with db.read() as conn:
        owner = get_tenant(conn, tenant)
        rows = conn.execute(
            sa.select(
                usage.c.model,
                sa.func.count(),
                sa.func.sum(usage.c.prompt_tokens),
                sa.func.sum(usage.c.completion_tokens),
                sa.func.sum(usage.c.cost_pusd),
            )
            .where(_in_month(owner.id, month), usage.c.status != PENDING)
            .group_by(usage.c.model)
        ).all()
        pending = conn.execute(
            sa.select(sa.func.count()).where(_in_month(owner.id, month), usage.c.status == PENDING)
        ).scalar_one()
        budget = _budget(conn, owner.id, owner.name, month)
    # sorted here, not in SQL: the same order (code points) whatever the database's collation
    models = sorted(
        (ModelUsage(r[0], int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows), key=lambda m: m.model
    )
    totals = ModelUsage(
        "total",
        sum(m.requests for m in models),
        sum(m.prompt_tokens for m in models),
        sum(m.completion_tokens for m in models),
        sum(m.cost_pusd for m in models),
    )
    return UsageReport(owner.name, month, models, totals, budget, pending)


def usage_csv(report: UsageReport) -> str:
    """The report as CSV: one line per model, then a `total` line; costs in exact decimal dollars."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["tenant", "month", "model", "requests", "prompt_tokens", "completion_tokens", "cost_usd"]
    )
    for m in (*report.models, report.totals):
        writer.writerow(
            [
                report.tenant,
                report.month,
                m.model,
                m.requests,
                m.prompt_tokens,
                m.completion_tokens,
                format_usd(m.cost_pusd),
            ]
        )
    return out.getvalue()


def daily_usage(db: Database, tenant: str, month: str) -> list[DailyUsage]:
    """Every day of `month` (UTC), zeros included: settled requests, tokens and cost."""
    month = parse_month(month)
    with db.read() as conn:
        owner = get_tenant(conn, tenant)
        if conn.dialect.name == "postgresql":
            day = sa.func.to_char(sa.func.timezone("UTC", usage.c.started_at), "YYYY-MM-DD")
        else:  # stored as "YYYY-MM-DD HH:MM:SS.ffffff" in UTC
            day = sa.func.substr(sa.cast(usage.c.started_at, sa.String), 1, 10)
        rows = conn.execute(
            sa.select(
                day.label("day"),
                sa.func.count(),
                sa.func.sum(usage.c.prompt_tokens + usage.c.completion_tokens),
                sa.func.sum(usage.c.cost_pusd),
            )
            .where(_in_month(owner.id, month), usage.c.status != PENDING)
            .group_by(day)
        ).all()
    found = {r[0]: DailyUsage(r[0], int(r[1]), int(r[2]), int(r[3])) for r in rows}
    start, end = month_range(month)
    days = [(start + timedelta(days=i)).strftime("%Y-%m-%d") for i in range((end - start).days)]
    return [found.get(d, DailyUsage(d, 0, 0, 0)) for d in days]


def recent_requests(db: Database, tenant: str, limit: int = 20) -> list[UsageRecord]:
    """The tenant's latest requests (pending ones included), newest first."""
    with db.read() as conn:
        owner = get_tenant(conn, tenant)
        rows = conn.execute(
            sa.select(usage, api_keys.c.prefix)
            .join(api_keys, api_keys.c.id == usage.c.key_id)
            .where(usage.c.tenant_id == owner.id)
            .order_by(usage.c.started_at.desc(), usage.c.id.desc())
            .limit(max(0, limit))
        ).all()
    return [
        UsageRecord(
            r.request_id,
            r.model,
            r.status,
            r.prompt_tokens,
            r.completion_tokens,
            r.cost_pusd,
            r.started_at,
            r.finished_at,
            r.prefix,
        )
        for r in rows
    ]
