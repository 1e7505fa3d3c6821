"""Migration 0016 on a database at 0015 that holds rows: the catalog's snapshots become kind
backup, and the tables of protections and recovery actions take rows; both databases (the
ALTER and the backfill differ between SQLite's batch copy and PostgreSQL's ALTER TABLE)."""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import command

from outpost.hub import db


def _sync(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


def test_0016_upgrades_a_database_with_snapshots(empty_database_url: str) -> None:
    engine = sa.create_engine(_sync(empty_database_url))
    try:
        with engine.begin() as conn:
            command.upgrade(db._alembic_config(conn), "0015")
        with engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO accounts (id, name, primary_key, secondary_key, created_at) "
                "VALUES ('a1', 'acme', 'k', 'k', 1.0)"))
            conn.execute(sa.text(
                "INSERT INTO machines (id, account_id, name, group_name, labels, public_key, "
                "facts, agent_version, registered_at, heartbeat_interval) VALUES ('m1', 'a1', "
                "'web-1', 'web', :empty, 'pk', :facts, '1.0', 1.0, 30.0)"),
                {"empty": json.dumps({}), "facts": json.dumps({})})
            for n in range(3):
                conn.execute(sa.text(
                    "INSERT INTO backup_snapshots (id, account_id, machine_id, short_id, "
                    "snapshot_id, paths, created_at) VALUES (:id, 'a1', 'm1', :short, :full, "
                    ":paths, :at)"), {"id": f"s{n}", "short": f"abcd000{n}",
                                      "full": f"abcd000{n}" + "0" * 56,
                                      "paths": json.dumps(["/srv"]), "at": float(n)})
        with engine.begin() as conn:
            command.upgrade(db._alembic_config(conn), "0016")
        with engine.begin() as conn:
            kinds = conn.execute(sa.text(
                "SELECT id, kind FROM backup_snapshots ORDER BY id")).all()
            assert [tuple(r) for r in kinds] == [("s0", "backup"), ("s1", "backup"),
                                                 ("s2", "backup")]
            # A new row without a kind is a backup; a recovery point says so.
            conn.execute(db.backup_snapshots.insert().values(
                id="s3", account_id="a1", machine_id="m1", short_id="ef010203",
                snapshot_id=None, paths=[], created_at=4.0, kind="recovery"))
            conn.execute(db.protections.insert().values(
                id="p1", account_id="a1", machine_id="m1", paths=["/srv"], exclude=[],
                rpo_seconds=300.0, interval_seconds=150.0, app_consistent_every=0,
                points_asked=0, state="Protecting", created_at=1.0, updated_at=1.0))
            conn.execute(db.recovery_actions.insert().values(
                id="r1", account_id="a1", machine_id="m1", kind="test",
                target_machine_id="m1", status="Queued", step="recover", message="",
                output=["a line"], attempts=1, created_at=1.0, updated_at=1.0))
            assert conn.execute(sa.text(
                "SELECT kind FROM backup_snapshots WHERE id = 's3'")).scalar() == "recovery"
            assert conn.execute(sa.select(db.recovery_actions.c.output)).scalar() == ["a line"]
            # One protection per machine.
            try:
                with conn.begin_nested():
                    conn.execute(db.protections.insert().values(
                        id="p2", account_id="a1", machine_id="m1", paths=["/x"], exclude=[],
                        rpo_seconds=60.0, interval_seconds=30.0, app_consistent_every=0,
                        points_asked=0, state="Protecting", created_at=1.0, updated_at=1.0))
                raise AssertionError("a second protection of one machine was stored")
            except sa.exc.IntegrityError:
                pass
        with engine.begin() as conn:  # and back
            command.downgrade(db._alembic_config(conn), "0015")
            names = set(sa.inspect(conn).get_table_names())
            assert "protections" not in names and "recovery_actions" not in names
            columns = {c["name"] for c in sa.inspect(conn).get_columns("backup_snapshots")}
            assert "kind" not in columns
            assert conn.execute(sa.text("SELECT count(*) FROM backup_snapshots")).scalar() == 4
    finally:
        engine.dispose()
