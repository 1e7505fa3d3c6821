"""The hub's one notification seam: wake-ups and cache invalidations.

Domain code calls :func:`wake` and :func:`invalidate` inside the transaction that made the
change; every hub replica on the same database then wakes its waiters and drops its cached
entries. Keys are built here (:func:`machine`, :func:`group`, :func:`item`), never by hand.

In-process (SQLite: one hub process) a wake-up published inside a transaction is delivered
when the connection goes back to the pool, after the commit (``attach`` sets the pool
listener), so the woken poller sees the committed row. On PostgreSQL (:class:`PgNotifier`)
the notifier sends ``pg_notify`` in the transaction (delivered at commit, so a rolled-back
change notifies nobody) and one listening connection per replica, opened apart from the
pool, delivers it to that replica's waiters and cache listeners. When that connection is
lost (a database restart) it is opened again with backoff, and every waiter is woken and
every cache flushed, since anything could have been missed.

A notification is a hint, never the record: each replica's catch-up pass
(``Dispatcher.catch_up``, every :data:`RECHECK` seconds) wakes the waiters of any open work
that changed, so a lost notification delays work by at most that long and never loses it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from outpost.common.supervise import Supervisor

# What a cache holds: a machine's row, a token's principal, a runbook, an account's
# extension goals or deployments (keyed by the account's id).
Kind = Literal["machine", "token", "runbook", "extensions", "deployments"]
KINDS: tuple[Kind, ...] = ("machine", "token", "runbook", "extensions", "deployments")
# The key an invalidation listener receives when it must forget everything it holds (the
# notifications of a while may have been missed).
ALL = "*"
# How often each replica's catch-up pass looks for open work whose wake-up may have been lost
# (the bound on the delay a lost notification causes).
RECHECK = 5.0
CHANNEL = "outpost"
PAYLOAD_MAX = 7900  # PostgreSQL refuses a payload of 8000 bytes or more
log = logging.getLogger("outpost.hub.notify")


def machine(machine_id: str) -> str:
    """The key a machine's long-poll waits on (work addressed to that machine)."""
    return f"m:{machine_id}"


def group(account_id: str, group_name: str) -> str:
    """The key every long-poll of a group's machines waits on (jobs queued for the group)."""
    return f"g:{account_id}:{group_name}"


def item(item_id: str) -> str:
    """The key a caller waiting for a work item's answer waits on (machine ping)."""
    return f"i:{item_id}"


def messages(account_id: str) -> str:
    """The key a reader of an account's upstream messages waits on (``messages tail -f``)."""
    return f"u:{account_id}"


# The key the forwarder of upstream messages waits on: any account's new message.
MESSAGES_ANY = "u:*"


class Notifier:
    """This process's waiters and cache listeners; in-process delivery."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._listeners: dict[str, list[Callable[[str], None]]] = defaultdict(list)
        self.closing = False
        # How many wake-ups each machine and group key had here, and how many times every
        # key was (wake_all): a poller compares them (``mark``) to tell whether anything
        # may have changed since it last looked and found nothing.
        self._wakes: dict[str, int] = {}
        self._epoch = 0

    # --- delivery (local) ---------------------------------------------------------------
    def deliver_wake(self, key: str) -> None:
        if not key.startswith("i:"):
            if len(self._wakes) >= self.WAKES_KEPT:
                self._wakes.clear()
                self._epoch += 1
            self._wakes[key] = self._wakes.get(key, 0) + 1
        for ev in self._waiters.get(key, ()):
            ev.set()

    WAKES_KEPT = 200_000

    def mark(self, *keys: str) -> tuple[int, ...] | None:
        """What this process has heard of ``keys`` so far: equal marks mean no wake-up of
        them in between. None when it may not have heard everything (a replica whose
        listening connection is down)."""
        if not self.reliable:
            return None
        return (self._epoch, *(self._wakes.get(key, 0) for key in keys))

    @property
    def reliable(self) -> bool:
        """Whether every wake-up of every replica reaches this process now."""
        return True

    def deliver_invalidate(self, kind: str, key: str) -> None:
        for listener in self._listeners.get(kind, ()):
            listener(key)

    def wake_all(self) -> None:
        """Wake every waiter of this process (each looks at the database again)."""
        self._epoch += 1
        for waiters in self._waiters.values():
            for ev in waiters:
                ev.set()

    def flush(self) -> None:
        """Every cache listener forgets everything it holds."""
        for kind in KINDS:
            self.deliver_invalidate(kind, ALL)

    # --- publishing (from domain code, inside its transaction) ---------------------------
    async def publish_wake(self, conn: AsyncConnection, keys: tuple[str, ...]) -> None:
        self._wake_after_commit(conn, keys)

    def _wake_after_commit(self, conn: AsyncConnection, keys: tuple[str, ...]) -> None:
        if conn.in_transaction() and getattr(conn.engine, "notifier", None) is self:
            # Delivered when the connection goes back to the pool, after the commit (see
            # attach): a poller woken earlier looks before the work is visible (PostgreSQL)
            # and then waits out its recheck.
            conn.info.setdefault(_PENDING, []).extend(keys)
            return
        for key in keys:
            self.deliver_wake(key)

    async def publish_invalidate(self, conn: AsyncConnection, kind: str, key: str) -> None:
        self.deliver_invalidate(kind, key)

    def wake_committed(self, *keys: str) -> None:
        """Wake ``keys`` for a change already committed (no transaction to send it in)."""
        for key in keys:
            self.deliver_wake(key)

    @property
    def state(self) -> str:
        """How this process hears of other replicas' changes (shown by /healthz)."""
        return "in-process"

    # --- subscribing ---------------------------------------------------------------------
    @contextmanager
    def waiting(self, *keys: str) -> Iterator[asyncio.Event]:
        """An event set whenever one of ``keys`` is woken (or the hub closes); register it
        before looking for work, so work created between the look and the wait is seen."""
        ev = asyncio.Event()
        if self.closing:
            ev.set()
        for key in keys:
            self._waiters[key].add(ev)
        try:
            yield ev
        finally:
            for key in keys:
                waiters = self._waiters.get(key)
                if waiters is not None:
                    waiters.discard(ev)
                    if not waiters:
                        del self._waiters[key]

    def on_invalidate(self, kind: Kind, listener: Callable[[str], None]) -> None:
        self._listeners[kind].append(listener)

    async def start(self) -> None:
        """Begin receiving other replicas' notifications (nothing to do in-process)."""

    async def close(self) -> None:
        """Answer every waiter now, so shutdown is not held up by long-polls."""
        self.closing = True
        self.wake_all()


def _payloads(head: str, keys: tuple[str, ...]) -> Iterator[str]:
    """``head`` followed by as many keys as fit in one notification, as often as needed."""
    chunk: list[str] = []
    size = len(head)
    for key in keys:
        if chunk and size + 1 + len(key) > PAYLOAD_MAX:
            yield " ".join([head, *chunk])
            chunk, size = [], len(head)
        chunk.append(key)
        size += 1 + len(key)
    if chunk:
        yield " ".join([head, *chunk])


_NOTIFY = sa.text("SELECT pg_notify('outpost', :payload)")


class PgNotifier(Notifier):
    """Delivery between hub replicas through PostgreSQL's LISTEN/NOTIFY.

    A payload is ``w ORIGIN KEY...`` (wake) or ``i ORIGIN KIND KEY`` (invalidate). ORIGIN is
    ``-`` for a notification sent in a transaction, which every replica delivers, this one
    included (it must not wake its own waiters before the commit, or they would look and find
    nothing); it is this replica's id for one sent after the commit, which this replica
    delivered at once and skips when it comes back.
    """

    LISTEN_TIMEOUT = 10.0  # to open the listening connection
    LIVENESS = 1.0  # how often an idle listening connection is checked
    BACKOFF_CAP = 5.0

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__()
        url = engine.url.set(drivername="postgresql")
        self._dsn = url.render_as_string(hide_password=False)
        self.origin = uuid.uuid4().hex[:12]
        self.application_name = f"outpost-listener pid={os.getpid()}"
        self._outbox: asyncio.Queue[str] = asyncio.Queue(maxsize=10_000)
        self._supervisor = Supervisor(log)
        self._connected = asyncio.Event()
        self._listened = False  # since the last failure
        self.reconnects = 0

    @property
    def state(self) -> str:
        return "listening" if self._connected.is_set() else "reconnecting"

    @property
    def reliable(self) -> bool:
        return self._connected.is_set()

    async def publish_wake(self, conn: AsyncConnection, keys: tuple[str, ...]) -> None:
        for payload in _payloads("w -", keys):
            await conn.execute(_NOTIFY, {"payload": payload})
        if not self._connected.is_set():
            # Not listening, so the notification will not come back to this replica: its
            # own waiters are woken after the commit, as in-process.
            self._wake_after_commit(conn, keys)

    async def publish_invalidate(self, conn: AsyncConnection, kind: str, key: str) -> None:
        # Forgotten here at once too: a read between now and the commit may cache the old row
        # again, and the notification's own delivery after the commit forgets it once more.
        self.deliver_invalidate(kind, key)
        await conn.execute(_NOTIFY, {"payload": f"i - {kind} {key}"})

    def wake_committed(self, *keys: str) -> None:
        for key in keys:
            self.deliver_wake(key)
        if not self._connected.is_set():
            return  # the other replicas' catch-up passes find it (RECHECK)
        for key in keys:
            try:
                self._outbox.put_nowait(key)
            except asyncio.QueueFull:
                return  # as above: a hint lost delays, never loses

    def _on_notification(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        parts = payload.split(" ")
        if len(parts) < 3 or parts[1] == self.origin:
            return
        if parts[0] == "w":
            for key in parts[2:]:
                self.deliver_wake(key)
        elif parts[0] == "i" and len(parts) == 4:
            self.deliver_invalidate(parts[2], parts[3])

    async def start(self) -> None:
        """Open the listening connection (waiting a little for it, so a hub that answers is
        one that hears the others), and keep it open."""
        self._supervisor.start("notify-listener", self._listen)
        try:
            await asyncio.wait_for(self._connected.wait(), self.LISTEN_TIMEOUT)
        except TimeoutError:
            log.warning("not listening for other hub replicas' notifications yet; "
                        "retrying in the background")

    async def _listen(self) -> None:
        import asyncpg  # type: ignore[import-untyped]

        delay = 0.0
        while not self.closing:
            try:
                await self._session(asyncpg)
                delay = 0.0
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                    TimeoutError) as exc:
                was, self._listened = self._listened, False
                if self.closing:
                    return
                delay = min(max(delay * 2, 0.2), self.BACKOFF_CAP)
                (log.warning if was else log.debug)(
                    "lost the connection that listens for other hub replicas (%s: %s); "
                    "opening it again in %.1f s", type(exc).__name__, exc, delay)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))

    async def _session(self, asyncpg: Any) -> None:
        conn = await asyncpg.connect(self._dsn, timeout=self.LISTEN_TIMEOUT,
                                     server_settings={"application_name":
                                                      self.application_name})
        try:
            await conn.add_listener(CHANNEL, self._on_notification)
            if self.reconnects:
                log.info("listening for other hub replicas again; waking every waiter and "
                         "flushing every cache")
            # Whatever was sent while nobody listened is lost: look at everything again.
            self.reconnects += 1
            self.flush()
            self.wake_all()
            self._connected.set()
            self._listened = True
            while not self.closing:
                try:
                    first = await asyncio.wait_for(self._outbox.get(), self.LIVENESS)
                except TimeoutError:
                    if conn.is_closed():
                        raise OSError("the listening connection was closed") from None
                    await conn.fetchval("SELECT 1", timeout=self.LIVENESS * 5)
                    continue
                # What queued meanwhile goes in the same notifications, each key once.
                keys = {first: None}
                while not self._outbox.empty():
                    keys[self._outbox.get_nowait()] = None
                for payload in _payloads(f"w {self.origin}", tuple(keys)):
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)
        finally:
            self._connected.clear()
            if not conn.is_closed():
                conn.terminate()

    async def close(self) -> None:
        await super().close()
        await self._supervisor.stop()


def create(engine: AsyncEngine) -> Notifier:
    """The notifier for ``engine``'s database: LISTEN/NOTIFY on PostgreSQL, in-process on
    SQLite (one hub process only)."""
    if engine.dialect.name == "postgresql":
        return PgNotifier(engine)
    return Notifier()


_fallback = Notifier()


def of(engine: Any) -> Notifier:
    """The notifier of the hub that owns ``engine`` (an engine without one shares a
    process-wide in-process notifier: unit tests that use a bare engine)."""
    found = getattr(engine, "notifier", None)
    return found if isinstance(found, Notifier) else _fallback


_PENDING = "outpost_notify_pending"


def attach(engine: AsyncEngine, notifier: Notifier) -> None:
    engine.notifier = notifier  # type: ignore[attr-defined]

    def checked_in(_dbapi: Any, record: Any) -> None:
        for key in record.info.pop(_PENDING, ()):
            notifier.deliver_wake(key)

    event.listen(engine.sync_engine.pool, "checkin", checked_in)


async def wake(conn: AsyncConnection, *keys: str) -> None:
    await of(conn.engine).publish_wake(conn, keys)


async def invalidate(conn: AsyncConnection, kind: Kind, key: str) -> None:
    await of(conn.engine).publish_invalidate(conn, kind, key)
