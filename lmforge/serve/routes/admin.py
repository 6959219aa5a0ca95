"""The admin HTTP API under /admin/v1: what `lmforge admin` does, for the web console and for scripts.

Every route needs `Authorization: Bearer <admin token>` (401 otherwise); a server started without an admin
token has no admin API (404). Errors are OpenAI-shaped like the rest of the server: 400 for bad input, 404 for an
unknown tenant or key, 409 for a tenant that exists. Money goes in as decimal dollars (a string such as "0.15",
or a JSON number) and comes out as exact decimal strings. Routes are sync: FastAPI runs them in its thread pool,
so the database work never blocks the event loop.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from lmforge.errors import UserError
from lmforge.serve import auth, metering
from lmforge.serve.auth import ApiKey, Conflict, NotFound, require_admin
from lmforge.serve.db import Database
from lmforge.serve.deps import get_state
from lmforge.serve.errors import APIError
from lmforge.serve.routes.usage import usage_body

router = APIRouter(prefix="/admin/v1", dependencies=[Depends(require_admin)])

Money = str | int | float


class TenantIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant: str
    name: str = ""
    expires_at: str | None = Field(
        None, description="YYYY-MM-DD (the key works through that day, UTC) or ISO"
    )
    models: list[str] | None = None
    rpm: int | None = None
    tpm: int | None = None


class PriceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    input_usd: Money = Field(description="Dollars per million prompt tokens.")
    output_usd: Money = Field(description="Dollars per million completion tokens.")
    effective_from: str | None = None


class BudgetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant: str
    usd: Money
    month: str | None = None


def _db(request: Request) -> Database:
    db = get_state(request).db
    assert db is not None  # require_admin answers 404 on a server without a database
    return db


def _call(fn, *args, **kwargs):
    """Run an admin operation, its user errors as HTTP statuses."""
    try:
        return fn(*args, **kwargs)
    except NotFound as e:
        raise APIError(404, str(e), code="not_found") from None
    except Conflict as e:
        raise APIError(409, str(e), code="conflict") from None
    except UserError as e:
        raise APIError(400, str(e), code="invalid_value") from None


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _listing(data: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": data}


def _tenant(t: auth.Tenant) -> dict[str, Any]:
    return {"object": "tenant", "id": t.id, "name": t.name, "created_at": _time(t.created_at)}


def _key(k: ApiKey) -> dict[str, Any]:
    return {
        "object": "api_key",
        "id": k.id,
        "tenant": k.tenant,
        "name": k.name,
        "prefix": k.prefix,
        "created_at": _time(k.created_at),
        "expires_at": _time(k.expires_at),
        "revoked_at": _time(k.revoked_at),
        "models": None if k.models is None else list(k.models),
        "rpm": k.rpm,
        "tpm": k.tpm,
    }


def _price(p: metering.Price) -> dict[str, Any]:
    return {
        "object": "price",
        "model": p.model,
        "effective_from": _time(p.effective_from),
        "input_usd_per_mtok": metering.format_price(p.input_uusd_per_mtok),
        "output_usd_per_mtok": metering.format_price(p.output_uusd_per_mtok),
    }


def _budget(b: metering.Budget) -> dict[str, Any]:
    return {
        "object": "budget",
        "tenant": b.tenant,
        "month": b.month,
        "limit_usd": None if b.limit_pusd is None else metering.format_usd(b.limit_pusd),
        "spent_usd": metering.format_usd(b.spent_pusd),
        "reserved_usd": metering.format_usd(b.reserved_pusd),
    }


@router.get("/tenants")
def list_tenants(request: Request) -> dict[str, Any]:
    return _listing([_tenant(t) for t in auth.list_tenants(_db(request))])


@router.post("/tenants", status_code=201)
def create_tenant(body: TenantIn, request: Request) -> dict[str, Any]:
    return _tenant(_call(auth.create_tenant, _db(request), body.name))


@router.get("/keys")
def list_keys(request: Request, tenant: str | None = Query(None)) -> dict[str, Any]:
    return _listing([_key(k) for k in _call(auth.list_keys, _db(request), tenant)])


@router.post("/keys", status_code=201)
def create_key(body: KeyIn, request: Request) -> dict[str, Any]:
    """A new key; the response carries its `secret`, shown this once and stored nowhere."""

    def create() -> tuple[ApiKey, str]:
        expires = None
        if body.expires_at is not None:
            expires = metering.parse_when(body.expires_at, what="expires_at", end_of_day=True)
        return auth.create_key(
            _db(request), body.tenant, name=body.name, expires_at=expires, models=body.models, rpm=body.rpm,
            tpm=body.tpm,
        )  # fmt: skip

    key, secret = _call(create)
    return _key(key) | {"secret": secret}


@router.post("/keys/{key}/revoke")
def revoke_key(key: str, request: Request) -> dict[str, Any]:
    """Revoke a key by id or prefix; revoking twice is harmless."""
    return _key(_call(auth.revoke_key, _db(request), key))


@router.get("/prices")
def list_prices(request: Request, model: str | None = Query(None)) -> dict[str, Any]:
    return _listing([_price(p) for p in metering.list_prices(_db(request), model)])


@router.put("/prices")
def set_price(body: PriceIn, request: Request) -> dict[str, Any]:
    def put() -> metering.Price:
        when = None
        if body.effective_from is not None:
            when = metering.parse_when(body.effective_from, what="effective_from")
        return metering.set_price(
            _db(request), body.model, input_usd=str(body.input_usd), output_usd=str(body.output_usd),
            effective_from=when,
        )  # fmt: skip

    return _price(_call(put))


@router.get("/budgets")
def list_budgets(request: Request, tenant: str | None = Query(None)) -> dict[str, Any]:
    return _listing([_budget(b) for b in _call(metering.list_budgets, _db(request), tenant)])


@router.put("/budgets")
def set_budget(body: BudgetIn, request: Request) -> dict[str, Any]:
    return _budget(_call(metering.set_budget, _db(request), body.tenant, str(body.usd), month=body.month))


@router.get("/usage", response_model=None)
def get_usage(
    request: Request,
    tenant: str = Query(...),
    month: str | None = Query(None, description="YYYY-MM (UTC); default this month."),
    format: str = Query("json", pattern="^(json|csv)$"),
) -> Response | dict[str, Any]:
    """Any tenant's usage in a month, as the tenant sees it at /v1/usage, or as invoice CSV."""
    db = _db(request)
    month = _call(metering.parse_month, month) if month else metering.month_of(metering.utcnow())
    if format == "csv":
        report = _call(metering.usage_report, db, tenant, month)
        return Response(
            metering.usage_csv(report),
            media_type="text/csv; charset=utf-8",
            headers={"content-disposition": f'attachment; filename="usage-{month}.csv"'},
        )
    return JSONResponse(_call(usage_body, db, tenant, month))
