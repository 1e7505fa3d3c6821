"""Assets: variables, credentials and certificates, sealed at rest.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.create_table(
        "assets",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("account_id", sa.String(36),
                  sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("secret", sa.Boolean, nullable=False),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("thumbprint", sa.String(40)),
        sa.Column("subject", sa.Text),
        sa.Column("not_after", sa.Float),
        sa.Column("has_private_key", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.UniqueConstraint("account_id", "kind", "name", name="uq_assets_name"),
    )
    op.create_index("ix_assets_thumbprint", "assets", ["account_id", "thumbprint"])
