"""Tenants, API keys, prices, budgets, the usage ledger and its running totals, rate windows, instances.

Revision ID: 0001
Revises:
Create Date: 2026-11-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("name", name="uq_tenants_name"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("prefix", sa.String(12), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS),
        sa.Column("revoked_at", TS),
        sa.Column("models", sa.JSON),
        sa.Column("rpm", sa.Integer),
        sa.Column("tpm", sa.Integer),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )
    op.create_index("ix_api_keys_tenant_id", "api_keys", ["tenant_id"])
    op.create_index("ix_api_keys_prefix", "api_keys", ["prefix"])
    op.create_table(
        "prices",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("effective_from", TS, nullable=False),
        sa.Column("input_uusd_per_mtok", sa.BigInteger, nullable=False),
        sa.Column("output_uusd_per_mtok", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("model", "effective_from", name="uq_prices_model_effective_from"),
    )
    op.create_table(
        "budgets",
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), primary_key=True),
        sa.Column("month", sa.String(7), primary_key=True),
        sa.Column("limit_pusd", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "usage",
        sa.Column("id", BIG_ID, primary_key=True),
        sa.Column("request_id", sa.String(100), nullable=False),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("key_id", sa.Integer, sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("cost_pusd", sa.BigInteger, nullable=False),
        sa.Column("reserved_pusd", sa.BigInteger, nullable=False),
        sa.Column("input_uusd_per_mtok", sa.BigInteger, nullable=False),
        sa.Column("output_uusd_per_mtok", sa.BigInteger, nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("finished_at", TS),
        sa.Column("instance_id", sa.String(100)),
        sa.Column("error", sa.Text),
        sa.UniqueConstraint("request_id", name="uq_usage_request_id"),
    )
    op.create_index("ix_usage_tenant_started", "usage", ["tenant_id", "started_at"])
    op.create_index("ix_usage_status", "usage", ["status"])
    op.create_table(
        "tenant_months",
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), primary_key=True),
        sa.Column("month", sa.String(7), primary_key=True),
        sa.Column("spent_pusd", sa.BigInteger, nullable=False),
        sa.Column("reserved_pusd", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "rate_windows",
        sa.Column("key_id", sa.Integer, sa.ForeignKey("api_keys.id"), primary_key=True),
        sa.Column("window_start", TS, nullable=False),
        sa.Column("requests", sa.Integer, nullable=False),
        sa.Column("tokens", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "instances",
        sa.Column("id", sa.String(100), primary_key=True),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("heartbeat_at", TS, nullable=False),
    )


def downgrade() -> None:
    for table in ("instances", "rate_windows", "tenant_months", "usage", "budgets", "prices", "api_keys"):
        op.drop_table(table)
    op.drop_table("tenants")
