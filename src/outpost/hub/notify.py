"""The hub's one notification seam: wake-ups and cache invalidations.

Domain code calls :func:`wake` and :func:`invalidate` inside the transaction that made the
change; every hub replica on the same database then wakes its waiters and drops its cached
entries. Keys are built here (:func:`machine`, :func:`group`, :func:`item`), never by hand.

On SQLite (one hub process) delivery is in-process and immediate: the woken poller's claim
queues behind the writer on the single connection, so it sees the committed row. On
PostgreSQL the notifier sends ``pg_notify`` in the transaction (delivered at commit) and
one listening connection per replica delivers it to that replica's waiters.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

Kind = Literal["machine", "token", "runbook"]


def machine(machine_id: str) -> str:
    """The key a machine's long-poll waits on (work addressed to that machine)."""
    return f"m:{machine_id}"


def group(account_id: str, group_name: str) -> str:
    """The key every long-poll of a group's machines waits on (jobs queued for the group)."""
    return f"g:{account_id}:{group_name}"


def item(item_id: str) -> str:
    """The key a caller waiting for a work item's answer waits on (machine ping)."""
    return f"i:{item_id}"


class Notifier:
    """This process's waiters and cache listeners; in-process delivery."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._listeners: dict[str, list[Callable[[str], None]]] = defaultdict(list)
        self.closing = False

    # --- delivery (local) ---------------------------------------------------------------
    def deliver_wake(self, key: str) -> None:
        for ev in self._waiters.get(key, ()):
            ev.set()

    def deliver_invalidate(self, kind: str, key: str) -> None:
        for listener in self._listeners.get(kind, ()):
            listener(key)

    # --- publishing (from domain code, inside its transaction) ---------------------------
    async def publish_wake(self, conn: AsyncConnection, keys: tuple[str, ...]) -> None:
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
        for waiters in self._waiters.values():
            for ev in waiters:
                ev.set()


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
