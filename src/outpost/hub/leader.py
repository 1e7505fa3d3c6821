"""Which hub replica runs the scheduler.

On PostgreSQL the replica that holds a session-level advisory lock on a connection of its own
(not from the pool) is the leader; the others try to take it every :data:`LEASE` seconds. The
lock lives as long as that connection: a leader killed with -9 drops it, the database releases
the lock at once, and another replica takes it at its next try, within one lease. The leader
checks its connection every :data:`CHECK` seconds and steps down when it is lost.

For a moment two replicas may both believe they lead (the old one has not yet seen its
connection fail): the scheduler's conditional ``UPDATE`` of a schedule's next run
(schedules.Scheduler._fire) is the second guard, so a due run is still started once.

On SQLite there is one hub process, and it leads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Callable
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncEngine

from outpost.common.supervise import Supervisor

log = logging.getLogger("outpost.hub.leader")

Role = Literal["leader", "standby"]
LEASE = 2.0  # how often a standby tries to take the lock
CHECK = 1.0  # how often the leader checks that its connection (and so its lock) is alive
# pg_try_advisory_lock's bigint: "outpost" in ASCII, the one lock the scheduler takes.
LOCK_KEY = int.from_bytes(b"outpost", "big")


class Leadership:
    """This replica's role, kept up to date by :meth:`start`'s background task."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._pg = engine.dialect.name == "postgresql"
        if self._pg:
            self._dsn = engine.url.set(drivername="postgresql").render_as_string(
                hide_password=False)
        self.role: Role = "standby" if self._pg else "leader"
        self.application_name = f"outpost-leader pid={os.getpid()}"
        self._listeners: list[Callable[[], None]] = []
        self._supervisor = Supervisor(log)
        self._closing = False
        self._tried = asyncio.Event()

    @property
    def leader(self) -> bool:
        return self.role == "leader"

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever this replica's role changes."""
        self._listeners.append(listener)

    def _set(self, role: Role) -> None:
        if role == self.role:
            return
        self.role = role
        log.info("this hub replica is now the scheduler's %s", role)
        for listener in self._listeners:
            listener()

    async def start(self, wait: float = 5.0) -> None:
        """Keep trying to lead, in the background; wait (up to ``wait`` seconds) for the
        first try, so a replica that answers already knows its role."""
        if not self._pg:
            return
        self._supervisor.start("scheduler-leadership", self._run)
        try:
            await asyncio.wait_for(self._tried.wait(), wait)
        except TimeoutError:
            log.warning("could not try for the scheduler's leadership yet; retrying in the "
                        "background")

    async def _run(self) -> None:
        import asyncpg  # type: ignore[import-untyped]

        delay = 0.0
        while not self._closing:
            try:
                await self._session(asyncpg)
                delay = 0.0
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                    TimeoutError) as exc:
                self._set("standby")
                delay = min(max(delay * 2, 0.5), LEASE)
                log.debug("scheduler leadership connection lost (%s: %s); again in %.1f s",
                          type(exc).__name__, exc, delay)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))

    async def _session(self, asyncpg: Any) -> None:
        conn = await asyncpg.connect(self._dsn, timeout=10, server_settings={
            "application_name": self.application_name})
        try:
            while not self._closing:
                if not self.leader:
                    took = await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY,
                                               timeout=LEASE)
                    if took:
                        self._set("leader")
                    self._tried.set()
                    if took:
                        continue
                    await asyncio.sleep(LEASE * random.uniform(0.9, 1.0))
                else:
                    await asyncio.sleep(CHECK)
                    await conn.fetchval("SELECT 1", timeout=CHECK * 3)
        finally:
            self._set("standby")
            if not conn.is_closed():
                # Closing the session releases the lock; a replica stopping gracefully hands
                # over at once rather than at the others' next try.
                try:
                    await asyncio.wait_for(conn.close(), 2.0)
                except Exception:
                    conn.terminate()

    async def close(self) -> None:
        self._closing = True
        await self._supervisor.stop()
