"""Upstream messages at the hub: stored once per (machine, seq), read by operators, pruned,
and forwarded to a NATS server or an MQTT 5 broker.

A machine's agent posts the messages its modules sent ``INTO $upstream`` in batches
(``UpstreamBatch``). A batch sent again after a lost answer is not doubled: each machine's
highest stored seq is kept (``upstream_machines.accepted_through``) and only the messages
above it are written, and the table's unique (machine_id, seq) is the second guard. Many
agents' batches are written in one transaction (``batching.Batcher``).

The message id is the order everything reads in. On PostgreSQL each write takes a
transaction-level advisory lock, so ids are handed out in the order transactions commit: a
reader's cursor (``after``) or the forwarder's never passes a row that commits later with a
lower id. SQLite has one writer anyway.

Forwarding (``Forwarder``) runs on the replica that leads (hub/leader.py): it publishes the
messages above its cursor in order with the plain NATS text protocol (``HPUB``, headers
carry the properties), confirms them with a ``PING``/``PONG`` round trip (the server has
taken every message before it answers), and only then moves the cursor in the database.
So a hub restart, a NATS outage or a change of leader resumes from the cursor: delivery
is at least once (a message published before a failure and not yet confirmed is published
again), in order, and each carries ``Nats-Msg-Id`` so a JetStream stream drops the repeat.
To an MQTT broker (hub/mqtt.py) the same holds with QoS 1: the cursor moves once the broker
acknowledged every message of the batch (PUBACK); the headers travel as user properties.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import random
import re
import ssl
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from outpost import __version__
from outpost.protocol.errors import OutpostError
from outpost.protocol.modules import UpstreamBatch

from . import db, notify
from .batching import Batch, Batcher
from .config import MessageForward, MessagesSettings
from .db import machines, message_forwarding, upstream_machines, upstream_messages
from .mqtt import MqttError, MqttLink

log = logging.getLogger("outpost.hub.messages")

WINDOW = 0.005  # how long a batch of agents' writes collects before it commits
# pg_advisory_xact_lock's key: "upmsg" in ASCII, taken by every write of messages.
LOCK_KEY = int.from_bytes(b"upmsg", "big")
_LOCK = sa.text("SELECT pg_advisory_xact_lock(:key)")
LIMIT_MAX = 1000


# --- storing ----------------------------------------------------------------------------
SEQ_MAX = 2**63 - 1  # the column's range
# The longest value each text column holds.
TEXT_MAX = {"module": 128, "output": 128, "content_type": 255, "message_id": 255,
            "correlation_id": 255}


def _invalid(index: int, problem: str, **details: Any) -> OutpostError:
    return OutpostError("upstream_batch_invalid", f"The batch of upstream messages is not "
                        f"valid: messages[{index}]{problem}.", index=index, **details)


def _decoded(batch: UpstreamBatch) -> list[dict[str, Any]]:
    """The batch's messages as rows, their order, sizes and bodies checked (E9190)."""
    rows: list[dict[str, Any]] = []
    last = -1
    for index, message in enumerate(batch.messages):
        if message.seq > SEQ_MAX:
            raise _invalid(index, f" has seq {message.seq}, above {SEQ_MAX}")
        for name, most in TEXT_MAX.items():
            value = getattr(message, name)
            if value is not None and len(value) > most:
                raise _invalid(index, f".{name} is {len(value)} characters long, at most "
                               f"{most}", field=name)
        if message.seq <= last:
            raise _invalid(index, f" has seq {message.seq}, not above the {last} before "
                           "it", seq=message.seq)
        last = message.seq
        try:
            body = base64.b64decode(message.body, validate=True)
        except (binascii.Error, ValueError):
            raise _invalid(index, ".body is not base64", seq=message.seq) from None
        rows.append({"seq": message.seq, "module": message.module, "output": message.output,
                     "properties": message.properties, "content_type": message.content_type,
                     "message_id": message.message_id,
                     "correlation_id": message.correlation_id, "body": body,
                     "created_at": message.created_at})
    return rows


def _insert_new(dialect: str) -> Any:
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(upstream_messages).on_conflict_do_nothing()
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(upstream_messages).on_conflict_do_nothing()


class MessageWriter(Batcher[str]):
    """Writes the batches that agents post at once in one transaction."""

    def __init__(self, engine: AsyncEngine, window: float = WINDOW) -> None:
        super().__init__(engine, window)
        self._insert = _insert_new(engine.dialect.name)

    async def write(self, batch: Batch[str]) -> None:
        now = time.time()
        async with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                await conn.execute(_LOCK, {"key": LOCK_KEY})
            accounts: set[str] = set()
            for request in batch.rows.values():
                if await _store(conn, self._insert, request, now):
                    accounts.add(request["account_id"])
            if accounts:
                await notify.wake(conn, notify.MESSAGES_ANY,
                                  *(notify.messages(a) for a in sorted(accounts)))


async def _store(conn: AsyncConnection, insert: Any, request: dict[str, Any],
                 now: float) -> bool:
    """One agent's batch written (the messages above its machine's highest seq); whether
    any was new. ``request['accepted_through']`` is set to the machine's highest seq."""
    machine_id = request["machine_id"]
    held = (await conn.execute(sa.select(upstream_machines.c.accepted_through).where(
        upstream_machines.c.machine_id == machine_id))).scalar()
    known = held if held is not None else -1
    new = [row for row in request["rows"] if row["seq"] > known]
    if new:
        await conn.execute(insert, [{**row, "account_id": request["account_id"],
                                     "machine_id": machine_id, "received_at": now}
                                    for row in new])
    through = max([known, *(row["seq"] for row in new)])
    # A batch sent again carries the same dropped count: counted only with new messages,
    # or when it carries none (a batch that only reports drops).
    dropped = request["dropped"] if (new or not request["rows"]) else 0
    if held is None:
        await conn.execute(upstream_machines.insert().values(
            machine_id=machine_id, accepted_through=through, dropped_expired=dropped,
            updated_at=now))
    else:
        await conn.execute(upstream_machines.update().where(
            upstream_machines.c.machine_id == machine_id).values(
            accepted_through=through,
            dropped_expired=upstream_machines.c.dropped_expired + dropped, updated_at=now))
    request["accepted_through"] = through
    request["new"] = len(new)
    return bool(new)


# --- reading ------------------------------------------------------------------------------
def view(row: Any) -> dict[str, Any]:
    return {"id": row.id, "machine": row.machine_name, "seq": row.seq, "module": row.module,
            "output": row.output, "properties": row.properties,
            "content_type": row.content_type, "message_id": row.message_id,
            "correlation_id": row.correlation_id,
            "body": base64.b64encode(row.body).decode(), "created_at": row.created_at,
            "received_at": row.received_at}


async def listing(engine: AsyncEngine, account_id: str, *, machine_id: str | None = None,
                  module: str | None = None, after: int | None = None,
                  limit: int = 100) -> list[dict[str, Any]]:
    """The account's messages: the newest ``limit`` (newest first), or with ``after`` the
    first ``limit`` above that id (oldest first)."""
    um = upstream_messages
    query = (sa.select(um, machines.c.name.label("machine_name"))
             .join(machines, machines.c.id == um.c.machine_id)
             .where(um.c.account_id == account_id))
    if machine_id is not None:
        query = query.where(um.c.machine_id == machine_id)
    if module is not None:
        query = query.where(um.c.module == module)
    if after is not None:
        query = query.where(um.c.id > after).order_by(um.c.id)
    else:
        query = query.order_by(um.c.id.desc())
    async with engine.connect() as conn:
        rows = (await conn.execute(query.limit(limit))).all()
    return [view(row) for row in rows]


async def counters(engine: AsyncEngine, machine_id: str) -> dict[str, int]:
    """A machine's highest stored seq and the messages its agent dropped expired."""
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(upstream_machines).where(
            upstream_machines.c.machine_id == machine_id))).first()
    if row is None:
        return {"accepted_through": -1, "dropped_expired": 0}
    return {"accepted_through": row.accepted_through, "dropped_expired": row.dropped_expired}


async def prune(engine: AsyncEngine, settings: MessagesSettings, now: float | None = None
                ) -> int:
    """Delete the messages older than ``max_age_seconds`` and all but the newest
    ``max_count``; how many were deleted."""
    now = time.time() if now is None else now
    um = upstream_messages
    async with engine.begin() as conn:
        aged = await conn.execute(um.delete().where(
            um.c.received_at < now - settings.max_age_seconds))
        cut = (await conn.execute(sa.select(um.c.id).order_by(um.c.id.desc())
                                  .offset(settings.max_count).limit(1))).scalar()
        counted = await conn.execute(um.delete().where(um.c.id <= cut)) \
            if cut is not None else None
    return int(aged.rowcount or 0) + int(counted.rowcount or 0 if counted else 0)


# --- NATS, the plain text protocol ------------------------------------------------------
class NatsError(Exception):
    """The NATS server refused something or closed the connection."""


_TOKEN = re.compile(r"[^A-Za-z0-9_-]")
_HEADER_NAME = re.compile(r"[^A-Za-z0-9_.-]")


def subject_for(template: str, machine: str, module: str, output: str) -> str:
    """The subject of one message: each name made a single NATS token (no dot, space or
    wildcard in it)."""
    def token(value: str) -> str:
        return _TOKEN.sub("_", value) or "_"
    return template.format(machine=token(machine), module=token(module),
                           output=token(output))


def _header_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text.replace("\r", " ").replace("\n", " ")


def headers_for(row: Any, target: str = "nats") -> list[tuple[str, str]]:
    """The message's properties as headers, then what Outpost says of it."""
    found: list[tuple[str, str]] = []
    for key, value in (row.properties or {}).items():
        name = _HEADER_NAME.sub("_", str(key))
        if name:
            found.append((name, _header_value(value)))
    found += [("Outpost-Machine", row.machine_name), ("Outpost-Module", row.module),
              ("Outpost-Output", row.output), ("Outpost-Seq", str(row.seq)),
              ("Outpost-Created-At", repr(row.created_at)),
              ("Outpost-Received-At", repr(row.received_at))]
    if target == "nats":
        # JetStream drops a message whose id it saw within its duplicate window.
        found.append(("Nats-Msg-Id", f"{row.machine_id}:{row.seq}"))
    for name, value in (("Content-Type", row.content_type), ("Message-Id", row.message_id),
                        ("Correlation-Id", row.correlation_id)):
        if value:
            found.append((name, _header_value(value)))
    return found


class NatsLink:
    """One connection to a NATS server: publish with headers, confirm with PING/PONG."""

    TIMEOUT = 5.0

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 info: dict[str, Any], subject: str = "") -> None:
        self._reader = reader
        self._writer = writer
        self.subject = subject
        self.max_payload = int(info.get("max_payload", 1024 * 1024))

    @classmethod
    async def connect(cls, url: str, subject: str = "", timeout: float = TIMEOUT, *,
                      access: MessageForward | None = None) -> NatsLink:
        """Connect and say CONNECT; ``access`` gives the user, the password or token (its
        file) and the TLS settings. TLS starts after the server's INFO (the NATS way): when
        the URL is tls:// or the server requires it."""
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 4222
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        try:
            line = await asyncio.wait_for(reader.readline(), timeout)
            if not line.startswith(b"INFO "):
                raise NatsError(f"{host}:{port} did not greet as a NATS server")
            info = json.loads(line[5:])
            if not info.get("headers"):
                raise NatsError("the NATS server does not take headers (NATS 2.2 or later "
                                "does)")
            wants_tls = parts.scheme == "tls"
            if wants_tls and not (info.get("tls_available") or info.get("tls_required")):
                raise NatsError(f"the NATS server at {host}:{port} offers no TLS (the URL "
                                "is tls://): give it a certificate, or use nats://")
            if wants_tls or info.get("tls_required"):
                context = (access.tls_context() if access is not None
                           else ssl.create_default_context())
                name = (access.server_name if access is not None else None) or host
                await asyncio.wait_for(writer.start_tls(context, server_hostname=name),
                                       timeout)
            connect: dict[str, Any] = {
                "verbose": False, "pedantic": False, "headers": True,
                "lang": "python-outpost", "version": __version__, "protocol": 1,
                "name": "outpost-hub", "tls_required": bool(wants_tls or
                                                            info.get("tls_required"))}
            secret = access.password() if access is not None else None
            if secret is not None and access is not None and access.username is not None:
                connect.update(user=access.username, **{"pass": secret})
            elif secret is not None:
                connect["auth_token"] = secret
            # CONNECT and PING in one write: a refusal (-ERR, then the server closes) is read
            # as the answer, not met as a broken pipe on a second write.
            writer.write(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
            link = cls(reader, writer, info, subject)
            await asyncio.wait_for(writer.drain(), timeout)
            await link._pong(timeout)
            return link
        except BaseException:
            writer.close()
            raise

    def name_for(self, machine: str, module: str, output: str) -> str:
        return subject_for(self.subject, machine, module, output)

    async def publish(self, subject: str, headers: list[tuple[str, str]],
                      payload: bytes) -> None:
        head = ("NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
                ).encode()
        self._writer.write(f"HPUB {subject} {len(head)} {len(head) + len(payload)}\r\n"
                           .encode() + head + payload + b"\r\n")

    async def confirm(self, timeout: float = TIMEOUT) -> None:
        """Returns once the server has processed everything sent before (its PONG)."""
        self._writer.write(b"PING\r\n")
        await asyncio.wait_for(self._writer.drain(), timeout)
        await self._pong(timeout)

    async def _pong(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            line = await asyncio.wait_for(self._reader.readline(),
                                          max(deadline - time.monotonic(), 0.01))
            if not line:
                raise NatsError("the NATS server closed the connection")
            if line.startswith(b"PONG"):
                return
            if line.startswith(b"PING"):
                self._writer.write(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                said = line[4:].strip().decode(errors="replace").strip("'")
                if "authorization" in said.lower() or "authentication" in said.lower():
                    said += (" (the server refused the hub's credentials: check "
                             "messages.forward's username and password_file in hub.yaml)")
                raise NatsError(said)

    async def close(self) -> None:
        self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)
        except (OSError, TimeoutError):
            pass


# --- forwarding ---------------------------------------------------------------------------
Link = NatsLink | MqttLink


async def connect(settings: MessageForward) -> Link:
    if settings.nats is not None:
        return await NatsLink.connect(settings.nats, settings.subject, access=settings)
    return await MqttLink.connect(settings.url, settings.topic, access=settings)


class Forwarder:
    """Publishes stored messages to the broker from the cursor, on the leading replica
    only."""

    BATCH = 500
    BACKOFF_CAP = 5.0
    IDLE = 1.0  # how often an idle forwarder checks its connection and its lag

    def __init__(self, engine: AsyncEngine, settings: MessageForward,
                 notifier: notify.Notifier, leads: Callable[[], bool],
                 registry: CollectorRegistry) -> None:
        self.engine = engine
        self.settings = settings
        self.target = settings.target
        self.notifier = notifier
        self.leads = leads
        self.connected = False
        self.lag = 0
        self.last_error: str | None = None
        self.forwarded = Counter("outpost_messages_forwarded", "Upstream messages published "
                                 "to the broker and confirmed", registry=registry)
        self.skipped = Counter("outpost_messages_forward_skipped", "Upstream messages larger "
                               "than the broker's max_payload, not published",
                               registry=registry)
        Gauge("outpost_messages_forward_up", "1 while this replica forwards upstream "
              "messages and the broker answers", registry=registry
              ).set_function(lambda: float(self.connected))
        Gauge("outpost_messages_forward_lag", "Stored upstream messages not yet forwarded "
              "(as this replica last saw)", registry=registry
              ).set_function(lambda: float(self.lag))

    async def run(self) -> None:
        """The forwarding loop (a supervised task): while this replica leads, forward; on a
        failure, record it and try again with backoff."""
        delay = 0.0
        while True:
            if not self.leads():
                self.connected = False
                await asyncio.sleep(self.IDLE)
                continue
            try:
                await self._session()
                delay = 0.0
            except (OSError, TimeoutError, NatsError, MqttError, asyncio.IncompleteReadError,
                    db.DatabaseUnavailable) as exc:
                self.connected = False
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if problem != self.last_error:
                    log.warning("forwarding upstream messages to %s failed (%s); trying "
                                "again", self.settings.url, problem)
                self.last_error = problem
                try:
                    await _record_failure(self.engine, self.target, problem)
                except db.DatabaseUnavailable:
                    pass
                delay = min(max(delay * 2, 0.2), self.BACKOFF_CAP)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))

    async def _session(self) -> None:
        link = await connect(self.settings)
        try:
            cursor = await _cursor(self.engine, self.target)
            self.connected = True
            while self.leads():
                with self.notifier.waiting(notify.MESSAGES_ANY) as woken:
                    rows = await self._after(cursor)
                    if not rows:
                        await self._idle(link, woken)
                        continue
                sent = 0
                for row in rows:
                    if len(row.body) > link.max_payload - 4096:
                        self.skipped.inc()
                        log.warning("upstream message %s of machine %s is larger than the "
                                    "broker's max_payload; not forwarded", row.seq,
                                    row.machine_name)
                        continue
                    await link.publish(link.name_for(row.machine_name, row.module, row.output),
                                       headers_for(row, self.target), row.body)
                    sent += 1
                await link.confirm()
                cursor = await _advance(self.engine, self.target, cursor, rows[-1].id, sent)
                self.forwarded.inc(sent)
                if self.last_error is not None:
                    log.info("forwarding upstream messages to %s again", self.settings.url)
                self.last_error = None
        finally:
            self.connected = False
            await link.close()

    async def _after(self, cursor: int) -> list[Any]:
        um = upstream_messages
        async with self.engine.connect() as conn:
            rows = (await conn.execute(
                sa.select(um, machines.c.name.label("machine_name"))
                .join(machines, machines.c.id == um.c.machine_id)
                .where(um.c.id > cursor).order_by(um.c.id).limit(self.BATCH))).all()
            rows = list(rows)
            self.lag = len(rows) if len(rows) < self.BATCH else int((await conn.execute(
                sa.select(sa.func.count()).where(um.c.id > cursor))).scalar() or 0)
        return rows

    async def _idle(self, link: Link, woken: asyncio.Event) -> None:
        """Wait for a new message (or ``IDLE``), checking the broker still answers, and
        record that forwarding works."""
        await link.confirm()
        if self.last_error is not None or not await _healthy(self.engine, self.target):
            await _record_success(self.engine, self.target)
            self.last_error = None
        try:
            await asyncio.wait_for(woken.wait(), self.IDLE)
        except TimeoutError:
            pass


async def _cursor(engine: AsyncEngine, target: str) -> int:
    async with engine.begin() as conn:
        row = (await conn.execute(sa.select(message_forwarding.c.cursor).where(
            message_forwarding.c.target == target))).first()
        if row is not None:
            return int(row.cursor)
        await conn.execute(message_forwarding.insert().values(
            target=target, cursor=0, forwarded=0, updated_at=time.time()))
        return 0


async def _advance(engine: AsyncEngine, target: str, old: int, new: int, sent: int) -> int:
    """Move the cursor from ``old`` to ``new``; a replica that no longer leads and moved it
    meanwhile wins (its value is read back), so it never moves back."""
    async with engine.begin() as conn:
        await conn.execute(message_forwarding.update().where(
            message_forwarding.c.target == target,
            message_forwarding.c.cursor < new).values(
            cursor=new, forwarded=message_forwarding.c.forwarded + sent, last_error=None,
            failing_since=None, updated_at=time.time()))
        return int((await conn.execute(sa.select(message_forwarding.c.cursor).where(
            message_forwarding.c.target == target))).scalar() or new)


async def _healthy(engine: AsyncEngine, target: str) -> bool:
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(message_forwarding.c.failing_since).where(
            message_forwarding.c.target == target))).first()
    return row is not None and row.failing_since is None


async def _record_success(engine: AsyncEngine, target: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(message_forwarding.update().where(
            message_forwarding.c.target == target).values(
            last_error=None, failing_since=None, updated_at=time.time()))


async def _record_failure(engine: AsyncEngine, target: str, problem: str) -> None:
    now = time.time()
    async with engine.begin() as conn:
        done = await conn.execute(message_forwarding.update().where(
            message_forwarding.c.target == target).values(
            last_error=problem[:2000],
            failing_since=sa.func.coalesce(message_forwarding.c.failing_since, now),
            updated_at=now))
        if not done.rowcount:
            await conn.execute(message_forwarding.insert().values(
                target=target, cursor=0, forwarded=0, last_error=problem[:2000],
                failing_since=now, updated_at=now))


async def forwarding_state(engine: AsyncEngine, target: str = "nats"
                           ) -> dict[str, Any] | None:
    """The forwarder's row as the database holds it, with its lag (None: never ran)."""
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(message_forwarding).where(
            message_forwarding.c.target == target))).first()
        if row is None:
            return None
        lag = (await conn.execute(sa.select(sa.func.count()).where(
            upstream_messages.c.id > row.cursor))).scalar()
    return {"cursor": row.cursor, "forwarded": row.forwarded, "last_error": row.last_error,
            "failing_since": row.failing_since, "updated_at": row.updated_at,
            "lag": int(lag or 0)}


# --- the hub's part ------------------------------------------------------------------------
class Messages:
    """What the routes and the lifespan use: the writer, waiting, retention, forwarding."""

    def __init__(self, engine: AsyncEngine, settings: MessagesSettings,
                 notifier: notify.Notifier, leads: Callable[[], bool],
                 registry: CollectorRegistry) -> None:
        self.engine = engine
        self.settings = settings
        self.notifier = notifier
        self.leads = leads
        self.writer = MessageWriter(engine)
        self.received = Counter("outpost_upstream_messages", "Upstream messages received "
                                "from agents (new ones, not repeats)", registry=registry)
        self.forwarder = (Forwarder(engine, settings.forward, notifier, leads, registry)
                          if settings.forward is not None else None)

    async def accept(self, machine: Any, batch: UpstreamBatch) -> int:
        """Store ``batch`` of ``machine``; the highest seq now held."""
        request: dict[str, Any] = {"account_id": machine.account_id,
                                   "machine_id": machine.id, "rows": _decoded(batch),
                                   "dropped": batch.dropped_expired}
        await self.writer.add(uuid.uuid4().hex, request)
        self.received.inc(request["new"])
        through: int = request["accepted_through"]
        return through

    async def read(self, account_id: str, *, machine_id: str | None, module: str | None,
                   after: int | None, limit: int, wait: float) -> list[dict[str, Any]]:
        """As ``listing``; with ``after`` and ``wait``, held until a message arrives."""
        deadline = time.monotonic() + wait
        with self.notifier.waiting(notify.messages(account_id)) as woken:
            while True:
                found = await listing(self.engine, account_id, machine_id=machine_id,
                                      module=module, after=after, limit=limit)
                remaining = deadline - time.monotonic()
                if found or after is None or remaining <= 0 or self.notifier.closing:
                    return found
                try:
                    # At most RECHECK: a wake-up lost between replicas delays, never hangs.
                    await asyncio.wait_for(woken.wait(), min(remaining, notify.RECHECK))
                except TimeoutError:
                    pass
                woken.clear()

    async def retain(self) -> None:
        """The periodic pruning, on the leading replica only."""
        if self.leads():
            deleted = await prune(self.engine, self.settings)
            if deleted:
                log.info("pruned %d upstream messages (retention)", deleted)
