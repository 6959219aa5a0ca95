"""GET /v1/usage: the calling key's tenant's usage in a month (the web console's usage page reads it).

The tenant is always the key's own: no parameter names a tenant, so no key can read another tenant's usage.
Costs are exact decimal-dollar strings ("0.000123"), never floats.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from lmforge.serve import metering
from lmforge.serve.auth import ApiKey, require_key
from lmforge.serve.db import Database
from lmforge.serve.deps import get_state
from lmforge.serve.errors import APIError

router = APIRouter()


def _line(m: metering.ModelUsage) -> dict[str, Any]:
    return {
        "model": m.model,
        "requests": m.requests,
        "prompt_tokens": m.prompt_tokens,
        "completion_tokens": m.completion_tokens,
        "cost_usd": metering.format_usd(m.cost_pusd),
    }


def _usd(pusd: int | None) -> str | None:
    return None if pusd is None else metering.format_usd(pusd)


def usage_body(db: Database, tenant: str, month: str, *, recent: int = 20) -> dict[str, Any]:
    """The JSON of a tenant's month: per model and totals, per day, the latest requests, the budget."""
    report = metering.usage_report(db, tenant, month)
    daily = metering.daily_usage(db, tenant, report.month)
    latest = metering.recent_requests(db, tenant, recent)
    return {
        "object": "usage",
        "tenant": report.tenant,
        "month": report.month,
        "models": [_line(m) for m in report.models],
        "totals": {k: v for k, v in _line(report.totals).items() if k != "model"},
        "daily": [
            {
                "date": d.date,
                "requests": d.requests,
                "tokens": d.tokens,
                "cost_usd": metering.format_usd(d.cost_pusd),
            }
            for d in daily
        ],
        "recent": [
            {
                "request_id": r.request_id,
                "model": r.model,
                "status": r.status,
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens,
                "cost_usd": metering.format_usd(r.cost_pusd),
                "started_at": r.started_at.isoformat(),
                "finished_at": None if r.finished_at is None else r.finished_at.isoformat(),
                "key_prefix": r.key_prefix,
            }
            for r in latest
        ],
        "budget": {
            "limit_usd": _usd(report.budget.limit_pusd),
            "spent_usd": metering.format_usd(report.budget.spent_pusd),
            "reserved_usd": metering.format_usd(report.budget.reserved_pusd),
        },
        "pending_requests": report.pending,
    }


async def _key(request: Request) -> ApiKey:
    if get_state(request).db is None:
        raise APIError(404, "Usage is only recorded by a metered server (this one runs with --no-auth).")
    return await require_key(request)


@router.get("/v1/usage")
def get_usage(
    request: Request,
    month: str | None = Query(None, description="YYYY-MM (UTC); default this month."),
    recent: int = Query(20, ge=0, le=200, description="How many of the latest requests to list."),
    key: ApiKey = Depends(_key),
) -> dict[str, Any]:
    """The key's tenant's usage: a sync route, so its reads run in the thread pool."""
    db = get_state(request).db
    month = metering.parse_month(month) if month else metering.month_of(metering.utcnow())
    return usage_body(db, key.tenant, month, recent=recent)
