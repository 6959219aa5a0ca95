"""Tenants and API keys on SQLite and PostgreSQL: hashing, lookup, expiry, revocation, allow-lists."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from lmforge.errors import UserError
from lmforge.serve import auth
from lmforge.serve.auth import AuthError
from lmforge.serve.db import api_keys, metadata, utcnow


def _all_text(database) -> str:
    """Every value of every row of every table, as one string."""
    parts = []
    with database.read() as conn:
        for table in metadata.sorted_tables:
            for row in conn.execute(sa.select(table)).all():
                parts.extend(str(v) for v in row)
    return "\n".join(parts)


def test_secret_is_shown_once_and_never_stored(database, tmp_path):
    auth.create_tenant(database, "acme")
    key, secret = auth.create_key(database, "acme", name="ci", models=["m1", "m2"], rpm=60, tpm=10_000)
    assert secret.startswith("lmf-") and len(secret) == 4 + 43  # token_urlsafe(32): 43 characters
    assert key.prefix == secret[:12] and key.tenant == "acme" and key.name == "ci"
    assert key.models == ("m1", "m2") and key.rpm == 60 and key.tpm == 10_000
    assert key.expires_at is None and key.revoked_at is None
    with database.read() as conn:
        stored = conn.execute(sa.select(api_keys.c.key_hash)).scalar_one()
    assert stored == hashlib.sha256(secret.encode()).hexdigest()
    everything = _all_text(database)
    assert secret not in everything and secret[12:] not in everything and secret[12:30] not in everything
    if database.is_sqlite:  # nor anywhere in the files (WAL included)
        raw = b"".join(p.read_bytes() for p in tmp_path.glob("lmforge.db*"))
        assert secret[12:].encode() not in raw and secret[4:12].encode() in raw
    _, other = auth.create_key(database, "acme")
    assert other != secret


def test_authenticate(database):
    auth.create_tenant(database, "acme")
    key, secret = auth.create_key(database, "acme")
    assert auth.authenticate(database, f"Bearer {secret}") == key
    assert auth.authenticate(database, f"bearer   {secret}  ") == key  # scheme case, spacing


@pytest.mark.parametrize(
    "header, fragment",
    [
        (None, "You didn't provide an API key"),
        ("", "You didn't provide an API key"),
        ("Bearer", "You didn't provide an API key"),
        ("Basic dXNlcjpwYXNz", "You didn't provide an API key"),
        ("Bearer lmf-not-a-real-key-at-all", "Incorrect API key provided: lmf-********-all."),
    ],
)
def test_missing_malformed_unknown_key_is_401(database, header, fragment):
    auth.create_tenant(database, "acme")
    auth.create_key(database, "acme")
    with pytest.raises(AuthError) as e:
        auth.authenticate(database, header)
    assert (e.value.status, e.value.code) == (401, "invalid_api_key")
    assert fragment in e.value.message


def test_a_key_of_one_character_less_is_unknown(database):
    auth.create_tenant(database, "acme")
    _, secret = auth.create_key(database, "acme")
    for wrong in (secret[:-1], secret + "x", secret.upper()):
        with pytest.raises(AuthError) as e:
            auth.authenticate(database, f"Bearer {wrong}")
        assert e.value.status == 401


def test_expired_key_is_403(database):
    auth.create_tenant(database, "acme")
    expires = utcnow() + timedelta(days=1)
    key, secret = auth.create_key(database, "acme", expires_at=expires)
    assert key.expires_at == expires
    assert (
        auth.authenticate(database, f"Bearer {secret}", now=expires - timedelta(microseconds=1)).id == key.id
    )
    for now in (expires, expires + timedelta(days=30)):
        with pytest.raises(AuthError) as e:
            auth.authenticate(database, f"Bearer {secret}", now=now)
        assert (e.value.status, e.value.code) == (403, "key_expired")
        assert key.prefix in e.value.message and secret[12:] not in e.value.message


def test_revocation_by_id_prefix_or_secret(database):
    auth.create_tenant(database, "acme")
    keys = [auth.create_key(database, "acme", name=f"k{i}") for i in range(3)]
    (k0, s0), (k1, s1), (k2, s2) = keys
    revoked = auth.revoke_key(database, str(k0.id))
    assert revoked.id == k0.id and revoked.revoked_at is not None
    assert auth.revoke_key(database, k1.prefix).id == k1.id
    assert auth.revoke_key(database, s2).id == k2.id
    for secret in (s0, s1, s2):
        with pytest.raises(AuthError) as e:
            auth.authenticate(database, f"Bearer {secret}")
        assert (e.value.status, e.value.code) == (403, "key_revoked")
    again = auth.revoke_key(database, str(k0.id))  # idempotent: the first revocation time stays
    assert again.revoked_at == revoked.revoked_at
    with pytest.raises(UserError, match="no API key with id or prefix '999'"):
        auth.revoke_key(database, "999")
    with pytest.raises(UserError, match="no API key with id or prefix 'lmf-nothing1'"):
        auth.revoke_key(database, "lmf-nothing1")


def test_ambiguous_prefix_is_refused(database):
    auth.create_tenant(database, "acme")
    k0, _ = auth.create_key(database, "acme")
    k1, _ = auth.create_key(database, "acme")
    with database.write() as conn:  # a 48-bit prefix collision, forced
        conn.execute(sa.update(api_keys).where(api_keys.c.id == k1.id).values(prefix=k0.prefix))
    with pytest.raises(UserError, match=f"matches several keys \\(ids {k0.id}, {k1.id}\\); revoke by id"):
        auth.revoke_key(database, k0.prefix)


def test_model_allow_list(database):
    auth.create_tenant(database, "acme")
    limited, _ = auth.create_key(database, "acme", models=["small", "large", "small"])
    open_key, _ = auth.create_key(database, "acme")
    assert limited.models == ("small", "large")  # duplicates dropped, order kept
    auth.check_model(limited, "small")
    auth.check_model(open_key, "anything")
    with pytest.raises(AuthError) as e:
        auth.check_model(limited, "medium")
    assert (e.value.status, e.value.code) == (403, "model_not_allowed")
    assert "'medium'" in e.value.message and "small, large" in e.value.message


def test_allow_list_patterns(database):
    """Shell-style patterns: a base model's LoRA adapters (`base:*`), a family (`llama-*`); a plain name is
    exact, and matching is case-sensitive like model names."""
    auth.create_tenant(database, "acme")
    key, _ = auth.create_key(database, "acme", models=["smollm2:*", "llama-*", "qwen"])
    allowed = ["smollm2:support", "smollm2:a:b", "llama-70b", "llama-", "qwen"]
    refused = ["smollm2", "smollm2-support", "Llama-70b", "qwen2", "qwen:lora", "xllama-1"]
    assert [m for m in allowed + refused if key.allows(m)] == allowed
    for model in refused:
        with pytest.raises(AuthError, match="may not use the model"):
            auth.check_model(key, model)


def test_tenants_and_listing(database):
    a = auth.create_tenant(database, "acme")
    b = auth.create_tenant(database, " Globex Corp ")
    assert b.name == "Globex Corp" and a.created_at.tzinfo == UTC
    assert [t.name for t in auth.list_tenants(database)] == ["acme", "Globex Corp"]
    with pytest.raises(UserError, match="tenant 'acme' already exists"):
        auth.create_tenant(database, "acme")
    for bad in ("", "   ", "-x", "a/b", "x" * 101):
        with pytest.raises(UserError, match="invalid tenant name"):
            auth.create_tenant(database, bad)
    ka, _ = auth.create_key(database, "acme")
    kb, _ = auth.create_key(database, "Globex Corp")
    assert [k.id for k in auth.list_keys(database)] == [ka.id, kb.id]
    assert [k.id for k in auth.list_keys(database, "Globex Corp")] == [kb.id]
    assert auth.get_key(database, kb.id) == kb
    with pytest.raises(UserError, match="no tenant named 'initech'; tenants: acme, Globex Corp"):
        auth.list_keys(database, "initech")


def test_create_key_validation(database):
    with pytest.raises(
        UserError, match="no tenant named 'acme'; create one with `lmforge admin tenant create"
    ):
        auth.create_key(database, "acme")
    auth.create_tenant(database, "acme")
    with pytest.raises(UserError, match="is in the past"):
        auth.create_key(database, "acme", expires_at=datetime(2020, 1, 1, tzinfo=UTC))
    with pytest.raises(UserError, match="needs a timezone"):
        auth.create_key(database, "acme", expires_at=datetime(2099, 1, 1))
    with pytest.raises(UserError, match="rpm must be between 1 and"):
        auth.create_key(database, "acme", rpm=0)
    with pytest.raises(UserError, match="tpm must be between 1 and"):
        auth.create_key(database, "acme", tpm=-5)
    with pytest.raises(UserError, match="at least one non-empty model name"):
        auth.create_key(database, "acme", models=[])
    assert auth.list_keys(database) == []  # nothing half-created
