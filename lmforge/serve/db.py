"""The database behind auth and metering: tables (SQLAlchemy Core), connections, and schema migrations.

SQLite (one file, WAL mode) is the embedded default; PostgreSQL when several server processes share one ledger.
Every table is defined here once for the queries; the Alembic revisions under `migrations/` are the frozen
history that creates them (`lmforge db upgrade`), so the two must agree (a test compares them).

Transactions: `Database.write()` is one write transaction, `Database.read()` one read-only snapshot. On SQLite
a write begins with `BEGIN IMMEDIATE`, taking the file's write lock up front: concurrent writers queue on the
busy timeout instead of failing with "database is locked" when a read lock would have to be upgraded. pysqlite
normally emits its own deferred BEGIN, so it is switched off (isolation_level=None) and the BEGIN is emitted from
SQLAlchemy's `begin` event, as SQLAlchemy's pysqlite documentation describes. Inside one process, writers also
take a lock before BEGIN, so threads wait on the lock (woken at once) rather than in SQLite's sleeping busy loop.
On PostgreSQL the default READ COMMITTED is enough: every check-and-reserve is one conditional UPDATE, which
re-evaluates its WHERE clause on the locked row.

The request path's few hot statements (metering, key lookup) skip SQLAlchemy's execution layer: `Prepared`
compiles them once and `Database.raw()` runs them on a DB-API cursor, with the same transactions and types.
"""

from __future__ import annotations

import collections
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from lmforge.errors import UserError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
HEAD_REVISION = (
    "0001"  # the newest file in migrations/versions (a test checks): lets open() skip importing alembic
)
BUSY_TIMEOUT_S = 30.0


class UTCDateTime(sa.TypeDecorator):
    """A timezone-aware UTC datetime on both backends (SQLite stores naive text; this puts the UTC back)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: lmforge stores timezone-aware UTC datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity for the ledger.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

metadata = sa.MetaData()

tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("name", name="uq_tenants_name"),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False, index=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("prefix", sa.String(12), nullable=False, index=True),
    sa.Column("key_hash", sa.String(64), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime),
    sa.Column("revoked_at", UTCDateTime),
    sa.Column("models", sa.JSON(none_as_null=True)),  # the allow-list; NULL (not JSON null) = every model
    sa.Column("rpm", sa.Integer),  # NULL = unlimited
    sa.Column("tpm", sa.Integer),
    sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
)

prices = sa.Table(
    "prices",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("effective_from", UTCDateTime, nullable=False),
    sa.Column("input_uusd_per_mtok", sa.BigInteger, nullable=False),
    sa.Column("output_uusd_per_mtok", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("model", "effective_from", name="uq_prices_model_effective_from"),
)

budgets = sa.Table(
    "budgets",
    metadata,
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), primary_key=True),
    sa.Column("month", sa.String(7), primary_key=True),
    sa.Column("limit_pusd", sa.BigInteger, nullable=False),
)

usage = sa.Table(
    "usage",
    metadata,
    sa.Column("id", BigId, primary_key=True),
    sa.Column("request_id", sa.String(100), nullable=False),
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("key_id", sa.Integer, sa.ForeignKey("api_keys.id"), nullable=False),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # pending | completed | cancelled | failed
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("cost_pusd", sa.BigInteger, nullable=False),
    sa.Column("reserved_pusd", sa.BigInteger, nullable=False),  # the hold while pending; 0 once settled
    sa.Column("input_uusd_per_mtok", sa.BigInteger, nullable=False),
    sa.Column("output_uusd_per_mtok", sa.BigInteger, nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime),
    sa.Column("instance_id", sa.String(100)),
    sa.Column("error", sa.Text),
    sa.UniqueConstraint("request_id", name="uq_usage_request_id"),
    sa.Index("ix_usage_tenant_started", "tenant_id", "started_at"),
    sa.Index("ix_usage_status", "status"),
)

tenant_months = sa.Table(
    "tenant_months",
    metadata,
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), primary_key=True),
    sa.Column("month", sa.String(7), primary_key=True),
    sa.Column("spent_pusd", sa.BigInteger, nullable=False),
    sa.Column("reserved_pusd", sa.BigInteger, nullable=False),
)

rate_windows = sa.Table(
    "rate_windows",
    metadata,
    sa.Column("key_id", sa.Integer, sa.ForeignKey("api_keys.id"), primary_key=True),
    sa.Column("window_start", UTCDateTime, nullable=False),
    sa.Column("requests", sa.Integer, nullable=False),
    sa.Column("tokens", sa.BigInteger, nullable=False),
)

instances = sa.Table(
    "instances",
    metadata,
    sa.Column("id", sa.String(100), primary_key=True),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("heartbeat_at", UTCDateTime, nullable=False),
)


def utcnow() -> datetime:
    return datetime.now(UTC)


def database_url(explicit: str | None, home: Path) -> str:
    """The database to use: `explicit` (--database-url) > $LMFORGE_DATABASE_URL > SQLite in `home`."""
    if explicit:
        return explicit
    if os.environ.get("LMFORGE_DATABASE_URL"):
        return os.environ["LMFORGE_DATABASE_URL"]
    return f"sqlite:///{Path(home) / 'lmforge.db'}"


def _normalise_url(url: str) -> sa.URL:
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        raise UserError(
            f"cannot parse the database URL {url!r}; use sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB"
        ) from None
    backend = parsed.get_backend_name()
    if backend in ("postgres", "postgresql"):
        # psycopg 3 is the driver lmforge ships with; plain postgresql:// would ask for psycopg2
        return parsed.set(drivername="postgresql+psycopg")
    if backend != "sqlite":
        raise UserError(f"unsupported database {backend!r} in {url!r}: lmforge uses SQLite or PostgreSQL")
    if parsed.database in (None, "", ":memory:") or (parsed.database or "").startswith("file::memory:"):
        raise UserError("an in-memory SQLite database cannot be shared between connections; give a file path")
    return parsed


class Database:
    """One database: a SQLAlchemy engine (connection pool) configured for lmforge's transactions."""

    def __init__(self, url: str) -> None:
        parsed = _normalise_url(url)
        self.url = parsed.render_as_string(hide_password=False)
        self.display_url = parsed.render_as_string(hide_password=True)
        self.dialect = parsed.get_backend_name()  # "sqlite" | "postgresql"
        self._write_lock = threading.Lock() if self.dialect == "sqlite" else None
        try:
            if self.dialect == "sqlite":
                Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
                self.engine = sa.create_engine(
                    parsed,
                    connect_args={"timeout": BUSY_TIMEOUT_S},
                    pool_size=8,
                    max_overflow=24,
                )
                _configure_sqlite(self.engine)
            else:
                self.engine = sa.create_engine(parsed, pool_size=8, max_overflow=24, pool_recycle=3600)
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, OSError) as e:
            raise UserError(f"cannot open the database {self.display_url}: {e}") from None
        self.dbapi_error = self.engine.dialect.loaded_dbapi.Error  # the driver's base exception
        self._prepared: dict[
            int, Prepared
        ] = {}  # by id(): each Prepared holds its statement, so ids stay unique

    def prepared(self, stmt: sa.Executable) -> Prepared:
        """`stmt` compiled for this database, once (statements are module constants: the cache stays small)."""
        found = self._prepared.get(id(stmt))
        if found is None:
            found = self._prepared[id(stmt)] = Prepared(stmt, self.engine.dialect)
        return found

    @contextmanager
    def raw(self, *, transaction: bool) -> Iterator[Any]:
        """A DB-API cursor on a pooled connection, for the request path's hot statements (`prepared()`):
        SQLAlchemy's execution layer cost twice the statements' own work there (authenticate + admit + settle on
        SQLite 1.0 -> 0.33 ms run this way; a checkout from the pool costs ~10 us). `transaction`: one write transaction as `write()` takes it (SQLite: the process's write
        lock, then BEGIN IMMEDIATE), committed when the block ends and rolled back if it raises; otherwise
        autocommit, for ONE statement (atomic by itself). Driver errors come out as SQLAlchemy's."""
        proxied = self.engine.raw_connection()
        conn = proxied.driver_connection
        postgres = self.dialect == "postgresql"
        if postgres:
            import psycopg  # loaded already: SQLAlchemy's dialect connected with it

            conn.autocommit = True  # client-side; transactions are explicit below
            cur = psycopg.RawCursor(conn)  # Prepared's $n queries
        else:
            cur = conn.cursor()
        try:
            if not transaction:
                yield cur
            elif not postgres:
                with self._write_lock:
                    cur.execute("BEGIN IMMEDIATE")
                    try:
                        yield cur
                    except BaseException:
                        cur.execute("ROLLBACK")
                        raise
                    cur.execute("COMMIT")
            else:
                with conn.transaction():  # BEGIN .. COMMIT (or ROLLBACK if the block raises)
                    yield cur
        except self.dbapi_error as e:
            if self.engine.dialect.is_disconnect(e, conn, cur):
                proxied.invalidate()  # the pool opens a new one next time
            raise sa.exc.DBAPIError.instance(None, None, e, self.dbapi_error) from e
        finally:
            if proxied.is_valid:
                cur.close()
                if postgres:
                    conn.autocommit = False  # as the pool hands connections out
            proxied.close()

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @contextmanager
    def write(self) -> Iterator[sa.Connection]:
        """One write transaction: committed when the block ends, rolled back if it raises."""
        if self._write_lock is None:
            with self.engine.begin() as conn:
                yield conn
            return
        with self._write_lock, self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[sa.Connection]:
        """One read-only snapshot (a deferred transaction on SQLite: no write lock, no waiting on writers)."""
        with self.engine.connect() as conn:
            conn.execution_options(lmforge_read_only=True)
            with conn.begin():
                yield conn

    def _alembic_config(self, conn: sa.Connection) -> Any:
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = conn
        return config

    def upgrade(self) -> None:
        """Bring the schema to the newest revision (alembic upgrade head); a no-op when already there."""
        from alembic import command

        with self._connection_errors(), self.engine.connect() as conn:
            command.upgrade(self._alembic_config(conn), "head")
            conn.commit()

    def revision(self) -> tuple[str | None, str | None]:
        """(the database's current schema revision or None, the newest revision lmforge knows)."""
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        with self._connection_errors(), self.read() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
            head = ScriptDirectory.from_config(self._alembic_config(conn)).get_current_head()
        return current, head

    def current_revision(self) -> str | None:
        """The database's schema revision (None before the first upgrade), read without alembic."""
        with self._connection_errors(), self.read() as conn:
            if not sa.inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()

    def check(self) -> None:
        """Raise a UserError naming `lmforge db upgrade` unless the schema is at the newest revision."""
        current, head = self.current_revision(), HEAD_REVISION
        if current == head:
            return
        state = "has no lmforge tables" if current is None else f"is at schema revision {current}, not {head}"
        raise UserError(
            f"the database {self.display_url} {state}; run `lmforge db upgrade --database-url URL` first"
        )

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _connection_errors(self) -> Iterator[None]:
        try:
            yield
        except sa.exc.OperationalError as e:
            reason = str(e.orig).strip().splitlines()[0] if e.orig is not None else str(e)
            raise UserError(f"cannot use the database {self.display_url}: {reason}") from None


class Prepared:
    """A Core statement compiled once for one dialect and run on a raw DB-API cursor (`Database.raw()`). Values
    go in and come out through the same type processors SQLAlchemy applies (UTCDateTime's text on SQLite, JSON),
    so what the hot path writes and reads is exactly what the rest of lmforge writes and reads."""

    def __init__(self, stmt: sa.Executable, dialect: sa.Dialect) -> None:
        self.statement = stmt
        compiled = stmt.compile(dialect=dialect)
        self.sql = compiled.string
        self.positional = compiled.positiontup  # parameter names in order (SQLite's qmark); None when named
        if dialect.name == "postgresql":
            self.sql, self.positional = _numbered(self.sql)
        self.binds = [
            (name, bind.type.dialect_impl(dialect).bind_processor(dialect), bind)
            for name, bind in compiled.binds.items()
        ]
        columns = list(getattr(stmt, "exported_columns", ()))
        self.results = [c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns]
        self.row = collections.namedtuple("Row", [c.key for c in columns], rename=True) if columns else None

    def execute(self, cur: Any, args: dict[str, Any]) -> Any:
        """Run with `args` (a name -> value dict; the statement's own literals fill the rest); the cursor."""
        values = {}
        for name, process, bind in self.binds:
            if name in args:
                value = args[name]
            elif bind.required:
                raise KeyError(f"no value for the statement's parameter {name!r}")
            else:
                value = bind.effective_value
            values[name] = value if process is None else process(value)
        cur.execute(self.sql, [values[n] for n in self.positional] if self.positional else values)
        return cur

    def all(self, cur: Any, args: dict[str, Any]) -> list[Any]:
        rows = self.execute(cur, args).fetchall()
        return [
            self.row(*(v if p is None else p(v) for v, p in zip(row, self.results, strict=True)))
            for row in rows
        ]

    def first(self, cur: Any, args: dict[str, Any]) -> Any | None:
        rows = self.all(cur, args)
        return rows[0] if rows else None


def _numbered(sql: str) -> tuple[str, list[str]]:
    """psycopg's %(name)s query as PostgreSQL's own $1, $2... (run by `psycopg.RawCursor`), and the names in
    order. psycopg parses a %(name)s query on every execution once it is over 4 KB (its parse cache's limit):
    _PG_ADMIT_MANY is 4.5 KB, and parsing it took ~70 us of the ledger thread's time per batch."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match[1] not in names:
            names.append(match[1])
        return f"${names.index(match[1]) + 1}"

    return re.sub(r"%\((\w+)\)s", number, sql).replace("%%", "%"), names


def open_database(url: str) -> Database:
    """Open `url` ready for use: SQLite is upgraded in place; PostgreSQL must already be at the newest schema
    (several servers share it, so upgrading is an explicit `lmforge db upgrade`)."""
    db = Database(url)
    try:
        if db.is_sqlite and db.current_revision() != HEAD_REVISION:
            db.upgrade()
        else:
            db.check()
    except BaseException:
        db.close()
        raise
    return db


def _configure_sqlite(engine: sa.Engine) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        dbapi_connection.isolation_level = None  # pysqlite emits no BEGIN/COMMIT of its own; see below
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
        cursor.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across crashes of the process
        cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn: sa.Connection) -> None:
        read_only = conn.get_execution_options().get("lmforge_read_only", False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")
