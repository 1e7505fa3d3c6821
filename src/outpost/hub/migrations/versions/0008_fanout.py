"""A job on every machine of a group: children addressed to one machine, and the parent's
rate control.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("parent_id", sa.String(36)))
        batch.add_column(sa.Column("target_machine_id", sa.String(36)))
    op.create_index("ix_jobs_parent", "jobs", ["parent_id", "status"])
    op.create_table(
        "fanouts",
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("children", sa.Integer, nullable=False),
        sa.Column("concurrency_given", sa.String(16), nullable=False),
        sa.Column("max_concurrency", sa.Integer, nullable=False),
        sa.Column("errors_given", sa.String(16)),
        sa.Column("max_errors", sa.Integer),
        sa.Column("halted", sa.Text),
        sa.Column("halted_at", sa.Float),
        sa.Column("stopped_at", sa.Float),
    )


def downgrade() -> None:
    op.drop_table("fanouts")
    op.drop_index("ix_jobs_parent", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("target_machine_id")
        batch.drop_column("parent_id")
