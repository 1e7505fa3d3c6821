"""Storage: the tables, the engine, and migrations (Alembic) for SQLite and PostgreSQL.

Times are stored as float seconds since the epoch: the same type and the same comparisons on
both databases, and no time-zone conversion on the hot paths.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from . import sqlite_inline

# The migrations in migrations/versions copy these definitions on purpose: a migration is a
# frozen snapshot. tests/integration/test_schema.py fails if the two drift apart.
metadata = sa.MetaData()

accounts = sa.Table(
    "accounts", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("primary_key", sa.Text, nullable=False),  # sealed by the vault
    sa.Column("secondary_key", sa.Text, nullable=False),  # sealed by the vault
    sa.Column("created_at", sa.Float, nullable=False),
)

tokens = sa.Table(
    "tokens", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("hash", sa.String(64), nullable=False, unique=True),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("admin", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

machines = sa.Table(
    "machines", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("group_name", sa.String(64), nullable=False),
    sa.Column("labels", sa.JSON, nullable=False),
    sa.Column("public_key", sa.String(64), nullable=False),
    sa.Column("facts", sa.JSON, nullable=False),
    sa.Column("agent_version", sa.String(32), nullable=False),
    sa.Column("registered_at", sa.Float, nullable=False),
    sa.Column("last_heartbeat_at", sa.Float),
    sa.Column("heartbeat_interval", sa.Float, nullable=False),
    sa.Column("heartbeat", sa.JSON),
    sa.UniqueConstraint("account_id", "name", name="uq_machines_account_name"),
)

nonces = sa.Table(
    "nonces", metadata,
    sa.Column("machine_id", sa.String(36), primary_key=True),
    sa.Column("nonce", sa.String(64), primary_key=True),
    sa.Column("seen_at", sa.Float, nullable=False, index=True),
)

work_items = sa.Table(
    "work_items", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("machine_id", sa.String(36), index=True),
    sa.Column("group_name", sa.String(64)),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("claimed_by", sa.String(36)),
    sa.Column("claimed_at", sa.Float),
    sa.Column("done_at", sa.Float),
    sa.Column("result", sa.JSON),
    sa.Index("ix_work_items_open", "account_id", "claimed_by", "created_at"),
)

runbooks = sa.Table(
    "runbooks", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("content", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("params", sa.JSON, nullable=False),
    sa.Column("log_verbose", sa.Boolean, nullable=False),
    sa.Column("log_progress", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("account_id", "name", "version", name="uq_runbooks_version"),
)

jobs = sa.Table(
    "jobs", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("runbook_name", sa.String(128), nullable=False),
    sa.Column("runbook_version", sa.Integer, nullable=False),
    sa.Column("group_name", sa.String(64), nullable=False),
    sa.Column("params", sa.JSON, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("timeout_seconds", sa.Float),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("ended_at", sa.Float),
    sa.Column("machine_id", sa.String(36)),
    sa.Column("lease_expires_at", sa.Float),
    # Failed activations since the job was queued or resumed (the third suspends it, HW-1).
    sa.Column("activations", sa.Integer, nullable=False),
    # The number of the current (or last) attempt; attempts are never renumbered.
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("exit_code", sa.Integer),
    sa.Column("signal", sa.Integer),
    sa.Column("reason", sa.Text),
    sa.Index("ix_jobs_queue", "account_id", "group_name", "status", "created_at"),
    sa.Index("ix_jobs_machine", "machine_id", "status"),
    sa.Index("ix_jobs_lease", "status", "lease_expires_at"),
)

job_attempts = sa.Table(
    "job_attempts", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"),
              nullable=False, index=True),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("machine_id", sa.String(36), nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("ended_at", sa.Float),
    sa.Column("exit_code", sa.Integer),
    sa.Column("signal", sa.Integer),
    sa.Column("reason", sa.Text),
    # Who the runbook ran as, as the agent said ('outpost-job3', 'root (group web asks
    # for root)'); None for an agent that does not say.
    sa.Column("run_as", sa.String(200)),
)

groups = sa.Table(
    "groups", metadata,
    sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    # The user a root agent runs this group's runbooks as (HW-1a); None: the agent's user.
    sa.Column("run_as", sa.String(64)),
    # The group's jobs' limits (None: the agent's defaults): memory (MiB), CPUs, processes.
    sa.Column("memory_mb", sa.Integer),
    sa.Column("cpus", sa.Float),
    sa.Column("max_processes", sa.Integer),
    sa.Column("updated_at", sa.Float, nullable=False),
)

job_records = sa.Table(
    "job_records", metadata,
    sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"),
              primary_key=True),
    # (attempt - 1) << 32 plus the attempt's own count: one order across attempts.
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("stream", sa.String(16), nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
)


def normalise_url(url: str) -> str:
    """Accept plain ``postgresql://`` and ``sqlite:///`` URLs and pick the async drivers."""
    for plain, driver in (
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
        ("sqlite:///", "sqlite+aiosqlite:///"),
    ):
        if url.startswith(plain):
            return driver + url[len(plain):]
    return url


def is_sqlite(url: str) -> bool:
    return normalise_url(url).startswith("sqlite")


def make_engine(url: str) -> AsyncEngine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        # One connection: SQLite has one writer at a time, and with several connections a
        # writer that finds the lock taken sleeps in SQLite's busy handler (tens of
        # milliseconds each time under load) where here it waits its turn in the event
        # loop. Statements take well under a millisecond, so readers lose little by queueing
        # too (bench/throughput.py, variant pool1: 1.2x the jobs per second, 0.82x the hub
        # CPU per job). Nothing may hold a connection while it waits for another.
        # Statements run in the event loop's thread (sqlite_inline.py); the busy timeout is
        # how long one may wait for another process that writes the file (a second hub by
        # mistake, a backup), and the loop waits with it, so it is short.
        path = sa.engine.make_url(url).database or ":memory:"
        engine = create_async_engine(
            url, pool_size=1, max_overflow=0,
            async_creator=lambda: sqlite_inline.connect(path, timeout=5))

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            # WAL lets readers run beside the one writer; NORMAL is durable across a
            # process crash, which is the failure the hub must survive.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_async_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)


MIGRATIONS = Path(__file__).parent / "migrations"


def _alembic_config(connection: sa.Connection) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def _upgrade(connection: sa.Connection) -> None:
    from alembic import command

    command.upgrade(_alembic_config(connection), "head")


def _current_and_head(connection: sa.Connection) -> tuple[str | None, str | None]:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    current = MigrationContext.configure(connection).get_current_revision()
    head = ScriptDirectory.from_config(_alembic_config(connection)).get_current_head()
    return current, head


async def migrate(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade)


async def revisions(engine: AsyncEngine) -> tuple[str | None, str | None]:
    """(current revision of the database, newest revision this hub knows)."""
    async with engine.connect() as conn:
        return await conn.run_sync(_current_and_head)


def migrate_sync(url: str) -> None:
    async def run() -> None:
        engine = make_engine(url)
        try:
            await migrate(engine)
        finally:
            await engine.dispose()

    asyncio.run(run())


# Assets (docs/assets.md): the value of every asset is sealed by the vault; only what an
# operator may see in a listing (kind, name, thumbprint, subject, expiry) is stored in clear.
assets = sa.Table(
    "assets", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("secret", sa.Boolean, nullable=False),
    sa.Column("value", sa.Text, nullable=False),  # sealed by the vault
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("thumbprint", sa.String(40)),
    sa.Column("subject", sa.Text),
    sa.Column("not_after", sa.Float),
    sa.Column("has_private_key", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.UniqueConstraint("account_id", "kind", "name", name="uq_assets_name"),
    sa.Index("ix_assets_thumbprint", "account_id", "thumbprint"),
)


# --- schedules and webhooks (docs/schedules.md) -------------------------------------------

schedules = sa.Table(
    "schedules", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("runbook_name", sa.String(128), nullable=False),
    sa.Column("group_name", sa.String(64), nullable=False),
    sa.Column("params", sa.JSON, nullable=False),
    sa.Column("cron", sa.String(128), nullable=False),
    sa.Column("timezone", sa.String(64), nullable=False),
    sa.Column("spread_seconds", sa.Float, nullable=False),
    sa.Column("offset_seconds", sa.Float, nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False),
    # A cron time plus the offset. Firing moves it with a conditional UPDATE in the same
    # transaction as the job's INSERT: that is what starts each run once.
    sa.Column("next_run_at", sa.Float, nullable=False),
    sa.Column("last_run_at", sa.Float),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("account_id", "name", name="uq_schedules_account_name"),
    sa.Index("ix_schedules_due", "enabled", "next_run_at"),
)

schedule_runs = sa.Table(
    "schedule_runs", metadata,
    sa.Column("schedule_id", sa.String(36), sa.ForeignKey("schedules.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("due_at", sa.Float, primary_key=True),
    sa.Column("fired_at", sa.Float, nullable=False),
    sa.Column("job_id", sa.String(36)),
    # Due runs before this one that were skipped because the hub was down (or late).
    sa.Column("missed", sa.Integer, nullable=False),
    sa.Column("error", sa.Text),
)

webhooks = sa.Table(
    "webhooks", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("runbook_name", sa.String(128), nullable=False),
    sa.Column("group_name", sa.String(64), nullable=False),
    sa.Column("params", sa.JSON, nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),  # SHA-256 only
    sa.Column("expires_at", sa.Float),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("last_used_at", sa.Float),
    sa.Column("last_job_id", sa.String(36)),
    sa.UniqueConstraint("account_id", "name", name="uq_webhooks_account_name"),
)
