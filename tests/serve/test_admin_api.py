"""The admin API (/admin/v1) and the tenant's GET /v1/usage over real HTTP (uvicorn on 127.0.0.1), with the
fake engine and a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from lmforge.data.tokenizer import Tokenizer
from lmforge.serve import auth, metering
from lmforge.serve.app import create_app
from lmforge.serve.db import Database
from lmforge.serve.settings import Settings
from tests.serve.fake_engine import FakeEngine
from tests.serve.servers import bearer, serving_app

TOKEN = "admin-token-0123456789"
T0 = datetime(2026, 11, 10, 12, 0, tzinfo=UTC)


@contextmanager
def serving(tokenizer: Tokenizer, db: Database | None, admin_token: str | None = TOKEN) -> Iterator[str]:
    settings = Settings(model_name="m", admin_token=admin_token)
    with serving_app(create_app(settings, FakeEngine(), tokenizer, db=db)) as url:
        yield url


@pytest.fixture
def base_url(database, tokenizer) -> Iterator[str]:
    with serving(tokenizer, database) as url:
        yield url


@pytest.fixture
def admin(base_url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers=bearer(TOKEN), timeout=30) as client:
        yield client


def assert_error(response: httpx.Response, status: int, code: str | None = None, needle: str = "") -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code, error
    assert needle in error["message"], error["message"]


ADMIN_CALLS = [
    ("GET", "/admin/v1/tenants", None),
    ("POST", "/admin/v1/tenants", {"name": "evil"}),
    ("GET", "/admin/v1/keys", None),
    ("POST", "/admin/v1/keys", {"tenant": "acme"}),
    ("POST", "/admin/v1/keys/1/revoke", None),
    ("GET", "/admin/v1/prices", None),
    ("PUT", "/admin/v1/prices", {"model": "m", "input_usd": "0", "output_usd": "0"}),
    ("GET", "/admin/v1/budgets", None),
    ("PUT", "/admin/v1/budgets", {"tenant": "acme", "usd": "1000"}),
    ("GET", "/admin/v1/usage?tenant=acme&month=2026-11", None),
    ("GET", "/admin/v1/usage?tenant=acme&month=2026-11&format=csv", None),
]


def test_admin_token_is_required(database, base_url):
    auth.create_tenant(database, "acme")
    key, secret = auth.create_key(database, "acme")
    wrong = [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": TOKEN},  # no scheme
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {secret}"},  # an API key is not the admin token
    ]
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for method, path, body in ADMIN_CALLS:
            for headers in wrong:
                r = client.request(method, path, json=body, headers=headers)
                assert_error(r, 401, "invalid_admin_token", "admin token")
    # nothing happened
    assert [t.name for t in auth.list_tenants(database)] == ["acme"]
    assert [(k.id, k.revoked_at) for k in auth.list_keys(database)] == [(key.id, None)]
    assert metering.list_prices(database) == [] and metering.list_budgets(database) == []


def test_no_admin_api_without_a_token_or_a_database(database, tokenizer):
    with serving(tokenizer, database, admin_token=None) as url:
        for headers in ({}, {"Authorization": "Bearer anything"}):
            assert_error(httpx.get(f"{url}/admin/v1/tenants", headers=headers), 404, "not_found")
    with serving(tokenizer, None) as url:  # an open server: no admin API, no usage
        assert_error(httpx.get(f"{url}/admin/v1/tenants", headers=bearer(TOKEN)), 404)
        assert_error(httpx.get(f"{url}/v1/usage"), 404, needle="metered server")


def test_admin_operations(database, admin, base_url):
    r = admin.post("/admin/v1/tenants", json={"name": "acme"})
    assert r.status_code == 201 and r.json()["name"] == "acme" and r.json()["id"] == 1
    admin.post("/admin/v1/tenants", json={"name": "globex"}).raise_for_status()
    assert_error(admin.post("/admin/v1/tenants", json={"name": "acme"}), 409, "conflict", "already exists")
    assert_error(
        admin.post("/admin/v1/tenants", json={"name": "a/b"}), 400, "invalid_value", "invalid tenant"
    )
    assert_error(admin.post("/admin/v1/tenants", json={"name": "x", "plan": "gold"}), 400)  # unknown field
    assert [t["name"] for t in admin.get("/admin/v1/tenants").json()["data"]] == ["acme", "globex"]

    r = admin.post(
        "/admin/v1/keys",
        json={
            "tenant": "acme",
            "name": "web",
            "expires_at": "2099-12-31",
            "models": ["m"],
            "rpm": 5,
            "tpm": 900,
        },
    )
    assert r.status_code == 201
    created = r.json()
    secret = created.pop("secret")
    assert secret.startswith("lmf-") and created["prefix"] == secret[:12]
    assert {
        k: created[k] for k in ("tenant", "name", "expires_at", "models", "rpm", "tpm", "revoked_at")
    } == {
        "tenant": "acme",
        "name": "web",
        "expires_at": "2100-01-01T00:00:00+00:00",
        "models": ["m"],
        "rpm": 5,
        "tpm": 900,
        "revoked_at": None,
    }
    assert auth.authenticate(database, f"Bearer {secret}").id == created["id"]
    admin.post("/admin/v1/keys", json={"tenant": "globex"}).raise_for_status()
    listed = admin.get("/admin/v1/keys", params={"tenant": "acme"}).json()["data"]
    assert listed == [created]  # the secret is never listed
    assert (
        secret not in admin.get("/admin/v1/keys").text
        and len(admin.get("/admin/v1/keys").json()["data"]) == 2
    )
    assert_error(
        admin.get("/admin/v1/keys", params={"tenant": "nope"}), 404, "not_found", "no tenant named 'nope'"
    )
    assert_error(admin.post("/admin/v1/keys", json={"tenant": "nope"}), 404, "not_found")
    assert_error(
        admin.post("/admin/v1/keys", json={"tenant": "acme", "rpm": 0}),
        400,
        needle="rpm must be between 1 and",
    )
    assert_error(admin.post("/admin/v1/keys", json={"tenant": "acme", "expires_at": "2001-01-01"}), 400)

    with httpx.Client(base_url=base_url, headers=bearer(secret)) as tenant_client:
        assert tenant_client.get("/v1/usage").status_code == 200
        r = admin.post(f"/admin/v1/keys/{created['id']}/revoke")
        assert r.status_code == 200 and r.json()["revoked_at"] is not None
        assert_error(tenant_client.get("/v1/usage"), 403, "key_revoked")
    assert admin.post(f"/admin/v1/keys/{secret[:12]}/revoke").json()["revoked_at"] == r.json()["revoked_at"]
    assert_error(admin.post("/admin/v1/keys/999/revoke"), 404, "not_found")

    r = admin.put("/admin/v1/prices", json={"model": "m", "input_usd": "0.15", "output_usd": 0.6})
    assert r.status_code == 200
    assert (r.json()["input_usd_per_mtok"], r.json()["output_usd_per_mtok"]) == ("0.15", "0.60")
    later = {"model": "m", "input_usd": 1, "output_usd": "2", "effective_from": "2099-01-01"}
    assert admin.put("/admin/v1/prices", json=later).json()["effective_from"] == "2099-01-01T00:00:00+00:00"
    assert [p["input_usd_per_mtok"] for p in admin.get("/admin/v1/prices").json()["data"]] == ["0.15", "1.00"]
    bad = {"model": "m", "input_usd": "0.1234567", "output_usd": "1"}
    assert_error(admin.put("/admin/v1/prices", json=bad), 400, "invalid_value", "more than 6 decimal places")
    assert_error(
        admin.put("/admin/v1/prices", json=bad | {"input_usd": -1}), 400, needle="cannot be negative"
    )

    r = admin.put("/admin/v1/budgets", json={"tenant": "acme", "usd": "25", "month": "2026-11"})
    assert r.json() == {
        "object": "budget",
        "tenant": "acme",
        "month": "2026-11",
        "limit_usd": "25.00",
        "spent_usd": "0.00",
        "reserved_usd": "0.00",
    }
    assert_error(admin.put("/admin/v1/budgets", json={"tenant": "acme", "usd": 1, "month": "2026-13"}), 400)
    assert_error(admin.put("/admin/v1/budgets", json={"tenant": "nope", "usd": 1}), 404)
    assert [b["tenant"] for b in admin.get("/admin/v1/budgets").json()["data"]] == ["acme"]
    assert admin.get("/admin/v1/budgets", params={"tenant": "globex"}).json()["data"] == []


def _ledger(database):
    """acme: two requests on m in November (one cancelled), one on free; globex: one (must never leak)."""
    auth.create_tenant(database, "acme")
    auth.create_tenant(database, "globex")
    ka, sa_ = auth.create_key(database, "acme", rpm=100)
    kb, sb = auth.create_key(database, "globex")
    metering.set_price(database, "m", input_usd="0.15", output_usd="0.6", now=T0 - timedelta(days=30))
    metering.set_budget(database, "acme", "25", month="2026-11")
    plan = [
        ("acme-1", ka, "m", T0, 1000, 200, "completed"),
        ("acme-2", ka, "m", T0 + timedelta(days=1), 500, 100, "cancelled"),
        ("acme-3", ka, "free", T0 + timedelta(days=1, hours=1), 3, 4, "completed"),
        ("globex-secret-request", kb, "m", T0, 777, 888, "completed"),
    ]
    for rid, key, model, when, p, c, status in plan:
        a = metering.admit(
            database, key, model, request_id=rid, prompt_tokens=p, max_completion_tokens=c, instance_id="x",
            now=when,
        )  # fmt: skip
        metering.settle(database, a, prompt_tokens=p, completion_tokens=c, status=status, now=when)
    return sa_, sb


def test_tenant_usage_shows_only_the_callers_tenant(database, base_url):
    secret_a, secret_b = _ledger(database)
    with httpx.Client(base_url=base_url, headers=bearer(secret_a)) as client:
        r = client.get("/v1/usage", params={"month": "2026-11"})
        assert r.status_code == 200
        body = r.json()
        # a parameter naming another tenant is ignored: the key decides
        for params in ({"month": "2026-11", "tenant": "globex"}, {"month": "2026-11", "tenant_id": 2}):
            assert client.get("/v1/usage", params=params).json() == body
        assert r.headers["x-ratelimit-limit-requests"] == "100"
    assert "globex" not in r.text and "777" not in r.text and "888" not in r.text
    m_cost = 1500 * 150_000 + 300 * 600_000  # $0.000405
    assert body["tenant"] == "acme" and body["month"] == "2026-11"
    assert body["models"] == [
        {"model": "free", "requests": 1, "prompt_tokens": 3, "completion_tokens": 4, "cost_usd": "0.00"},
        {
            "model": "m",
            "requests": 2,
            "prompt_tokens": 1500,
            "completion_tokens": 300,
            "cost_usd": "0.000405",
        },
    ]
    assert body["totals"] == {
        "requests": 3,
        "prompt_tokens": 1503,
        "completion_tokens": 304,
        "cost_usd": "0.000405",
    }
    assert metering.format_usd(m_cost) == "0.000405"
    assert len(body["daily"]) == 30
    days = {d["date"]: d for d in body["daily"] if d["requests"]}
    assert days == {
        "2026-11-10": {"date": "2026-11-10", "requests": 1, "tokens": 1200, "cost_usd": "0.00027"},
        "2026-11-11": {"date": "2026-11-11", "requests": 2, "tokens": 607, "cost_usd": "0.000135"},
    }
    assert [x["request_id"] for x in body["recent"]] == ["acme-3", "acme-2", "acme-1"]
    assert body["recent"][1] == {
        "request_id": "acme-2",
        "model": "m",
        "status": "cancelled",
        "prompt_tokens": 500,
        "completion_tokens": 100,
        "cost_usd": "0.000135",
        "started_at": "2026-11-11T12:00:00+00:00",
        "finished_at": "2026-11-11T12:00:00+00:00",
        "key_prefix": secret_a[:12],
    }
    assert body["budget"] == {"limit_usd": "25.00", "spent_usd": "0.000405", "reserved_usd": "0.00"}
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {secret_b}"}) as client:
        other = client.get("/v1/usage", params={"month": "2026-11"}).json()
    assert other["tenant"] == "globex" and [x["request_id"] for x in other["recent"]] == [
        "globex-secret-request"
    ]
    assert "acme" not in str(other)
    # this month (the default) has nothing yet; other months are reachable but empty
    with httpx.Client(base_url=base_url, headers=bearer(secret_a)) as client:
        now = client.get("/v1/usage").json()
        assert now["month"] == metering.month_of(datetime.now(UTC))
        assert client.get("/v1/usage", params={"month": "2026-10"}).json()["totals"]["requests"] == 0
        assert_error(client.get("/v1/usage", params={"month": "2026-13"}), 400, needle="a month is YYYY-MM")
        assert_error(client.get("/v1/usage", params={"recent": 10_000}), 400)


def test_usage_needs_a_valid_key(database, base_url):
    _ledger(database)
    for headers in ({}, {"Authorization": "Bearer lmf-wrong"}, {"Authorization": f"Bearer {TOKEN}"}):
        assert_error(httpx.get(f"{base_url}/v1/usage", headers=headers), 401, "invalid_api_key")


def test_admin_usage_json_and_csv(database, admin, base_url):
    secret_a, _ = _ledger(database)
    r = admin.get("/admin/v1/usage", params={"tenant": "acme", "month": "2026-11", "format": "csv"})
    assert r.status_code == 200 and r.headers["content-type"] == "text/csv; charset=utf-8"
    assert r.text == (
        "tenant,month,model,requests,prompt_tokens,completion_tokens,cost_usd\n"
        "acme,2026-11,free,1,3,4,0.00\n"
        "acme,2026-11,m,2,1500,300,0.000405\n"
        "acme,2026-11,total,3,1503,304,0.000405\n"
    )
    as_admin = admin.get("/admin/v1/usage", params={"tenant": "acme", "month": "2026-11"}).json()
    with httpx.Client(base_url=base_url, headers=bearer(secret_a)) as client:
        assert as_admin == client.get("/v1/usage", params={"month": "2026-11"}).json()
    globex = admin.get(
        "/admin/v1/usage", params={"tenant": "globex", "month": "2026-11", "format": "csv"}
    ).text
    assert globex.splitlines()[-1] == "globex,2026-11,total,1,777,888,0.00064935"
    assert_error(admin.get("/admin/v1/usage", params={"tenant": "nope", "month": "2026-11"}), 404)
    assert_error(admin.get("/admin/v1/usage", params={"tenant": "acme", "month": "11-2026"}), 400)
    assert_error(admin.get("/admin/v1/usage", params={"tenant": "acme", "format": "xml"}), 400)
    assert_error(admin.get("/admin/v1/usage"), 400)  # tenant is required
