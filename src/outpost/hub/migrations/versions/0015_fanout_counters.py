"""A job on every machine of a group keeps running counts of its children, so a child's end
costs the same with ten children or ten thousand; each child says which count holds it.

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"

COUNTERS = ("waiting", "busy", "completed", "failed", "stopped")
FINAL = "('Completed', 'Failed', 'Stopped')"


def upgrade() -> None:
    with op.batch_alter_table("fanouts") as batch:
        for name in COUNTERS:
            batch.add_column(sa.Column(name, sa.Integer, nullable=False, server_default="0"))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("slot", sa.String(8)))
    op.drop_index("ix_jobs_parent", "jobs")
    op.create_index("ix_jobs_parent", "jobs", ["parent_id", "status", "created_at"])
    # The children stored so far: held (New), holding a slot (released, not ended) or
    # counted (ended); the counts of their parents from them.
    op.execute("UPDATE jobs SET slot = CASE WHEN status = 'New' THEN 'held' "
               f"WHEN status IN {FINAL} THEN 'done' ELSE 'busy' END "
               "WHERE parent_id IS NOT NULL")
    sets = {"waiting": "jobs.slot = 'held'", "busy": "jobs.slot = 'busy'",
            "completed": "jobs.status = 'Completed'", "failed": "jobs.status = 'Failed'",
            "stopped": "jobs.status = 'Stopped'"}
    op.execute("UPDATE fanouts SET " + ", ".join(
        f"{name} = (SELECT count(*) FROM jobs WHERE jobs.parent_id = fanouts.job_id "
        f"AND {where})" for name, where in sets.items()))


def downgrade() -> None:
    op.drop_index("ix_jobs_parent", "jobs")
    op.create_index("ix_jobs_parent", "jobs", ["parent_id", "status"])
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("slot")
    with op.batch_alter_table("fanouts") as batch:
        for name in COUNTERS:
            batch.drop_column(name)
