"""The agent run that told the hub it was stopping: a heartbeat of that same run (sent
before its stop notice, arriving after it) does not end the stop.

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"


def upgrade() -> None:
    with op.batch_alter_table("machines") as batch:
        batch.add_column(sa.Column("stopped_run", sa.String(32)))


def downgrade() -> None:
    with op.batch_alter_table("machines") as batch:
        batch.drop_column("stopped_run")
