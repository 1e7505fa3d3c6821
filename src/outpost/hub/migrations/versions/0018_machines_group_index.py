"""A group's machines found by an index: a job's group is checked at every submission and a
fan-out lists its members, which scanned every machine of the account.

Revision ID: 0018
Revises: 0017
"""

from alembic import op

revision = "0018"
down_revision = "0017"


def upgrade() -> None:
    op.create_index("ix_machines_group", "machines", ["account_id", "group_name"])


def downgrade() -> None:
    op.drop_index("ix_machines_group", "machines")
