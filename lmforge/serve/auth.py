"""Tenants and API keys: creating, listing and revoking them, and checking a request's `Authorization` header.

A key is `"lmf-" + secrets.token_urlsafe(32)` (256 random bits), shown once when it is created. The database
keeps only its sha256 (a fast hash is right for a 256-bit random secret, as GitHub and Stripe do: nothing to
brute-force) and its first 12 characters for display. Looking a key up is one indexed equality on the hash, so
no secret is ever compared character by character in Python.

Statuses follow OpenAI's: 401 for a missing, malformed or unknown key; 403 for a revoked or expired one or a
model outside the key's allow-list.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from starlette.requests import Request  # FastAPI's Request; at runtime: the dependencies' signatures need it

from lmforge.errors import UserError
from lmforge.serve.db import Database, api_keys, tenants, utcnow

if TYPE_CHECKING:
    from lmforge.serve.deps import ServerState

KEY_PREFIX = "lmf-"
PREFIX_CHARS = 12
_TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._@-]{0,99}")


class NotFound(UserError):
    """A named tenant or key does not exist (404 over the admin API)."""


class Conflict(UserError):
    """What was to be created exists already (409 over the admin API)."""


@dataclass(frozen=True)
class Tenant:
    id: int
    name: str
    created_at: datetime


@dataclass(frozen=True)
class ApiKey:
    id: int
    tenant_id: int
    tenant: str
    name: str
    prefix: str
    expires_at: datetime | None
    revoked_at: datetime | None
    models: tuple[str, ...] | None  # the allow-list; None = every model
    rpm: int | None  # requests per minute; None = unlimited
    tpm: int | None  # tokens per minute (prompt + max_tokens at admission); None = unlimited
    created_at: datetime | None = None

    def allows(self, model: str) -> bool:
        """`model` is on the allow-list: a name, or a shell-style pattern (`base:*` for a base model's LoRA
        adapters, `llama-*`), matched case-sensitively as model names are."""
        return self.models is None or any(fnmatch.fnmatchcase(model, m) for m in self.models)


class AuthError(Exception):
    """A request the key does not allow: `status` 401 or 403 and OpenAI's `code`."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------------- tenants


def create_tenant(db: Database, name: str) -> Tenant:
    name = name.strip()
    if not _TENANT_NAME.fullmatch(name):
        raise UserError(
            f"invalid tenant name {name!r}: 1-100 characters, letters, digits, space and ._@- "
            "(starting with a letter or digit)"
        )
    with db.write() as conn:
        if conn.execute(sa.select(tenants.c.id).where(tenants.c.name == name)).first() is not None:
            raise Conflict(f"tenant {name!r} already exists")
        created = utcnow()
        tenant_id = conn.execute(
            sa.insert(tenants).values(name=name, created_at=created)
        ).inserted_primary_key[0]
    return Tenant(tenant_id, name, created)


def list_tenants(db: Database) -> list[Tenant]:
    with db.read() as conn:
        rows = conn.execute(sa.select(tenants).order_by(tenants.c.id)).all()
    return [Tenant(r.id, r.name, r.created_at) for r in rows]


def get_tenant(conn: sa.Connection, name: str) -> Tenant:
    """The tenant called `name` (UserError listing the known ones if there is none)."""
    row = conn.execute(sa.select(tenants).where(tenants.c.name == name)).first()
    if row is None:
        known = conn.execute(sa.select(tenants.c.name).order_by(tenants.c.id).limit(10)).scalars().all()
        hint = (
            f"; tenants: {', '.join(known)}"
            if known
            else "; create one with `lmforge admin tenant create NAME`"
        )
        raise NotFound(f"no tenant named {name!r}{hint}")
    return Tenant(row.id, row.name, row.created_at)


# ---------------------------------------------------------------------------------------------------- keys

_KEY_COLUMNS = (
    api_keys.c.id,
    api_keys.c.tenant_id,
    tenants.c.name.label("tenant"),
    api_keys.c.name,
    api_keys.c.prefix,
    api_keys.c.expires_at,
    api_keys.c.revoked_at,
    api_keys.c.models,
    api_keys.c.rpm,
    api_keys.c.tpm,
    api_keys.c.created_at,
)


def _select_keys() -> sa.Select:
    return sa.select(*_KEY_COLUMNS).join(tenants, tenants.c.id == api_keys.c.tenant_id)


# built once: authenticate runs for every request, and building a statement costs more than running it
_BY_HASH = _select_keys().where(api_keys.c.key_hash == sa.bindparam("p_hash", type_=sa.String))


def _key(row: Any) -> ApiKey:
    return ApiKey(
        id=row.id,
        tenant_id=row.tenant_id,
        tenant=row.tenant,
        name=row.name,
        prefix=row.prefix,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        models=None if row.models is None else tuple(row.models),
        rpm=row.rpm,
        tpm=row.tpm,
        created_at=row.created_at,
    )


def create_key(
    db: Database,
    tenant: str,
    *,
    name: str = "",
    expires_at: datetime | None = None,
    models: list[str] | tuple[str, ...] | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
) -> tuple[ApiKey, str]:
    """A new key for `tenant`: (the key, its secret). The secret is returned here once and stored nowhere."""
    now = utcnow()
    if len(name) > 100:
        raise UserError(f"a key name has at most 100 characters, got {len(name)}")
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise UserError("the expiry needs a timezone (UTC is assumed for a bare date)")
        if expires_at <= now:
            raise UserError(f"the expiry {expires_at.isoformat()} is in the past")
    for label, limit in (("rpm", rpm), ("tpm", tpm)):
        if limit is not None and not 1 <= limit <= 2**31 - 1:
            raise UserError(
                f"{label} must be between 1 and {2**31 - 1} (leave it out for no limit), got {limit}"
            )
    if models is not None:
        models = [m.strip() for m in models]
        if not models or not all(models):
            raise UserError("the model allow-list needs at least one non-empty model name")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    with db.write() as conn:
        owner = get_tenant(conn, tenant)
        key_id = conn.execute(
            sa.insert(api_keys).values(
                tenant_id=owner.id,
                name=name,
                prefix=secret[:PREFIX_CHARS],
                key_hash=hash_secret(secret),
                created_at=now,
                expires_at=expires_at,
                models=None if models is None else list(dict.fromkeys(models)),
                rpm=rpm,
                tpm=tpm,
            )
        ).inserted_primary_key[0]
        key = _key(conn.execute(_select_keys().where(api_keys.c.id == key_id)).one())
    return key, secret


def list_keys(db: Database, tenant: str | None = None) -> list[ApiKey]:
    with db.read() as conn:
        query = _select_keys().order_by(api_keys.c.id)
        if tenant is not None:
            query = query.where(api_keys.c.tenant_id == get_tenant(conn, tenant).id)
        return [_key(r) for r in conn.execute(query).all()]


def get_key(db: Database, key_id: int) -> ApiKey:
    with db.read() as conn:
        row = conn.execute(_select_keys().where(api_keys.c.id == key_id)).first()
    if row is None:
        raise NotFound(f"no API key with id {key_id}")
    return _key(row)


def revoke_key(db: Database, key: str) -> ApiKey:
    """Revoke a key named by its id, its 12-character prefix or its whole secret. Revoking twice is a no-op
    (the first revocation time stays)."""
    key = key.strip()
    if key.isdigit():
        where = api_keys.c.id == int(key)
    elif key.startswith(KEY_PREFIX) and len(key) > PREFIX_CHARS:
        where = api_keys.c.key_hash == hash_secret(key)
    elif key:
        where = api_keys.c.prefix == key
    else:
        raise UserError("name the key to revoke by its id or prefix")
    with db.write() as conn:
        rows = conn.execute(_select_keys().where(where)).all()
        if not rows:
            raise NotFound(f"no API key with id or prefix {key!r}; see `lmforge admin key list`")
        if len(rows) > 1:
            ids = ", ".join(str(r.id) for r in rows)
            raise UserError(f"the prefix {key!r} matches several keys (ids {ids}); revoke by id")
        row = rows[0]
        if row.revoked_at is None:
            conn.execute(sa.update(api_keys).where(api_keys.c.id == row.id).values(revoked_at=utcnow()))
        return _key(conn.execute(_select_keys().where(api_keys.c.id == row.id)).one())


# ---------------------------------------------------------------------------------------- request checks


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def _shown(secret: str) -> str:
    return secret if len(secret) <= 8 else f"{secret[:4]}{'*' * 8}{secret[-4:]}"


def authenticate(db: Database, authorization: str | None, *, now: datetime | None = None) -> ApiKey:
    """The key an `Authorization: Bearer <secret>` header names (one indexed read), or AuthError."""
    secret = _bearer(authorization)
    if secret is None:
        raise AuthError(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            "invalid_api_key",
        )
    with db.raw(transaction=False) as cur:  # one statement: no transaction needed
        row = db.prepared(_BY_HASH).first(cur, {"p_hash": hash_secret(secret)})
    if row is None:
        raise AuthError(401, f"Incorrect API key provided: {_shown(secret)}.", "invalid_api_key")
    key = _key(row)
    check_live(key, now or utcnow())
    return key


def check_live(key: ApiKey, now: datetime) -> None:
    """AuthError 403 for a key revoked or expired at `now`."""
    if key.revoked_at is not None and key.revoked_at <= now:
        raise revoked(key)
    if key.expires_at is not None and key.expires_at <= now:
        raise AuthError(
            403, f"The API key {key.prefix}... expired at {key.expires_at.isoformat()}.", "key_expired"
        )


def revoked(key: ApiKey) -> AuthError:
    return AuthError(403, f"The API key {key.prefix}... has been revoked.", "key_revoked")


class KeyCache:
    """This process's keys by their `Authorization` header, for the routes that admit their request through
    `metering.admit`: a cached key costs no database round trip. That is exact because a key never changes
    after creation except by being revoked, and admit re-checks revocation in its own statement (expiry is
    checked on every request against the cached key). Bounded by clearing it when full; used from the event
    loop only."""

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._keys: dict[str, ApiKey] = {}

    @staticmethod
    def _hash(authorization: str | None) -> str | None:
        secret = _bearer(authorization)
        return None if secret is None else hash_secret(secret)

    def get(self, authorization: str | None) -> ApiKey | None:
        digest = self._hash(authorization)
        return None if digest is None else self._keys.get(digest)

    def put(self, authorization: str | None, key: ApiKey) -> None:
        digest = self._hash(authorization)
        if digest is not None:
            if len(self._keys) >= self.size:
                self._keys.clear()
            self._keys[digest] = key

    def discard(self, authorization: str | None) -> None:
        digest = self._hash(authorization)
        if digest is not None:
            self._keys.pop(digest, None)


def check_model(key: ApiKey, model: str) -> None:
    if not key.allows(model):
        raise AuthError(
            403,
            f"The API key {key.prefix}... may not use the model '{model}' "
            f"(allowed: {', '.join(key.models)}).",
            "model_not_allowed",
        )


# ------------------------------------------------------------------------------------ FastAPI dependencies


def api_error(exc: AuthError) -> Exception:
    """`exc` as the server's OpenAI-shaped APIError."""
    from lmforge.serve.errors import APIError

    kind = "invalid_request_error" if exc.status == 401 else "permission_error"
    return APIError(exc.status, exc.message, type=kind, code=exc.code)


async def require_key(request: Request) -> ApiKey | None:
    """The request's API key (401/403 otherwise), read from the database; None on an open server (no
    database). The read runs on the app's ledger thread, with the rest of the request path's database work
    (`serve.ledger`). The key is left in `request.state.api_key`, where the app's RateLimitHeaders middleware
    finds it to add the x-ratelimit-* headers to the response."""
    return await _require_key(request, cached=False)


async def require_admitted_key(request: Request) -> ApiKey | None:
    """`require_key` for the routes that admit their request (`metering.admit`, which re-checks revocation):
    the key comes from the process's KeyCache when it is there."""
    return await _require_key(request, cached=True)


async def _require_key(request: Request, *, cached: bool) -> ApiKey | None:
    from lmforge.serve.deps import get_state

    state = get_state(request)
    if state.db is None:
        request.state.api_key = None
        return None
    header = request.headers.get("authorization")
    key = state.keys.get(header) if cached else None
    try:
        if key is None:
            key = await state.ledger.run(partial(authenticate, state.db, header))
            state.keys.put(header, key)
        else:
            check_live(key, utcnow())
    except AuthError as e:
        raise refused(state, request, e) from None
    request.state.api_key = key
    return key


def refused(state: ServerState, request: Request, exc: AuthError) -> Exception:
    """The API error for a request whose key was refused (at authentication, or by admit for a key cached
    before it was revoked): the key leaves the process's cache, and the response gets no x-ratelimit-* headers."""
    state.keys.discard(request.headers.get("authorization"))
    request.state.api_key = None
    return api_error(exc)


def require_admin(request: Request) -> None:
    """Allow the request only with `Authorization: Bearer <admin token>`; without a configured token the admin
    API does not exist (404), so an operator cannot leave it open by accident."""
    from lmforge.serve.deps import get_state
    from lmforge.serve.errors import APIError

    state = get_state(request)
    expected = state.settings.admin_token
    if not expected or state.db is None:
        raise APIError(404, "The admin API is not enabled on this server.", code="not_found")
    token = _bearer(request.headers.get("authorization"))
    if token is None or not hmac.compare_digest(token.encode("utf-8"), expected.encode("utf-8")):
        raise APIError(401, "A valid admin token is required.", code="invalid_admin_token")
