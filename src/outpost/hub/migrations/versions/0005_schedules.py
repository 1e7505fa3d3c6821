"""Schedules and webhooks.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("account_id", sa.String(36),
                  sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("runbook_name", sa.String(128), nullable=False),
        sa.Column("group_name", sa.String(64), nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("cron", sa.String(128), nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("spread_seconds", sa.Float, nullable=False),
        sa.Column("offset_seconds", sa.Float, nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("next_run_at", sa.Float, nullable=False),
        sa.Column("last_run_at", sa.Float),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("account_id", "name", name="uq_schedules_account_name"),
    )
    op.create_index("ix_schedules_due", "schedules", ["enabled", "next_run_at"])
    op.create_table(
        "schedule_runs",
        sa.Column("schedule_id", sa.String(36),
                  sa.ForeignKey("schedules.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("due_at", sa.Float, primary_key=True),
        sa.Column("fired_at", sa.Float, nullable=False),
        sa.Column("job_id", sa.String(36)),
        sa.Column("missed", sa.Integer, nullable=False),
        sa.Column("error", sa.Text),
    )
    op.create_table(
        "webhooks",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("account_id", sa.String(36),
                  sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("runbook_name", sa.String(128), nullable=False),
        sa.Column("group_name", sa.String(64), nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("expires_at", sa.Float),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("last_used_at", sa.Float),
        sa.Column("last_job_id", sa.String(36)),
        sa.UniqueConstraint("account_id", "name", name="uq_webhooks_account_name"),
    )
