"""Edge modules: published module packages, deployments per group or machine, and what each
machine's agent last fetched and reported of its modules.

Revision ID: 0019
Revises: 0018
"""

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"


def upgrade() -> None:
    op.create_table(
        "module_packages",
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
                            name="uq_module_packages_version"),
    )
    op.create_table(
        "deployments",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("account_id", sa.String(36),
                  sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("target_kind", sa.String(16), nullable=False),
        sa.Column("target", sa.String(64), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("manifest", sa.JSON, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.UniqueConstraint("account_id", "name", name="uq_deployments_name"),
    )
    op.create_table(
        "module_reports",
        sa.Column("machine_id", sa.String(36),
                  sa.ForeignKey("machines.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("fetched_at", sa.Float),
        sa.Column("fetched_deployment", sa.String(64)),
        sa.Column("fetched_version", sa.Integer),
        sa.Column("report", sa.JSON),
        sa.Column("reported_at", sa.Float),
        sa.Column("received_at", sa.Float),
    )


def downgrade() -> None:
    op.drop_table("module_reports")
    op.drop_table("deployments")
    op.drop_table("module_packages")
