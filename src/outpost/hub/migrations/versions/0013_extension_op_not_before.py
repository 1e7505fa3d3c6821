"""Schedules of extension operations: a schedule targets a runbook on a group, or an
extension's operation on every machine of a group (or one machine); operations carry the
time they may start (not_before) and the schedule run that asked them, once per machine.

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"


def upgrade() -> None:
    with op.batch_alter_table("schedules") as batch:
        batch.alter_column("runbook_name", existing_type=sa.String(128), nullable=True)
        batch.alter_column("group_name", existing_type=sa.String(64), nullable=True)
        batch.add_column(sa.Column("machine_name", sa.String(64)))
        batch.add_column(sa.Column("extension", sa.String(64)))
        batch.add_column(sa.Column("operation", sa.String(64)))
    with op.batch_alter_table("schedule_runs") as batch:
        batch.add_column(sa.Column("operations", sa.Integer))
        batch.add_column(sa.Column("skipped", sa.Integer))
    with op.batch_alter_table("extension_operations") as batch:
        batch.add_column(sa.Column("not_before", sa.Float))
        batch.add_column(sa.Column("schedule_id", sa.String(36)))
        batch.add_column(sa.Column("schedule_due_at", sa.Float))
    op.create_index("uq_extension_operations_schedule_run", "extension_operations",
                    ["schedule_id", "schedule_due_at", "machine_id"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_extension_operations_schedule_run", "extension_operations")
    with op.batch_alter_table("extension_operations") as batch:
        batch.drop_column("schedule_due_at")
        batch.drop_column("schedule_id")
        batch.drop_column("not_before")
    with op.batch_alter_table("schedule_runs") as batch:
        batch.drop_column("skipped")
        batch.drop_column("operations")
    op.execute("DELETE FROM schedules WHERE runbook_name IS NULL")
    with op.batch_alter_table("schedules") as batch:
        batch.drop_column("operation")
        batch.drop_column("extension")
        batch.drop_column("machine_name")
        batch.alter_column("group_name", existing_type=sa.String(64), nullable=False)
        batch.alter_column("runbook_name", existing_type=sa.String(128), nullable=False)
