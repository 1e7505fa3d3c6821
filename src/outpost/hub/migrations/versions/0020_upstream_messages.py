"""Upstream messages from machines' modules, each machine's acknowledged seq and dropped
count, and the forwarder's cursor (hub/messages.py).

Revision ID: 0020
Revises: 0019
"""

import sqlalchemy as sa
from alembic import op

revision = "0020"
down_revision = "0019"

ROW_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "upstream_messages",
        sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("account_id", sa.String(36),
                  sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("machine_id", sa.String(36),
                  sa.ForeignKey("machines.id", ondelete="CASCADE"), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("module", sa.String(128), nullable=False),
        sa.Column("output", sa.String(128), nullable=False),
        sa.Column("properties", sa.JSON, nullable=False),
        sa.Column("content_type", sa.String(255)),
        sa.Column("message_id", sa.String(255)),
        sa.Column("correlation_id", sa.String(255)),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.UniqueConstraint("machine_id", "seq", name="uq_upstream_messages_machine_seq"),
    )
    op.create_index("ix_upstream_messages_account", "upstream_messages", ["account_id", "id"])
    op.create_index("ix_upstream_messages_received_at", "upstream_messages", ["received_at"])
    op.create_table(
        "upstream_machines",
        sa.Column("machine_id", sa.String(36),
                  sa.ForeignKey("machines.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("accepted_through", sa.BigInteger, nullable=False),
        sa.Column("dropped_expired", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "message_forwarding",
        sa.Column("target", sa.String(64), primary_key=True),
        sa.Column("cursor", sa.BigInteger, nullable=False),
        sa.Column("forwarded", sa.BigInteger, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("failing_since", sa.Float),
        sa.Column("updated_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("message_forwarding")
    op.drop_table("upstream_machines")
    op.drop_index("ix_upstream_messages_received_at", "upstream_messages")
    op.drop_index("ix_upstream_messages_account", "upstream_messages")
    op.drop_table("upstream_messages")
