"""The agent run an extension operation started under (hub/extension_ops.py, ``_end_lost``).

Revision ID: 0021
Revises: 0020
"""

import sqlalchemy as sa
from alembic import op

revision = "0021"
down_revision = "0020"


def upgrade() -> None:
    with op.batch_alter_table("extension_operations") as batch:
        batch.add_column(sa.Column("started_run", sa.String(32)))


def downgrade() -> None:
    with op.batch_alter_table("extension_operations") as batch:
        batch.drop_column("started_run")
