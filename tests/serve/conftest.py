"""Database fixtures: `database` is an upgraded Database on SQLite and on PostgreSQL (each test its own).

PostgreSQL comes from $LMFORGE_TEST_DATABASE_URL (default: the local server CI starts, role `lmforge` with
CREATEDB). Each test gets a fresh database `lmf_<hex>`, dropped afterwards. Without a reachable server the
PostgreSQL cases skip with the reason, unless LMFORGE_REQUIRE_POSTGRES=1 (CI), where they fail.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from lmforge.data.tokenizer import Tokenizer
from lmforge.serve.db import Database, Prepared

DEFAULT_PG_URL = "postgresql+psycopg://lmforge:lmforge@127.0.0.1:5432/postgres"


def _server_url() -> sa.URL:
    url = sa.make_url(os.environ.get("LMFORGE_TEST_DATABASE_URL") or DEFAULT_PG_URL)
    return url.set(drivername="postgresql+psycopg") if url.get_backend_name() != "sqlite" else url


@contextmanager
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for the duration of the block: its URL (password included)."""
    server = _server_url()
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT", pool_size=1)
    name = f"lmf_{secrets.token_hex(6)}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as e:
        admin.dispose()
        reason = f"PostgreSQL at {server.render_as_string(hide_password=True)} unavailable: {e.orig}"
        if os.environ.get("LMFORGE_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        _drop(admin, name)
        admin.dispose()


def _drop(admin: sa.Engine, name: str) -> None:
    # FORCE ends our own leftover sessions; an autovacuum worker (a superuser's) cannot be ended by the
    # non-superuser test role, so the drop is retried until it has moved on. A database left behind is
    # harmless (random name), so the last failure is a warning, not a test error.
    for attempt in range(20):
        try:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        except sa.exc.DBAPIError as e:
            if attempt == 19:
                warnings.warn(f"could not drop test database {name}: {e.orig}", stacklevel=2)
            time.sleep(0.25)


@contextmanager
def open_test_database(kind: str, tmp_path: Path) -> Iterator[Database]:
    """An upgraded Database of `kind` ("sqlite" | "postgres")."""
    if kind == "sqlite":
        db = Database(f"sqlite:///{tmp_path / 'lmforge.db'}")
        db.upgrade()
        try:
            yield db
        finally:
            db.close()
        return
    with pg_url() as url:
        db = Database(url)
        db.upgrade()
        try:
            yield db
        finally:
            db.close()


@pytest.fixture(scope="module")
def tokenizer(smollm2_metadata) -> Tokenizer:
    """SmolLM2's tokenizer (from the GGUF's metadata): what the fake-engine servers tokenise with."""
    return Tokenizer.from_gguf_metadata(smollm2_metadata)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request, tmp_path) -> Iterator[Database]:
    with open_test_database(request.param, tmp_path) as db:
        yield db


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_database_url(request, tmp_path) -> Iterator[str]:
    """The URL of an empty (not upgraded) database, SQLite or PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'lmforge.db'}"
    else:
        with pg_url() as url:
            yield url


def assert_ledger_consistent(db: Database) -> None:
    """The running totals equal the ledger: per (tenant, month of start), spent = the costs of settled rows and
    reserved = the holds of pending rows; settled rows hold nothing; every cost is tokens x the row's prices."""
    from lmforge.serve.db import tenant_months, usage
    from lmforge.serve.metering import month_of

    expected: dict[tuple[int, str], list[int]] = {}
    with db.read() as conn:
        rows = conn.execute(sa.select(usage)).all()
        totals = {
            (r.tenant_id, r.month): [r.spent_pusd, r.reserved_pusd]
            for r in conn.execute(sa.select(tenant_months)).all()
        }
    for r in rows:
        cell = expected.setdefault((r.tenant_id, month_of(r.started_at)), [0, 0])
        if r.status == "pending":
            cell[1] += r.reserved_pusd
            assert r.cost_pusd == 0 and r.finished_at is None
        else:
            cell[0] += r.cost_pusd
            assert r.reserved_pusd == 0 and r.finished_at is not None
            price = r.prompt_tokens * r.input_uusd_per_mtok + r.completion_tokens * r.output_uusd_per_mtok
            assert r.cost_pusd == price, r
    for cell in sorted(set(totals) | set(expected)):  # free requests leave no tenant_months row
        assert totals.get(cell, [0, 0]) == expected.get(cell, [0, 0]), cell


@contextmanager
def recorded_statements(db: Database) -> Iterator[list[tuple[str, str]]]:
    """(thread name, SQL) of every statement `db` runs in the block: SQLAlchemy's, and the request path's raw
    ones (`Database.raw()` with `Prepared` statements, which SQLAlchemy's events do not see)."""
    seen: list[tuple[str, str]] = []
    execute = Prepared.execute

    def raw(self, cur, args):
        seen.append((threading.current_thread().name, self.sql))
        return execute(self, cur, args)

    def event(conn, cursor, statement, parameters, context, executemany):
        seen.append((threading.current_thread().name, statement))

    sa.event.listen(db.engine, "before_cursor_execute", event)
    Prepared.execute = raw
    try:
        yield seen
    finally:
        Prepared.execute = execute
        sa.event.remove(db.engine, "before_cursor_execute", event)
