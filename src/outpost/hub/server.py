"""Running the hub: migrations, seeding, TLS, and uvicorn on a socket bound up front."""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from outpost.extensions import publish_shipped
from outpost.protocol import ports
from outpost.protocol.errors import OutpostError

from . import accounts, db, gcwatch, tlsread
from .app import create_app
from .state import Hub
from .config import HubPaths, load_config, read_seed


@dataclass
class RunOptions:
    data_dir: Path
    bind: str | None = None
    database_url: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    min_agent_version: str | None = None
    heartbeat_interval: float | None = None
    event_loop: str = "asyncio"


async def prepare(paths: HubPaths, database_url: str) -> Hub:
    config = load_config(paths)
    engine = db.make_engine(database_url, checkpoint_off_loop=True)
    try:
        await db.migrate(engine)
        await accounts.seed(engine, read_seed(paths))
    except db.DatabaseUnavailable as exc:
        await engine.dispose()
        raise OutpostError("database_unavailable", f"The hub's database could not be "
                           f"reached ({exc.kind}): {exc.detail}") from exc
    except OSError as exc:
        await engine.dispose()
        raise OutpostError("database_unavailable",
                           f"The hub's database could not be reached: {exc}") from exc
    except Exception as exc:
        await engine.dispose()
        if type(exc).__module__.startswith(("sqlalchemy", "asyncpg", "sqlite3")):
            raise OutpostError("database_unavailable",
                               f"The hub's database could not be reached: {exc}") from exc
        raise
    hub = Hub(paths, config, engine)
    await publish_shipped(hub.extensions, read_seed(paths)["account_id"])
    return hub


# Each agent holds up to two connections (its long-poll and its heartbeat's, both kept alive
# between requests) and each is a descriptor: a fleet needs about two per agent.
FDS_PER_AGENT = 2
FDS_SPARE = 200

# asyncio's TLS transport gives every connection a 256 KiB read buffer, zero-filled and so
# resident: 285 KiB an idle agent's connection, 2.8 GiB for 10,000. A TLS record carries at
# most 16 KiB, so a 16 KiB buffer reads whole records; an idle connection then costs about
# 49 KiB (bench/fleet.py --tls-memory; bench/README.md, "A fleet of agents"). On uvloop's
# loop (--event-loop uvloop) its own TLS buffers apply: 37 KiB an idle connection, but
# 138 KiB an agent of a busy fleet of 10,000 (1,475 MiB against 795 on asyncio's).
TLS_READ_BUFFER = 16 * 1024


# The collector's thresholds. With Python's (700, 10, 10) a young collection ran every 700
# allocations, so whatever a request held for a millisecond was seen alive twice and moved
# to the oldest generation, and full collections, each walking every object of every
# connection, came every few seconds: at 5,000 agents nine in 65 s, each stopping the hub
# for about half a second (gcwatch.py; bench/fleet.py prints them). Short-lived objects
# now die by their reference counts before a collection sees them.
GC_THRESHOLDS = (50_000, 20, 100)
GC_REWALK_SECONDS = 3600.0  # how often a full collection walks the frozen objects again


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft limit on open descriptors to the hard limit: (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return soft, soft
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, target


def agents_for(fds: int) -> int:
    """How many agents a descriptor limit serves."""
    return max(0, (fds - FDS_SPARE) // FDS_PER_AGENT)


# The event loops the hub runs on: asyncio's own (the default) or uvloop's (libuv's). uvloop
# changed nothing measurable in the backup store's throughput (docs/backup.md, "The event
# loop"), cut the hub's CPU per dispatched job a little, and nearly doubled the hub's memory
# at 10,000 agents (its TLS buffers grow as reads touch them: 1,475 MiB against 795 MiB;
# bench/README.md): asyncio's loop with 16 KiB TLS read buffers stays the default.
EVENT_LOOPS = ("asyncio", "uvloop")


def loop_factory(choice: str) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """The factory of the event loop ``choice`` names (None: asyncio's own) and the name of
    the one it gives: asyncio's where uvloop cannot be imported."""
    if choice == "asyncio":
        return None, "asyncio"
    try:
        import uvloop
    except ImportError:
        return None, "asyncio"
    return uvloop.new_event_loop, "uvloop"


def small_tls_buffers() -> None:
    # Larger only while a connection's reads fill it (a large body): tlsread.py.
    tlsread.install(TLS_READ_BUFFER)


# TLS 1.2 only with forward secrecy and an AEAD cipher; TLS 1.3's suites are all of that kind.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class _Config(uvicorn.Config):
    def load(self) -> None:
        super().load()
        if self.ssl is not None:
            client_cipher_order(self.ssl)


def client_cipher_order(context: ssl.SSLContext) -> None:
    """Let the client pick among the hub's ciphers (every one strong: TLS12_CIPHERS and TLS
    1.3's): a client with AES instructions then takes AES-128-GCM (restic does), which costs
    both ends about half the CPU of AES-256-GCM, the server's first choice. A backup's upload
    and a restore's download through the hub are bulk TLS (docs/backup.md, "Performance")."""
    context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE


class _Server(uvicorn.Server):
    def __init__(self, hub: Hub, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.hub = hub

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Long-polls would otherwise hold the graceful shutdown for their whole wait.
        await self.hub.notifier.close()
        await super().shutdown(sockets)


def run(options: RunOptions) -> None:
    paths = HubPaths(options.data_dir)
    config = load_config(paths)
    if options.min_agent_version:
        config.min_agent_version = options.min_agent_version
    if options.heartbeat_interval:
        config.heartbeat_interval = options.heartbeat_interval
    bind = options.bind or config.bind
    database_url = options.database_url or config.database_url
    cert, key = config.listener_files(paths)
    cert, key = options.tls_cert or cert, options.tls_key or key
    sock = ports.bind(bind)
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    log = logging.getLogger("outpost.hub")
    before, after = raise_fd_limit()
    log.info("open descriptors: limit %d%s, enough for about %d agents (%d each while "
             "they run jobs; about %d idle ones, which hold one)", after,
             f" (raised from {before})" if after != before else "", agents_for(after),
             FDS_PER_AGENT, agents_for(after) * FDS_PER_AGENT)
    factory, loop_name = loop_factory(options.event_loop)
    if loop_name != options.event_loop:
        log.warning("uvloop cannot be imported here: the hub runs on asyncio's event loop "
                    "(pip install 'outpost-fleet[hub]' brings it)")
    if factory is None:
        small_tls_buffers()  # uvloop's TLS has buffers of its own (docs/architecture.md)

    async def main() -> None:
        hub = await prepare(paths, database_url)
        hub.config = config
        server = _Server(hub, _Config(
            create_app(hub), ssl_certfile=str(cert), ssl_keyfile=str(key),
            ssl_ciphers=TLS12_CIPHERS,
            log_level="warning", access_log=False, lifespan="on",
            timeout_graceful_shutdown=3, timeout_keep_alive=75,
        ))
        log.info("hub listening on https://%s (database %s, event loop %s)", bind,
                 database_url.split("@")[-1], loop_name)
        # What start-up made (modules, the app, SQLAlchemy's and pydantic's tables) lives
        # as long as the process: out of the collector's sight, a full collection walks only
        # what requests made since. It walked everything, for 190 ms with the event loop
        # stopped, in the middle of a large report (/healthz waited that long).
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        gcwatch.install(hub.registry)
        # And so is what lives through a collection (connections, waiting long-polls), with a
        # young collection ten times a second: at 10,000 agents each collection walked millions
        # of them, 0.05-1 s with the loop stopped (gcwatch.Freezer).
        hub.gc_freezer = gcwatch.install_freezer(0, GC_REWALK_SECONDS)
        await server.serve(sockets=[sock])

    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(main())
    finally:
        sock.close()
