"""The backup catalog: one row per snapshot the backup extension took; the read-only grants
that let one machine restore another's snapshot; and how long each extension operation waited
on its machine, and why.

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"


def upgrade() -> None:
    with op.batch_alter_table("extension_operations") as batch:
        batch.add_column(sa.Column("waiting_since", sa.Float))
        batch.add_column(sa.Column("waited_seconds", sa.Float))
        batch.add_column(sa.Column("wait_reason", sa.Text))
    op.create_table(
        "backup_snapshots",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("machine_id", sa.String(36), sa.ForeignKey("machines.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("short_id", sa.String(16), nullable=False),
        sa.Column("snapshot_id", sa.String(64)),
        sa.Column("op_id", sa.String(36)),
        sa.Column("paths", sa.JSON, nullable=False),
        sa.Column("files", sa.BigInteger),
        sa.Column("bytes_added", sa.BigInteger),
        sa.Column("total_bytes", sa.BigInteger),
        sa.Column("duration_seconds", sa.Float),
        sa.Column("consistency", sa.String(16)),
        sa.Column("waited_seconds", sa.Float),
        sa.Column("wait_reason", sa.Text),
        sa.Column("taken_at", sa.Float),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("forgotten_at", sa.Float),
        sa.Column("forgotten_by", sa.String(36)),
        sa.UniqueConstraint("machine_id", "short_id", name="uq_backup_snapshots_machine_short"),
    )
    op.create_index("ix_backup_snapshots_account", "backup_snapshots",
                    ["account_id", "created_at"])
    op.create_table(
        "backup_grants",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("op_id", sa.String(36), sa.ForeignKey("extension_operations.id",
                                                        ondelete="CASCADE"),
                  nullable=False, unique=True),
        sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("machine_id", sa.String(36), sa.ForeignKey("machines.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("source_machine_id", sa.String(36),
                  sa.ForeignKey("machines.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("backup_grants")
    op.drop_index("ix_backup_snapshots_account", "backup_snapshots")
    op.drop_table("backup_snapshots")
    with op.batch_alter_table("extension_operations") as batch:
        batch.drop_column("wait_reason")
        batch.drop_column("waited_seconds")
        batch.drop_column("waiting_since")
