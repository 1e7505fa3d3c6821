"""Extension operations: asked on the hub, run by the machine's agent, tracked like jobs;
and the per-machine hold that keeps an uninstalled extension off one machine.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"


def upgrade() -> None:
    op.create_table(
        "extension_operations",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("machine_id", sa.String(36), sa.ForeignKey("machines.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("extension", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64)),
        sa.Column("operation", sa.String(64), nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("code", sa.String(32)),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("next_try_at", sa.Float),
        sa.Column("item_id", sa.String(36)),
        sa.Column("requested_by", sa.String(128)),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float),
        sa.Column("ended_at", sa.Float),
        sa.Column("output", sa.Text, nullable=False),
        sa.Column("result", sa.JSON),
        sa.Column("start_deadline", sa.Float),
        sa.Column("expected_end", sa.Float),
    )
    op.create_index("ix_extension_operations_target", "extension_operations",
                    ["machine_id", "extension", "status"])
    op.create_index("ix_extension_operations_status", "extension_operations", ["status"])
    op.create_table(
        "extension_holds",
        sa.Column("machine_id", sa.String(36), sa.ForeignKey("machines.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("held_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("extension_holds")
    op.drop_index("ix_extension_operations_status", "extension_operations")
    op.drop_index("ix_extension_operations_target", "extension_operations")
    op.drop_table("extension_operations")
