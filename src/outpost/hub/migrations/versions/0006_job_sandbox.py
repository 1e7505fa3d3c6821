"""The job sandbox: groups' resource limits, and the identity each attempt ran as.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    with op.batch_alter_table("groups") as batch:
        batch.add_column(sa.Column("memory_mb", sa.Integer))
        batch.add_column(sa.Column("cpus", sa.Float))
        batch.add_column(sa.Column("max_processes", sa.Integer))
    with op.batch_alter_table("job_attempts") as batch:
        batch.add_column(sa.Column("run_as", sa.String(200)))


def downgrade() -> None:
    with op.batch_alter_table("job_attempts") as batch:
        batch.drop_column("run_as")
    with op.batch_alter_table("groups") as batch:
        batch.drop_column("max_processes")
        batch.drop_column("cpus")
        batch.drop_column("memory_mb")
