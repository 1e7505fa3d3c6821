"""A machine's graceful stop, and output records that continue a longer line.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    with op.batch_alter_table("machines") as batch:
        batch.add_column(sa.Column("stopped_at", sa.Float))
    with op.batch_alter_table("job_records") as batch:
        batch.add_column(sa.Column("continues", sa.Boolean(create_constraint=False)))


def downgrade() -> None:
    with op.batch_alter_table("job_records") as batch:
        batch.drop_column("continues")
    with op.batch_alter_table("machines") as batch:
        batch.drop_column("stopped_at")
