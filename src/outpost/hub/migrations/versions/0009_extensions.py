"""Extensions: published packages, goals per group or machine, retries and reported states.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"


def upgrade() -> None:
    op.create_table(
        "extension_packages",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("account_id", sa.String(36),
                  sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("manifest", sa.JSON, nullable=False),
        sa.Column("blob", sa.LargeBinary, nullable=False),
        sa.Column("published_at", sa.Float, nullable=False),
        sa.UniqueConstraint("account_id", "name", "version",
                            name="uq_extension_packages_version"),
    )
    op.create_table(
        "extension_goals",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("account_id", sa.String(36),
                  sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("target_kind", sa.String(16), nullable=False),
        sa.Column("target", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64)),
        sa.Column("settings", sa.JSON, nullable=False),
        sa.Column("protected", sa.Text),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("run_as", sa.String(64)),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.UniqueConstraint("account_id", "name", "target_kind", "target",
                            name="uq_extension_goals_target"),
    )
    op.create_table(
        "extension_retries",
        sa.Column("machine_id", sa.String(36),
                  sa.ForeignKey("machines.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("retry", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "extension_states",
        sa.Column("machine_id", sa.String(36),
                  sa.ForeignKey("machines.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("version", sa.String(64)),
        sa.Column("target_version", sa.String(64)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("step", sa.String(16)),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("code", sa.Integer),
        sa.Column("changed_at", sa.Float, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("failed_versions", sa.JSON, nullable=False),
        sa.Column("last_ready_version", sa.String(64)),
        sa.Column("reported_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("extension_states")
    op.drop_table("extension_retries")
    op.drop_table("extension_goals")
    op.drop_table("extension_packages")
