"""The hub's checks behind ``outpost hub check``: config, database, migrations, the TLS
certificate, the clock and the disk, run on the hub's machine against its data directory.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from outpost.protocol.checks import (
    Outcome,
    Registry,
    Result,
    disk_outcome,
    error,
    ok,
    run_checks,
    warning,
)
from outpost.protocol.errors import OutpostError

from .config import HubConfig, HubPaths, load_config

CERT_WARNING_DAYS = 30
CLOCK_WARNING_SECONDS = 60.0
CLOCK_ERROR_SECONDS = 900.0  # the window the hub allows signed requests (HW-4)
CONNECT_TIMEOUT = 5.0


def _shown(url: str) -> str:
    """The URL without a password."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"


@dataclass
class HubContext:
    data_dir: Path
    database_url: str | None = None
    tls_cert: Path | None = None
    clock_skew: float = 0.0  # the test hook: this process's clock only
    config: HubConfig | None = None
    engine: Any = None
    db_time: float | None = None
    local_time: float | None = None
    found: dict[str, Any] = field(default_factory=dict)

    @property
    def paths(self) -> HubPaths:
        return HubPaths(self.data_dir)

    @property
    def url(self) -> str:
        return self.database_url or (self.config.database_url if self.config else "")

    @property
    def database_shown(self) -> str:
        return _shown(self.url) if self.url else ""

    def now(self) -> float:
        return time.time() + self.clock_skew


checks: Registry[HubContext] = Registry()


@checks.add("hub-config", "Data directory and config are valid",
            "hub.yaml, master.key and the other files 'outpost hub init' writes")
def hub_config(ctx: HubContext) -> Outcome:
    ctx.config = load_config(ctx.paths)  # hub_not_initialised or config_invalid
    missing = [p.name for p in (ctx.paths.ca_cert, ctx.paths.seed) if not p.exists()]
    if missing:
        return error("hub_not_initialised", f"{ctx.data_dir} lacks {', '.join(missing)}",
                     f"Restore them from a backup of {ctx.data_dir}, or initialise a new hub "
                     f"with 'outpost hub init --data-dir DIR'.")
    return ok(f"{ctx.paths.config}: URL {ctx.config.url}, database "
              f"{_shown(ctx.config.database_url)}", url=ctx.config.url)


async def _db_now(conn: Any, sqlite: bool) -> float:
    import sqlalchemy as sa

    sql = ("SELECT (julianday('now') - 2440587.5) * 86400.0" if sqlite
           else "SELECT EXTRACT(EPOCH FROM clock_timestamp())")
    return float((await conn.execute(sa.text(sql))).scalar_one())


@checks.add("database", "Database is reachable",
            "a connection to the database (the config's, or --database-url) and a query",
            needs=("hub-config",))
async def database(ctx: HubContext) -> Outcome:
    from . import db

    url = ctx.url
    sqlite = db.is_sqlite(url)
    if sqlite:
        path = Path(db.normalise_url(url).split(":///", 1)[1].split("?", 1)[0])
        if not path.exists():  # connecting would create an empty one
            return error("database_unavailable",
                         f"The hub's database file {path} does not exist",
                         "Start the hub ('outpost hub run --data-dir DIR') to create it, or "
                         "pass the right --database-url.", database=ctx.database_shown)
    engine = db.make_engine(url)
    ctx.engine = engine
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            async with engine.connect() as conn:
                before = ctx.now()
                ctx.db_time = await _db_now(conn, sqlite)
                ctx.local_time = (before + ctx.now()) / 2
    except TimeoutError:
        return error("database_unavailable", f"{ctx.database_shown} did not answer within "
                     f"{CONNECT_TIMEOUT:g} s", database=ctx.database_shown)
    except db.DatabaseUnavailable as exc:
        return error("database_unavailable",
                     f"The hub's database could not be reached ({ctx.database_shown}): "
                     f"{exc.detail}", database=ctx.database_shown)
    except Exception as exc:  # the drivers' errors are many; each is "cannot reach it"
        if isinstance(exc, OutpostError):
            raise
        return error("database_unavailable",
                     f"The hub's database could not be reached ({ctx.database_shown}): "
                     f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                     database=ctx.database_shown)
    kind = "SQLite" if sqlite else "PostgreSQL"
    return ok(f"{kind} at {ctx.database_shown} answers", database=ctx.database_shown)


@checks.add("migrations", "Database schema is current",
            "the database's Alembic revision against the newest this hub knows",
            needs=("database",))
async def migrations(ctx: HubContext) -> Outcome:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from . import db

    current, head = await db.revisions(ctx.engine)
    cfg = Config()
    cfg.set_main_option("script_location", str(db.MIGRATIONS))
    known = {s.revision for s in ScriptDirectory.from_config(cfg).walk_revisions()}
    data = {"current": current, "head": head}
    if current == head:
        return ok(f"at revision {current} (the newest)", **data)
    if current is None:
        return error("migrations_pending", "the database holds no Outpost schema yet",
                     "Start the hub once ('outpost hub run'): it creates the schema.", **data)
    if current not in known:
        return error("migrations_pending", f"the database is at revision {current}, which "
                     f"this hub does not know (a newer hub migrated it; this hub's newest "
                     f"is {head})",
                     "Run the hub version that migrated this database, or a newer one.",
                     **data)
    return error("migrations_pending", f"the database is at revision {current}; this hub "
                 f"needs {head}",
                 "Start the hub ('outpost hub run'): it migrates the database at start.",
                 **data)


@checks.add("tls-certificate", "TLS certificate is valid",
            "server.pem (or hub.yaml's tls_cert, or --tls-cert): chains to the hub's CA, "
            "dates, days to expiry",
            needs=("hub-config",))
def tls_certificate(ctx: HubContext) -> Outcome:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    listener = ctx.config.listener_files(ctx.paths)[0] if ctx.config else None
    path = ctx.tls_cert or listener or ctx.paths.server_cert
    try:
        chain = x509.load_pem_x509_certificates(path.read_bytes())
        cert = chain[0]
        ca = x509.load_pem_x509_certificate(ctx.paths.ca_cert.read_bytes())
    except (OSError, ValueError) as exc:
        return error("hub_certificate_invalid", f"cannot read {path}: {exc}")
    now = dt.datetime.fromtimestamp(ctx.now(), dt.timezone.utc)
    not_after = cert.not_valid_after_utc
    days = (not_after - now).total_seconds() / 86400
    data: dict[str, Any] = {"path": str(path), "subject": cert.subject.rfc4514_string(),
                            "not_after": not_after.isoformat(), "days_left": round(days, 1)}

    def issued_by_ca(index: int) -> bool:
        """chain[0] issued by chain[1] ... by chain[index], which the CA issued."""
        try:
            for link, issuer in zip(chain[:index], chain[1:index + 1], strict=True):
                link.verify_directly_issued_by(issuer)
            chain[index].verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    # A chain given to 'hub init --tls-cert' may pass through intermediates to its root.
    if not any(issued_by_ca(i) for i in range(len(chain))):
        return error("hub_certificate_invalid",
                     f"{path} was issued by '{cert.issuer.rfc4514_string()}', not by the "
                     f"hub's CA ({ca.subject.rfc4514_string()}) that agents pin; they will "
                     f"refuse it (HW-7)", **data)
    if now < cert.not_valid_before_utc:
        return error("hub_certificate_invalid", f"{path} is not valid before "
                     f"{cert.not_valid_before_utc.isoformat()} (check the clock too)", **data)
    if days < 0:
        return error("hub_certificate_invalid", f"{path} expired on {not_after.date()}",
                     **data)
    if days < CERT_WARNING_DAYS:
        return warning("hub_certificate_expiring", f"{path} expires on {not_after.date()}, "
                       f"in {days:.0f} days", **data)
    return ok(f"{path}: issued by the hub's CA, valid until {not_after.date()} "
              f"({days:.0f} days)", **data)


@checks.add("clock", "Clock is sane",
            "this machine's clock against the database's, and not before the CA was made",
            needs=("database",), scenarios=("HW-4",))
def clock(ctx: HubContext) -> Outcome:
    from cryptography import x509

    assert ctx.db_time is not None and ctx.local_time is not None
    skew = ctx.local_time - ctx.db_time
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    data = {"skew_seconds": round(skew, 3), "local_time": ctx.local_time,
            "database_time": ctx.db_time}
    text = (f"this machine reads {time.strftime(fmt, time.gmtime(ctx.local_time))}, the "
            f"database {time.strftime(fmt, time.gmtime(ctx.db_time))} ({abs(skew):.0f} s "
            f"apart)")
    fix = ("Synchronise the clocks of the hub's machine and the database server with NTP "
           "('timedatectl set-ntp true').")
    try:
        ca = x509.load_pem_x509_certificate(ctx.paths.ca_cert.read_bytes())
        if ctx.local_time < ca.not_valid_before_utc.timestamp():
            return error("clock_skew", f"{text}; the clock is earlier than the hub's CA was "
                         f"made ({ca.not_valid_before_utc.isoformat()})", fix, **data)
    except (OSError, ValueError):
        pass  # the tls-certificate check reports an unreadable CA
    if abs(skew) > CLOCK_ERROR_SECONDS:
        return error("clock_skew", f"{text}; signed agent requests are judged by this clock "
                     f"and allow {CLOCK_ERROR_SECONDS / 60:.0f} minutes", fix, **data)
    if abs(skew) > CLOCK_WARNING_SECONDS:
        return warning("clock_skew", f"{text}; more than {CLOCK_WARNING_SECONDS:.0f} s", fix,
                       **data)
    return ok(text, **data)


@checks.add("disk", "Data directory has free disk",
            "free space where the data directory (and a SQLite database) lives")
def disk(ctx: HubContext) -> Outcome:
    return disk_outcome(ctx.data_dir, "hub's data directory")


@checks.add("protections", "Protected machines are Protecting",
            "each protection's health: the newest recovery point's age against its RPO, the "
            "recovery extension's state (docs/recovery.md)",
            needs=("migrations",))
async def protections(ctx: HubContext) -> Outcome:
    from . import recovery

    rows = await recovery.views(ctx.engine, None)
    lines = [f"{r['machine']}: {r['health']}: {r['message']}" for r in rows]
    data = {"protections": [{k: r[k] for k in ("machine", "machine_id", "health", "message",
                                                "state", "last_point_age_seconds",
                                                "extension_state", "extension_step")}
                            for r in rows]}
    if not rows:
        return ok("no machine is protected", **data)
    failed = [r for r in rows if r["health"] == "Failed"]
    behind = [r for r in rows if r["health"] == "Behind"]
    other = [r for r in rows if r["health"] in ("FailedOver", "Paused")]
    text = "; ".join(lines)
    if failed:
        first = failed[0]["machine"]
        return error("recovery_extension_failed", text, f"Read 'outpost protection show "
                     f"{first}' and the extension's log on {first}; once the cause is fixed, "
                     f"reinstall it with 'outpost protect {first} --repair' (the points "
                     "stay).", **data)
    if behind:
        first = behind[0]["machine"]
        return warning("recovery_behind", text, f"Read 'outpost protection show {first}' "
                       "for the cause: start its agent, let the load pass (or raise the "
                       "agent's max_cpu_percent), or repair the extension with 'outpost "
                       f"protect {first} --repair'.", **data)
    if other:
        first = other[0]
        fix = (f"Fail it back once it is Healthy: 'outpost failback {first['machine']} "
               "--wait'." if first["health"] == "FailedOver" else
               f"Enable the extension again: 'outpost extension set recovery --machine "
               f"{first['machine']} --enabled'.")
        return warning("recovery_behind", text, fix, **data)
    return ok(text, **data)


# A forwarding that failed for longer than this is an error (a short blip is a warning).
FORWARD_FAILING_ERROR_SECONDS = 60.0


@checks.add("message-forwarding", "Upstream messages reach the broker",
            "the forwarder's last error and lag (messages.forward in hub.yaml, "
            "docs/messages.md)", needs=("migrations",))
async def message_forwarding(ctx: HubContext) -> Outcome:
    from . import messages

    settings = ctx.config.messages.forward if ctx.config is not None else None
    if settings is None:
        return ok("not configured (messages.forward in hub.yaml)")
    state = await messages.forwarding_state(ctx.engine, settings.target)
    if state is None:
        return warning("message_forwarding_failing", f"forwarding to {settings.url} has "
                       "not run yet", "Start the hub ('outpost hub run'); its leading "
                       "replica forwards.", target=settings.url)
    data = {"target": settings.url, **state}
    if state["failing_since"] is None:
        return ok(f"forwarding to {settings.url}: {state['forwarded']} forwarded, "
                  f"{state['lag']} waiting", **data)
    since = ctx.now() - state["failing_since"]
    text = (f"forwarding to {settings.url} has been failing for {since:.0f} s: "
            f"{state['last_error']}; {state['lag']} messages waiting")
    if since >= FORWARD_FAILING_ERROR_SECONDS:
        return error("message_forwarding_failing", text, **data)
    return warning("message_forwarding_failing", text, **data)


async def _run(ctx: HubContext, on_result: Callable[[Result], None] | None) -> list[Result]:
    try:
        return await run_checks(checks.checks, ctx, on_result)
    finally:
        if ctx.engine is not None:
            await ctx.engine.dispose()


def run(ctx: HubContext,
        on_result: Callable[[Result], None] | None = None) -> list[Result]:
    """Every hub check in order (blocking; the CLI's entry point)."""
    return asyncio.run(_run(ctx, on_result))
