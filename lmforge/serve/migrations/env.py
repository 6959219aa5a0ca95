"""Alembic's environment: runs the revisions on the connection `Database.upgrade()` hands over.

With plain `alembic` (a developer making a new revision), it connects to `sqlalchemy.url` or
$LMFORGE_DATABASE_URL instead.
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from alembic import context

from lmforge.serve.db import metadata


def run(connection: sa.Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, transaction_per_migration=False)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # two replicas upgrading at once: the second waits, then finds the schema at head
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7301530925)")
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    from lmforge.serve.db import Database

    url = context.config.get_main_option("sqlalchemy.url") or os.environ["LMFORGE_DATABASE_URL"]
    db = Database(url)
    try:
        with db.engine.connect() as conn:
            run(conn)
            conn.commit()
    finally:
        db.close()
