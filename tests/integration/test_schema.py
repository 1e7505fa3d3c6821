"""The tables the migrations build are the tables the hub's code describes.

Migrations copy table definitions on purpose (a migration is a frozen snapshot); this test
catches the two drifting apart, on both databases.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from outpost.hub import db


def test_migrations_match_the_metadata(empty_database_url: str) -> None:
    database_url = empty_database_url
    db.migrate_sync(database_url)
    sync_url = database_url.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = sa.create_engine(sync_url)
    try:
        with engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn), db.metadata)
    finally:
        engine.dispose()
    assert diffs == [], diffs
