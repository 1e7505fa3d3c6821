"""Accounts, tokens, machines, nonces and work items.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("primary_key", sa.Text, nullable=False),
        sa.Column("secondary_key", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("account_id", sa.String(36),
                  sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False, unique=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("admin", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "machines",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("account_id", sa.String(36),
                  sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("group_name", sa.String(64), nullable=False),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("public_key", sa.String(64), nullable=False),
        sa.Column("facts", sa.JSON, nullable=False),
        sa.Column("agent_version", sa.String(32), nullable=False),
        sa.Column("registered_at", sa.Float, nullable=False),
        sa.Column("last_heartbeat_at", sa.Float),
        sa.Column("heartbeat_interval", sa.Float, nullable=False),
        sa.Column("heartbeat", sa.JSON),
        sa.UniqueConstraint("account_id", "name", name="uq_machines_account_name"),
    )
    op.create_table(
        "nonces",
        sa.Column("machine_id", sa.String(36), primary_key=True),
        sa.Column("nonce", sa.String(64), primary_key=True),
        sa.Column("seen_at", sa.Float, nullable=False),
    )
    op.create_index("ix_nonces_seen_at", "nonces", ["seen_at"])
    op.create_table(
        "work_items",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("account_id", sa.String(36),
                  sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("machine_id", sa.String(36)),
        sa.Column("group_name", sa.String(64)),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("claimed_by", sa.String(36)),
        sa.Column("claimed_at", sa.Float),
        sa.Column("done_at", sa.Float),
        sa.Column("result", sa.JSON),
    )
    op.create_index("ix_work_items_machine_id", "work_items", ["machine_id"])
    op.create_index("ix_work_items_open", "work_items",
                    ["account_id", "claimed_by", "created_at"])
