"""The database layer: URLs, SQLite connection settings, migrations (vs the table definitions), UTC datetimes."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from lmforge.errors import UserError
from lmforge.serve.db import HEAD_REVISION, Database, database_url, instances, metadata, open_database

TABLES = {
    "tenants",
    "api_keys",
    "prices",
    "budgets",
    "usage",
    "tenant_months",
    "rate_windows",
    "instances",
    "alembic_version",
}


def test_database_url_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("LMFORGE_DATABASE_URL", raising=False)
    assert database_url(None, tmp_path) == f"sqlite:///{tmp_path}/lmforge.db"
    monkeypatch.setenv("LMFORGE_DATABASE_URL", "postgresql://u:p@h/db")
    assert database_url(None, tmp_path) == "postgresql://u:p@h/db"
    assert database_url("sqlite:////x/y.db", tmp_path) == "sqlite:////x/y.db"


def test_urls_are_checked_and_normalised(tmp_path):
    with pytest.raises(UserError, match="cannot parse the database URL"):
        Database("not a url")
    with pytest.raises(UserError, match="unsupported database 'mysql'"):
        Database("mysql://u:p@h/db")
    with pytest.raises(UserError, match="in-memory SQLite"):
        Database("sqlite://")
    with pytest.raises(UserError, match="in-memory SQLite"):
        Database("sqlite:///:memory:")
    pg = Database("postgresql://alice:s3cret@db.example:5432/billing")  # no connection until used
    assert pg.url == "postgresql+psycopg://alice:s3cret@db.example:5432/billing"
    assert pg.display_url == "postgresql+psycopg://alice:***@db.example:5432/billing"
    assert pg.dialect == "postgresql" and not pg.is_sqlite
    pg.close()
    nested = tmp_path / "a" / "b" / "lmforge.db"
    db = Database(f"sqlite:///{nested}")  # the folder is created
    db.upgrade()
    assert nested.is_file() and db.is_sqlite
    db.close()


def test_unreachable_postgres_is_one_line_user_error():
    db = Database("postgresql://nobody:nothing@127.0.0.1:1/none")
    with pytest.raises(UserError, match=r"cannot use the database postgresql\+psycopg://nobody:\*\*\*@") as e:
        db.check()
    assert "\n" not in str(e.value) and "nothing" not in str(e.value)  # the password is never shown


def test_sqlite_connection_settings(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    db.upgrade()
    # every pooled connection, not just the first, gets the settings
    conns = [db.engine.connect() for _ in range(3)]
    try:
        for conn in conns:
            pragma = {
                p: conn.exec_driver_sql(f"PRAGMA {p}").scalar()
                for p in ("journal_mode", "busy_timeout", "foreign_keys", "synchronous")
            }
            assert pragma == {
                "journal_mode": "wal",
                "busy_timeout": 30000,
                "foreign_keys": 1,
                "synchronous": 1,
            }
            conn.rollback()
    finally:
        for conn in conns:
            conn.close()
    db.close()


def test_sqlite_write_transactions_take_the_write_lock_at_begin(tmp_path):
    """BEGIN IMMEDIATE: a second process's writer waits on the busy timeout instead of failing, and a reader
    is never blocked by a writer (WAL)."""
    path = tmp_path / "x.db"
    a, b = Database(f"sqlite:///{path}"), Database(f"sqlite:///{path}")  # two "processes": no shared lock
    a.upgrade()
    now = datetime.now(UTC)
    got_in = threading.Event()
    with a.write() as conn:
        conn.execute(sa.insert(instances).values(id="a", started_at=now, heartbeat_at=now))

        def second_writer() -> None:
            with b.write() as other:  # blocks until the first commits
                got_in.set()
                other.execute(sa.insert(instances).values(id="b", started_at=now, heartbeat_at=now))

        thread = threading.Thread(target=second_writer)
        thread.start()
        assert not got_in.wait(0.3), "BEGIN IMMEDIATE should wait for the other writer's lock"
        with b.read() as reader:  # readers are not blocked, and do not see the uncommitted row
            assert reader.execute(sa.select(sa.func.count()).select_from(instances)).scalar() == 0
    thread.join(10)
    assert got_in.is_set()
    with a.read() as conn:
        assert sorted(conn.execute(sa.select(instances.c.id)).scalars()) == ["a", "b"]
    a.close()
    b.close()


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_upgrade_check_and_migration_matches_tables(kind, tmp_path):
    from tests.serve.conftest import pg_url

    def run(url: str) -> None:
        db = Database(url)
        with pytest.raises(UserError, match=r"has no lmforge tables; run `lmforge db upgrade"):
            db.check()
        assert db.revision() == (None, "0001")
        db.upgrade()
        db.upgrade()  # idempotent
        db.check()
        assert db.revision() == ("0001", "0001")
        assert db.current_revision() == HEAD_REVISION == "0001"  # the fast path agrees with alembic's head
        with db.read() as conn:
            assert set(sa.inspect(conn).get_table_names()) == TABLES
            # the frozen migration creates exactly what the queries' table definitions describe
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
        assert diff == []
        with db.write() as conn:
            conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0000'")
        with pytest.raises(UserError, match=r"is at schema revision 0000, not 0001; run `lmforge db upgrade"):
            db.check()
        db.close()

    if kind == "sqlite":
        run(f"sqlite:///{tmp_path / 'x.db'}")
    else:
        with pg_url() as url:
            run(url)


@pytest.mark.postgres
def test_open_database_upgrades_sqlite_but_not_postgres(tmp_path):
    from tests.serve.conftest import pg_url

    db = open_database(f"sqlite:///{tmp_path / 'x.db'}")
    assert db.revision() == ("0001", "0001")
    db.close()
    with pg_url() as url:
        with pytest.raises(UserError, match="has no lmforge tables; run `lmforge db upgrade"):
            open_database(url)
        Database(url).upgrade()
        db = open_database(url)
        db.check()
        db.close()


def test_datetimes_are_utc_aware_on_both_backends(database):
    plus_two = timezone(timedelta(hours=2))
    started = datetime(2026, 11, 30, 23, 30, 0, 123456, tzinfo=UTC)
    beat = datetime(2026, 12, 1, 3, 0, tzinfo=plus_two)  # 01:00 UTC
    with database.write() as conn:
        conn.execute(sa.insert(instances).values(id="x", started_at=started, heartbeat_at=beat))
    with database.read() as conn:
        row = conn.execute(sa.select(instances)).one()
        # comparisons happen in UTC whatever zone the bound value had
        later = conn.execute(
            sa.select(sa.func.count()).where(
                instances.c.heartbeat_at > datetime(2026, 12, 1, 0, 59, tzinfo=UTC)
            )
        ).scalar()
    assert row.started_at == started and row.started_at.tzinfo == UTC
    assert row.heartbeat_at == datetime(2026, 12, 1, 1, 0, tzinfo=UTC) and row.heartbeat_at.tzinfo == UTC
    assert later == 1
    with pytest.raises(sa.exc.StatementError, match="naive datetime"), database.write() as conn:
        conn.execute(
            sa.insert(instances).values(id="y", started_at=datetime(2026, 1, 1), heartbeat_at=started)
        )


def test_foreign_keys_are_enforced(database):
    from lmforge.serve.db import api_keys

    with pytest.raises(sa.exc.IntegrityError), database.write() as conn:
        conn.execute(
            sa.insert(api_keys).values(
                tenant_id=999, name="", prefix="lmf-x", key_hash="0" * 64, created_at=datetime.now(UTC)
            )
        )


def test_migrations_ship_as_packages():
    """setuptools packages only folders with __init__.py: the runtime needs env.py and the revisions."""
    root = Path(__file__).resolve().parents[2] / "lmforge" / "serve" / "migrations"
    assert (root / "__init__.py").is_file() and (root / "versions" / "__init__.py").is_file()
    assert (root / "env.py").is_file() and list((root / "versions").glob("0001_*.py"))


INSERT_INSTANCE = sa.insert(instances).values(
    id=sa.bindparam("p_id", type_=sa.String),
    started_at=sa.bindparam("p_started", type_=instances.c.started_at.type),
    heartbeat_at=sa.bindparam("p_beat", type_=instances.c.heartbeat_at.type),
)
BEATING_AFTER = sa.select(instances.c.id, instances.c.heartbeat_at).where(
    instances.c.heartbeat_at > sa.bindparam("p_after", type_=instances.c.heartbeat_at.type)
)


def test_raw_statements_store_and_read_values_as_sqlalchemy_does(database):
    """The request path's raw cursors (Database.raw + Prepared) write what SQLAlchemy reads back and read what it
    wrote: UTC datetimes in SQLite's text form, compared in UTC."""
    started = datetime(2026, 11, 30, 23, 30, 0, 123456, tzinfo=UTC)
    beat = datetime(2026, 12, 1, 3, 0, tzinfo=timezone(timedelta(hours=2)))  # 01:00 UTC
    with database.raw(transaction=True) as cur:
        database.prepared(INSERT_INSTANCE).execute(cur, {"p_id": "raw", "p_started": started, "p_beat": beat})
    with database.write() as conn:
        conn.execute(sa.insert(instances).values(id="sa", started_at=started, heartbeat_at=started))
    with database.read() as conn:
        rows = {r.id: r for r in conn.execute(sa.select(instances))}
    assert rows["raw"].started_at == rows["sa"].started_at == started
    assert rows["raw"].heartbeat_at == datetime(2026, 12, 1, 1, 0, tzinfo=UTC)
    with database.raw(transaction=False) as cur:
        found = database.prepared(BEATING_AFTER).all(
            cur, {"p_after": datetime(2026, 12, 1, 0, 59, tzinfo=UTC)}
        )
    assert [(r.id, r.heartbeat_at) for r in found] == [("raw", datetime(2026, 12, 1, 1, 0, tzinfo=UTC))]
    assert found[0].heartbeat_at.tzinfo == UTC


def test_raw_transactions_commit_or_roll_back_whole_and_raise_sqlalchemys_errors(database):
    def insert(cur, name):
        database.prepared(INSERT_INSTANCE).execute(cur, {"p_id": name, "p_started": T, "p_beat": T})

    T = datetime(2026, 11, 1, tzinfo=UTC)
    with pytest.raises(RuntimeError), database.raw(transaction=True) as cur:
        insert(cur, "a")
        raise RuntimeError("rolled back")
    with database.raw(transaction=True) as cur:
        insert(cur, "b")
        insert(cur, "c")
    with pytest.raises(sa.exc.IntegrityError), database.raw(transaction=True) as cur:
        insert(cur, "d")
        insert(cur, "b")  # the primary key again: the whole transaction goes, "d" too
    with database.raw(transaction=False) as cur:  # the connection is usable after the error
        insert(cur, "e")
    with database.read() as conn:
        assert conn.execute(sa.select(instances.c.id).order_by(instances.c.id)).scalars().all() == [
            "b",
            "c",
            "e",
        ]
