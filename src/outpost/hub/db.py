"""Storage: the tables, the engine, and migrations (Alembic) for SQLite and PostgreSQL.

Times are stored as float seconds since the epoch: the same type and the same comparisons on
both databases, and no time-zone conversion on the hot paths.

The engine is the seam to the drivers. A database that cannot be reached or refuses for a
while (a connection refused or reset, a server shutting down, a SQLite file locked by another
process or unreadable) raises ``DatabaseUnavailable`` (E3007, 503 with Retry-After) whatever
the driver's exception was; every other error passes unchanged. ``Engine.health`` counts
them by kind and logs one line when an outage begins and one when it ends.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from outpost.protocol.errors import OutpostError

from . import sqlite_inline, walcheck

log = logging.getLogger("outpost.hub.db")

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
    # When its agent said it was stopping (a graceful stop); cleared by its next heartbeat
    # from another run of the agent (stopped_run: the run that stopped).
    sa.Column("stopped_at", sa.Float),
    sa.Column("stopped_run", sa.String(32)),
    sa.UniqueConstraint("account_id", "name", name="uq_machines_account_name"),
    # A group's machines: a job's group checked at submission, a fan-out's members.
    sa.Index("ix_machines_group", "account_id", "group_name"),
)

nonces = sa.Table(
    "nonces", metadata,
    sa.Column("machine_id", sa.String(36), primary_key=True),
    sa.Column("nonce", sa.String(64), primary_key=True),
    sa.Column("seen_at", sa.Float, nullable=False, index=True),
)

# Keys of requests that create work (hub/idempotency.py): a repeat gets what the first made.
idempotency_keys = sa.Table(
    "idempotency_keys", metadata,
    sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("route", sa.String(64), nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),  # job, jobs, fanout
    sa.Column("ids", sa.JSON, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False, index=True),
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
    # A child of a job on every machine of a group (hub/fanout.py): its parent, and the one
    # machine that may claim it.
    sa.Column("parent_id", sa.String(36)),
    sa.Column("target_machine_id", sa.String(36)),
    # Which count of its parent's fanouts row holds a child: 'held' (waiting), 'busy'
    # (released, holding a slot) or 'done' (its end is counted); null for other jobs.
    sa.Column("slot", sa.String(8)),
    sa.Index("ix_jobs_queue", "account_id", "group_name", "status", "created_at"),
    sa.Index("ix_jobs_parent", "parent_id", "status", "created_at"),
    sa.Index("ix_jobs_machine", "machine_id", "status"),
    sa.Index("ix_jobs_lease", "status", "lease_expires_at"),
)

# A job on every machine of a group: the parent's row in jobs holds the runbook and the
# aggregate status; this holds its rate control (hub/fanout.py, docs/jobs.md).
fanouts = sa.Table(
    "fanouts", metadata,
    sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("children", sa.Integer, nullable=False),
    # Children on machines at once, as given ('10', '10%') and as worked out at submission.
    sa.Column("concurrency_given", sa.String(16), nullable=False),
    sa.Column("max_concurrency", sa.Integer, nullable=False),
    # Failed children that may pass before dispatching stops; None: no limit.
    sa.Column("errors_given", sa.String(16)),
    sa.Column("max_errors", sa.Integer),
    # Why no further child is started (the error threshold passed, the operator stopped it).
    sa.Column("halted", sa.Text),
    sa.Column("halted_at", sa.Float),
    sa.Column("stopped_at", sa.Float),
    # Running counts of the children, kept in the transaction that moves one (hub/fanout.py):
    # held back, released and not ended (holding a slot), and ended by final status.
    sa.Column("waiting", sa.Integer, nullable=False, server_default="0"),
    sa.Column("busy", sa.Integer, nullable=False, server_default="0"),
    sa.Column("completed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("stopped", sa.Integer, nullable=False, server_default="0"),
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
    # True on each piece of a line longer than a record but its last (agent/runner.py).
    sa.Column("continues", sa.Boolean(create_constraint=False)),
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


class DatabaseUnavailable(OutpostError):
    """The database could not be reached, or refused for a while: E3007, answered 503 with
    Retry-After. ``kind`` names the failure (refused, reset, closed, timeout, dns,
    unreachable, shutdown, busy, pool, locked, unreadable, full); ``detail`` is the driver's
    own text, for the hub's log (not sent: it may name the database's address)."""

    retry_after = 2  # seconds: a client that waits for the hub asks again this soon

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__("database_unavailable", f"The hub's database could not be reached "
                         f"({kind}); try again in a few seconds.", kind=kind)
        self.kind = kind
        self.detail = detail


class HubOverloaded(DatabaseUnavailable):
    """No pooled connection came free in time: the database answers, this process is the
    limit (E3013, answered 503 with Retry-After like an outage, and not logged as one)."""

    def __init__(self, waited: float, detail: str) -> None:
        OutpostError.__init__(self, "hub_overloaded", waited=round(waited))
        self.message = (f"The hub is overloaded: the request waited {waited:.0f} s for a "
                        "database connection; try again in a few seconds.")
        self.kind = "pool"
        self.detail = detail


# SQLite's primary result codes (the low byte of sqlite_errorcode) that a file locked by
# another process, or one the hub cannot open, read or grow, gives; they pass when the other
# process lets go or the operator frees the disk or fixes the permissions. CORRUPT and NOTADB
# do not pass: they stay errors.
_SQLITE_KINDS = {5: "locked", 6: "locked", 3: "unreadable", 8: "unreadable",
                 10: "unreadable", 14: "unreadable", 13: "full"}
# PostgreSQL's SQLSTATEs for a connection that failed (class 08), a server going down or
# starting (57P01-57P03) and one with no connection slot left (53300).
_PG_KINDS = {"57P01": "shutdown", "57P02": "shutdown", "57P03": "shutdown", "53300": "busy"}
# A socket's errors on the way to the server (a file's errors, say, are no outage).
_UNREACHABLE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN,
                errno.ETIMEDOUT, errno.EADDRNOTAVAIL}


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception, what SQLAlchemy wrapped, and what each was raised from."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo and len(seen) < 8:
        item = todo.pop(0)
        if item is None or any(item is s for s in seen):
            continue
        seen.append(item)
        todo += [getattr(item, "orig", None), item.__cause__, item.__context__]
    return seen


def outage_kind(exc: BaseException) -> str | None:
    """The kind of outage ``exc`` (from a driver, through SQLAlchemy or not) says the database
    is in; None when it is not one (a constraint, a bad statement, a bug)."""
    if isinstance(exc, OutpostError) and not isinstance(exc, DatabaseUnavailable):
        return None  # the hub's own answer (a refusal, a conflict), whatever it came from
    for item in _chain(exc):
        if isinstance(item, DatabaseUnavailable):
            return item.kind
        if isinstance(item, sa.exc.DBAPIError) and item.connection_invalidated:
            return "reset"
        if isinstance(item, sa.exc.TimeoutError):  # no pooled connection came free in time
            return "pool"
        if isinstance(item, sqlite3.Error):
            code = getattr(item, "sqlite_errorcode", None)
            kind = _SQLITE_KINDS.get(code & 0xFF) if isinstance(code, int) else None
            if kind is None and "database is locked" in str(item):
                kind = "locked"
            if kind is not None:
                return kind
            continue
        state = getattr(item, "sqlstate", None)
        if isinstance(state, str):
            if state.startswith("08"):
                return "closed"
            if state in _PG_KINDS:
                return _PG_KINDS[state]
        if isinstance(item, ConnectionRefusedError):
            return "refused"
        if isinstance(item, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
            return "reset"
        if isinstance(item, TimeoutError):
            return "timeout"
        if isinstance(item, socket.gaierror):
            return "dns"
        if isinstance(item, OSError) and item.errno in _UNREACHABLE:
            return "unreachable"
        if type(item).__module__.startswith("asyncpg") and \
                "connection is closed" in str(item):
            return "closed"
    return None


class Health:
    """What this hub process has seen of its database: outages counted by kind, and one log
    line as an outage begins and one as it ends (not one a failed request)."""

    def __init__(self) -> None:
        self.failures = 0
        self.by_kind: dict[str, int] = {}
        self.down_since: float | None = None  # time.monotonic() of the outage's first failure
        self.overload_logged = -1e9
        self.listeners: list[Callable[[str], None]] = []

    def failed(self, exc: DatabaseUnavailable) -> None:
        self.by_kind[exc.kind] = self.by_kind.get(exc.kind, 0) + 1
        for listener in self.listeners:
            listener(exc.kind)
        if isinstance(exc, HubOverloaded):
            # Not an outage: the database answers, this process is the limit.
            now = time.monotonic()
            if now - self.overload_logged > 60:
                self.overload_logged = now
                log.warning("overloaded: a request waited %.0f s for a database connection "
                            "and was answered 503 E3013 (more requests than this hub "
                            "process serves; see docs/hub.md, 'A large fleet')",
                            float(exc.details.get("waited", 0)))
            return
        self.failures += 1
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.error("database unavailable (%s): %s; requests that need it answer 503 "
                      "E3007 until it is back", exc.kind, exc.detail)

    def ok(self) -> None:
        if self.down_since is not None:
            log.warning("database reachable again after %.1f s",
                        time.monotonic() - self.down_since)
            self.down_since = None


def _detail(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {text[0] if text else ''}"[:300]


def _pool_timeout(engine: AsyncEngine) -> float:
    return float(getattr(engine.sync_engine.pool, "_timeout", 30.0))


def _translated(engine: AsyncEngine, exc: BaseException) -> DatabaseUnavailable | None:
    kind = outage_kind(exc)
    if kind is None:
        return None
    if isinstance(exc, DatabaseUnavailable):
        unavailable = exc
    elif kind == "pool":
        unavailable = HubOverloaded(_pool_timeout(engine), _detail(exc))
    else:
        unavailable = DatabaseUnavailable(kind, _detail(exc))
    if isinstance(engine, Engine) and unavailable is not exc:
        engine.health.failed(unavailable)
    return unavailable


class Connection(AsyncConnection):
    """An ``AsyncConnection`` whose failures to reach the database, on connecting, in the
    ``async with`` body, or on commit, rollback or close, come out as DatabaseUnavailable."""

    __slots__ = ()

    async def start(self, is_ctxmanager: bool = False) -> AsyncConnection:
        try:
            return await super().start(is_ctxmanager)
        except Exception as exc:
            unavailable = _translated(self.engine, exc)
            if unavailable is None or unavailable is exc:
                raise
            raise unavailable from exc

    async def __aexit__(self, type_: Any, value: Any, traceback: Any) -> None:
        try:
            await super().__aexit__(type_, value, traceback)
        except Exception as exc:
            if value is None:  # the body went well, the close did not
                value = exc
        if value is None:
            if isinstance(self.engine, Engine):
                self.engine.health.ok()
            return
        unavailable = _translated(self.engine, value)
        if unavailable is not None and unavailable is not value:
            raise unavailable from value
        if type_ is None:
            raise value  # the close failed for another reason


class Engine(AsyncEngine):
    """The hub's engine: connections translate the drivers' outages (Connection), and
    ``health`` tells what this process has seen of them."""

    __slots__ = ("health", "notifier", "checkpointer")
    _connection_cls = Connection

    def __init__(self, sync_engine: sa.Engine) -> None:
        super().__init__(sync_engine)
        self.health = Health()
        self.notifier: Any = None  # notify.Notifier, attached by the hub (notify.attach)
        # walcheck.Checkpointer: SQLite's log checkpointed off the event loop (the hub's).
        self.checkpointer: Any = None


def make_engine(url: str, *, checkpoint_off_loop: bool = False) -> Engine:
    """The engine for ``url``. ``checkpoint_off_loop`` (the hub server, on an SQLite file):
    its connection never checkpoints SQLite's log on commit, and ``engine.checkpointer``
    does it on a worker thread once started (walcheck.py)."""
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
        engine = Engine(create_async_engine(
            url, pool_size=1, max_overflow=0,
            async_creator=lambda: sqlite_inline.connect(path, timeout=5)).sync_engine)
        off_loop = checkpoint_off_loop and path != ":memory:" and not path.startswith("file:")
        if off_loop:
            engine.checkpointer = walcheck.Checkpointer(path)

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            # WAL lets readers run beside the one writer; NORMAL is durable across a
            # process crash, which is the failure the hub must survive.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            walcheck.connection_pragmas(cur, checkpoints_elsewhere=off_loop)
            cur.close()

        return engine
    # A connection attempt that gets no answer (a server or network that drops packets
    # rather than refusing) fails after 10 s, not asyncpg's 60.
    return Engine(create_async_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True,
                                      connect_args={"timeout": 10}).sync_engine)


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
    # What it starts: a runbook (on one machine of the group), or an extension's operation
    # (on every machine of the group, or on one machine by name).
    sa.Column("runbook_name", sa.String(128)),
    sa.Column("group_name", sa.String(64)),
    sa.Column("machine_name", sa.String(64)),
    sa.Column("extension", sa.String(64)),
    sa.Column("operation", sa.String(64)),
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
    # An extension operation's run: operations asked (one per machine), machines skipped.
    sa.Column("operations", sa.Integer),
    sa.Column("skipped", sa.Integer),
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


# --- extensions (docs/extensions.md) --------------------------------------------------------

# A published package: its bytes, kept in the database that every replica shares. A version
# is immutable (publishing it again with other bytes is refused).
extension_packages = sa.Table(
    "extension_packages", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("manifest", sa.JSON, nullable=False),
    sa.Column("blob", sa.LargeBinary, nullable=False),
    sa.Column("published_at", sa.Float, nullable=False),
    sa.UniqueConstraint("account_id", "name", "version", name="uq_extension_packages_version"),
)

# What a group or a machine (by name) should have; a machine's goal overrides its group's
# for the same extension. Protected settings are sealed by the vault.
extension_goals = sa.Table(
    "extension_goals", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("target_kind", sa.String(16), nullable=False),  # group or machine
    sa.Column("target", sa.String(64), nullable=False),
    sa.Column("version", sa.String(64)),  # None: the newest published version
    sa.Column("settings", sa.JSON, nullable=False),
    sa.Column("protected", sa.Text),  # sealed by the vault
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("run_as", sa.String(64)),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.UniqueConstraint("account_id", "name", "target_kind", "target",
                        name="uq_extension_goals_target"),
)

# 'extension retry' on one machine: a failed version is tried again once this changes.
extension_retries = sa.Table(
    "extension_retries", metadata,
    sa.Column("machine_id", sa.String(36), sa.ForeignKey("machines.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("retry", sa.BigInteger, nullable=False),
)

# What each machine's agent last reported of each extension (the newest changed_at wins).
extension_states = sa.Table(
    "extension_states", metadata,
    sa.Column("machine_id", sa.String(36), sa.ForeignKey("machines.id", ondelete="CASCADE"),
              primary_key=True),
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

# --- edge modules (docs/modules.md) ----------------------------------------------------------
# A published module package: as extension_packages, its bytes in the shared database.
module_packages = sa.Table(
    "module_packages", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("manifest", sa.JSON, nullable=False),
    sa.Column("blob", sa.LargeBinary, nullable=False),
    sa.Column("published_at", sa.Float, nullable=False),
    sa.UniqueConstraint("account_id", "name", "version", name="uq_module_packages_version"),
)

# A deployment aimed at a group or a machine (by name); the highest priority that targets a
# machine is the one it runs. ``source``: the manifest as the operator sent it; ``manifest``:
# as validated, every package pinned to a version and SHA-256.
deployments = sa.Table(
    "deployments", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("target_kind", sa.String(16), nullable=False),  # group or machine
    sa.Column("target", sa.String(64), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("manifest", sa.JSON, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.UniqueConstraint("account_id", "name", name="uq_deployments_name"),
)

# What each machine's agent last fetched of its deployment and last reported of its modules
# (a ModulesReport; replaced only by one whose reported_at is not older).
module_reports = sa.Table(
    "module_reports", metadata,
    sa.Column("machine_id", sa.String(36), sa.ForeignKey("machines.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("fetched_at", sa.Float),
    sa.Column("fetched_deployment", sa.String(64)),
    sa.Column("fetched_version", sa.Integer),
    sa.Column("report", sa.JSON),
    sa.Column("reported_at", sa.Float),
    sa.Column("received_at", sa.Float),
)

# --- extension operations (docs/extensions.md, "Operations") -------------------------------
# An operation asked of an extension on one machine, run by its agent as an ext_op work
# item; item_id is the work item of the current attempt (None: not handed out yet).
extension_operations = sa.Table(
    "extension_operations", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("machine_id", sa.String(36), sa.ForeignKey("machines.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("extension", sa.String(64), nullable=False),
    sa.Column("version", sa.String(64)),
    sa.Column("operation", sa.String(64), nullable=False),
    sa.Column("params", sa.JSON, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # Queued|Waiting|Running|Succeeded|Failed
    sa.Column("code", sa.String(32)),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("next_try_at", sa.Float),
    sa.Column("item_id", sa.String(36)),
    sa.Column("requested_by", sa.String(128)),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("ended_at", sa.Float),
    sa.Column("output", sa.Text, nullable=False),
    sa.Column("result", sa.JSON),
    sa.Column("start_deadline", sa.Float),
    sa.Column("expected_end", sa.Float),
    # How long the agent held it back for the machine's load, and its last reason (EX-7).
    sa.Column("waiting_since", sa.Float),
    sa.Column("waited_seconds", sa.Float),
    sa.Column("wait_reason", sa.Text),
    # Not handed out before this time (a schedule's offset for the machine); None: at once.
    sa.Column("not_before", sa.Float),
    # The schedule run that asked it: one operation per (run, machine), whoever fires it.
    sa.Column("schedule_id", sa.String(36)),
    sa.Column("schedule_due_at", sa.Float),
    # The run of the agent (its heartbeat's ``run``) that was heartbeating when the operation
    # started: a heartbeat of another run says the process that ran it is gone.
    sa.Column("started_run", sa.String(32)),
    sa.Index("ix_extension_operations_target", "machine_id", "extension", "status"),
    sa.Index("uq_extension_operations_schedule_run", "schedule_id", "schedule_due_at",
             "machine_id", unique=True),
    sa.Index("ix_extension_operations_status", "status"),
)

# An extension uninstalled from one machine while its goal stays (the goal is held back for
# that machine until the next operation asked of it there).
extension_holds = sa.Table(
    "extension_holds", metadata,
    sa.Column("machine_id", sa.String(36), sa.ForeignKey("machines.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("held_at", sa.Float, nullable=False),
)

# --- the backup store (docs/backup.md) ------------------------------------------------------
# One credential per machine for its restic repository on the hub: the token's SHA-256 only.
# Removing the machine removes its credential (the repository's files stay on disk).
backup_credentials = sa.Table(
    "backup_credentials", metadata,
    sa.Column("machine_id", sa.String(36), sa.ForeignKey("machines.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    # Bytes the repository may hold; NULL: the hub's backup_quota_bytes (0: unlimited).
    sa.Column("quota_bytes", sa.BigInteger),
    sa.Column("created_at", sa.Float, nullable=False),
)

# The backup catalog (hub/backup_catalog.py): one row per snapshot the backup extension took,
# filled as its snapshot operation ends; a forget operation marks the rows it removed.
backup_snapshots = sa.Table(
    "backup_snapshots", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("machine_id", sa.String(36), sa.ForeignKey("machines.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("short_id", sa.String(16), nullable=False),  # restic's short id
    sa.Column("snapshot_id", sa.String(64)),  # restic's full id
    sa.Column("op_id", sa.String(36)),  # the operation that took it
    sa.Column("paths", sa.JSON, nullable=False),
    sa.Column("files", sa.BigInteger),
    sa.Column("bytes_added", sa.BigInteger),
    sa.Column("total_bytes", sa.BigInteger),
    sa.Column("duration_seconds", sa.Float),
    sa.Column("consistency", sa.String(16)),  # crash | application
    sa.Column("waited_seconds", sa.Float),
    sa.Column("wait_reason", sa.Text),
    sa.Column("taken_at", sa.Float),  # restic's snapshot time
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("forgotten_at", sa.Float),
    sa.Column("forgotten_by", sa.String(36)),  # the forget operation
    # backup (a backup snapshot) | recovery (a recovery point, hub/recovery.py)
    sa.Column("kind", sa.String(16), nullable=False, server_default="backup"),
    sa.UniqueConstraint("machine_id", "short_id", name="uq_backup_snapshots_machine_short"),
    sa.Index("ix_backup_snapshots_account", "account_id", "created_at"),
)

# A read-only grant to one machine's repository for one restore operation running on another
# machine of the account (``outpost backup restore --to``): the token's SHA-256 only. It
# opens the source repository while that operation runs, until expires_at at the latest.
backup_grants = sa.Table(
    "backup_grants", metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("op_id", sa.String(36), sa.ForeignKey("extension_operations.id",
                                                    ondelete="CASCADE"),
              nullable=False, unique=True),
    sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("machine_id", sa.String(36), sa.ForeignKey("machines.id", ondelete="CASCADE"),
              nullable=False),  # the machine that restores
    sa.Column("source_machine_id", sa.String(36),
              sa.ForeignKey("machines.id", ondelete="CASCADE"), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)

# --- disaster recovery (hub/recovery.py, docs/recovery.md) ---------------------------------
# One protection per machine: what its recovery points hold, how often they are taken, where
# it fails over to, and where it stands (Protecting, Paused, FailedOver). ``point_op_id`` is
# the last operation the point pass asked (a point or a prune) and ``next_point_at`` when it
# asks the next; the pass claims a turn by a conditional update of ``next_point_at``.
protections = sa.Table(
    "protections", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("machine_id", sa.String(36), sa.ForeignKey("machines.id", ondelete="CASCADE"),
              nullable=False, unique=True),
    sa.Column("paths", sa.JSON, nullable=False),
    sa.Column("exclude", sa.JSON, nullable=False),
    sa.Column("rpo_seconds", sa.Float, nullable=False),
    sa.Column("interval_seconds", sa.Float, nullable=False),
    sa.Column("app_consistent_every", sa.Integer, nullable=False),  # 0: never
    sa.Column("points_asked", sa.Integer, nullable=False),
    sa.Column("pre_script_runbook", sa.String(128)),
    sa.Column("post_failover_runbook", sa.String(128)),
    sa.Column("target_group", sa.String(64)),
    sa.Column("retention", sa.String(32)),  # a restic duration (24h, 7d); None: keep all
    sa.Column("state", sa.String(16), nullable=False),  # Protecting | FailedOver
    sa.Column("active_machine_id", sa.String(36)),  # the machine failed over to
    sa.Column("next_point_at", sa.Float),
    sa.Column("point_op_id", sa.String(36)),
    sa.Column("last_prune_at", sa.Float),
    sa.Column("reason", sa.Text),  # why the last point could not be asked
    sa.Column("created_by", sa.String(128)),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_by", sa.String(128)),
    sa.Column("updated_at", sa.Float, nullable=False),
)

# A failover, test failover or failback: a multi-step action the hub's periodic pass
# advances (hub/actions.py). ``op_id``/``job_id``: the extension operation or job the
# current step waits on.
recovery_actions = sa.Table(
    "recovery_actions", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("machine_id", sa.String(36), sa.ForeignKey("machines.id", ondelete="CASCADE"),
              nullable=False),  # the protected machine
    sa.Column("kind", sa.String(16), nullable=False),  # failover | test | failback
    sa.Column("target_machine_id", sa.String(36), nullable=False),  # where it recovers
    sa.Column("point", sa.String(64)),  # the recovery point (restic's full id)
    sa.Column("target_dir", sa.String(4096)),  # where the point is restored
    sa.Column("status", sa.String(16), nullable=False),
    # Queued|Restoring|RunningRunbook|Succeeded|Failed
    sa.Column("step", sa.String(32), nullable=False),
    sa.Column("op_id", sa.String(36)),
    sa.Column("job_id", sa.String(36)),
    sa.Column("code", sa.String(32)),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("output", sa.JSON, nullable=False),  # lines
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("requested_by", sa.String(128)),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("ended_at", sa.Float),
    sa.Index("ix_recovery_actions_account", "account_id", "created_at"),
    sa.Index("ix_recovery_actions_status", "status"),
)

# Upstream messages: what machines' modules sent ``INTO $upstream`` (hub/messages.py). The id
# orders them as they were committed (writes take a lock on PostgreSQL), so a reader's or the
# forwarder's cursor never passes a row that commits later.
ROW_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")  # SQLite's rowid autoincrements
upstream_messages = sa.Table(
    "upstream_messages", metadata,
    sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
    sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("machine_id", sa.String(36), sa.ForeignKey("machines.id", ondelete="CASCADE"),
              nullable=False),
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
    sa.Index("ix_upstream_messages_account", "account_id", "id"),
    sa.Index("ix_upstream_messages_received_at", "received_at"),
)

# Per machine: the highest seq the hub holds (what a batch is acknowledged with, kept when
# retention prunes the rows) and the messages its agent dropped when their TTL passed.
upstream_machines = sa.Table(
    "upstream_machines", metadata,
    sa.Column("machine_id", sa.String(36), sa.ForeignKey("machines.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("accepted_through", sa.BigInteger, nullable=False),
    sa.Column("dropped_expired", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

# The forwarder's cursor (the last message id published and confirmed) and its state.
message_forwarding = sa.Table(
    "message_forwarding", metadata,
    sa.Column("target", sa.String(64), primary_key=True),  # "nats"
    sa.Column("cursor", sa.BigInteger, nullable=False),
    sa.Column("forwarded", sa.BigInteger, nullable=False),
    sa.Column("last_error", sa.Text),
    sa.Column("failing_since", sa.Float),
    sa.Column("updated_at", sa.Float, nullable=False),
)
