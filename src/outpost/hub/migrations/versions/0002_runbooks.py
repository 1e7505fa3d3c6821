"""Runbooks: versioned scripts with typed parameters.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "runbooks",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("account_id", sa.String(36),
                  sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("content", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("log_verbose", sa.Boolean, nullable=False),
        sa.Column("log_progress", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("account_id", "name", "version", name="uq_runbooks_version"),
    )
