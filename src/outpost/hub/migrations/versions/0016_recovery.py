"""Disaster recovery: the catalog tells backup snapshots from recovery points; one protection
per machine; the failover, test failover and failback actions.

Revision ID: 0016
Revises: 0015
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"


def upgrade() -> None:
    with op.batch_alter_table("backup_snapshots") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False,
                                   server_default="backup"))
    # Every row so far is a backup snapshot (the server default filled them); said once more
    # for a database whose ALTER left them empty.
    op.execute("UPDATE backup_snapshots SET kind = 'backup' WHERE kind IS NULL OR kind = ''")
    op.create_table(
        "protections",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("machine_id", sa.String(36), sa.ForeignKey("machines.id", ondelete="CASCADE"),
                  nullable=False, unique=True),
        sa.Column("paths", sa.JSON, nullable=False),
        sa.Column("exclude", sa.JSON, nullable=False),
        sa.Column("rpo_seconds", sa.Float, nullable=False),
        sa.Column("interval_seconds", sa.Float, nullable=False),
        sa.Column("app_consistent_every", sa.Integer, nullable=False),
        sa.Column("points_asked", sa.Integer, nullable=False),
        sa.Column("pre_script_runbook", sa.String(128)),
        sa.Column("post_failover_runbook", sa.String(128)),
        sa.Column("target_group", sa.String(64)),
        sa.Column("retention", sa.String(32)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("active_machine_id", sa.String(36)),
        sa.Column("next_point_at", sa.Float),
        sa.Column("point_op_id", sa.String(36)),
        sa.Column("last_prune_at", sa.Float),
        sa.Column("reason", sa.Text),
        sa.Column("created_by", sa.String(128)),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_by", sa.String(128)),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "recovery_actions",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("machine_id", sa.String(36), sa.ForeignKey("machines.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("target_machine_id", sa.String(36), nullable=False),
        sa.Column("point", sa.String(64)),
        sa.Column("target_dir", sa.String(4096)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("step", sa.String(32), nullable=False),
        sa.Column("op_id", sa.String(36)),
        sa.Column("job_id", sa.String(36)),
        sa.Column("code", sa.String(32)),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("output", sa.JSON, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("requested_by", sa.String(128)),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("ended_at", sa.Float),
    )
    op.create_index("ix_recovery_actions_account", "recovery_actions",
                    ["account_id", "created_at"])
    op.create_index("ix_recovery_actions_status", "recovery_actions", ["status"])


def downgrade() -> None:
    op.drop_index("ix_recovery_actions_status", "recovery_actions")
    op.drop_index("ix_recovery_actions_account", "recovery_actions")
    op.drop_table("recovery_actions")
    op.drop_table("protections")
    with op.batch_alter_table("backup_snapshots") as batch:
        batch.drop_column("kind")
