"""The backup store: each machine's credential for its restic repository on the hub.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"


def upgrade() -> None:
    op.create_table(
        "backup_credentials",
        sa.Column("machine_id", sa.String(36), sa.ForeignKey("machines.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("quota_bytes", sa.BigInteger),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("backup_credentials")
