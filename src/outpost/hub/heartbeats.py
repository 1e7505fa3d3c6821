"""Heartbeats written in batches.

A fleet sends a steady stream of heartbeats (10,000 agents at the default 30 s: 333 a
second), each an UPDATE of its machine's row. Written one transaction each, their commits
and the per-statement cost of SQLAlchemy take a large share of the hub's time; here the
heartbeats that arrive within ``WINDOW`` seconds are written as one UPDATE executed for many
rows (executemany), in one transaction, ordered by machine id so that two hubs writing
overlapping batches on PostgreSQL take their row locks in the same order.

The answer keeps its meaning: a heartbeat is answered once its batch has committed, so an
acknowledged heartbeat is durable. A batch that fails fails every heartbeat in it (each
caller gets the database's error, 503 E3007 for an outage), and their agents send again.
The first heartbeat of a batch starts its write as a task that every heartbeat of the batch
awaits (shielded: a caller that goes away does not cancel the others' write).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from .db import machines

WINDOW = 0.1  # seconds a heartbeat may wait for others to share its transaction

# Built once with bound parameters (bindparam names must differ from the columns').
_WRITE = (
    machines.update()
    .where(machines.c.id == sa.bindparam("b_id"))
    .values(last_heartbeat_at=sa.bindparam("b_at"),
            heartbeat=sa.bindparam("b_beat", type_=machines.c.heartbeat.type),
            heartbeat_interval=sa.bindparam("b_interval"),
            agent_version=sa.bindparam("b_version"),
            stopped_at=None)
)


@dataclass
class _Batch:
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    write: asyncio.Future[None] | None = None


class HeartbeatWriter:
    """Coalesces the heartbeats of one engine into one transaction per ``window``."""

    def __init__(self, engine: AsyncEngine, window: float = WINDOW) -> None:
        self._engine = engine
        self.window = window
        self._batch: _Batch | None = None
        self.batches = 0  # transactions written, for tests and benchmarks
        self.written = 0  # heartbeats written

    async def record(self, machine_id: str, values: dict[str, Any]) -> None:
        """Write this machine's heartbeat (``b_at``, ``b_beat``, ``b_interval``,
        ``b_version``); returns once it is committed."""
        batch = self._batch
        if batch is None or batch.write is None \
                or batch.write.get_loop() is not asyncio.get_running_loop():
            batch = self._batch = _Batch()
            task = asyncio.ensure_future(self._write(batch))
            # Retrieved here too, so a batch whose callers all went away logs nothing.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            batch.write = task
        batch.rows[machine_id] = {"b_id": machine_id, **values}  # the latest one wins
        await asyncio.shield(batch.write)

    async def _write(self, batch: _Batch) -> None:
        await asyncio.sleep(self.window)
        if self._batch is batch:
            self._batch = None  # heartbeats from now on go to the next batch
        rows = [batch.rows[key] for key in sorted(batch.rows)]
        async with self._engine.begin() as conn:
            await conn.execute(_WRITE, rows)
        self.batches += 1
        self.written += len(rows)


_writers: weakref.WeakKeyDictionary[AsyncEngine, HeartbeatWriter] = (
    weakref.WeakKeyDictionary())


def writer(engine: AsyncEngine) -> HeartbeatWriter:
    """The engine's writer (one per engine, made on first use)."""
    found = _writers.get(engine)
    if found is None:
        found = _writers[engine] = HeartbeatWriter(engine)
    return found


async def record(engine: AsyncEngine, machine_id: str, beat: dict[str, Any],
                 interval: float, agent_version: str) -> float:
    """Record a heartbeat received now; returns when it is durable, with the time it was
    received (its ``last_heartbeat_at``)."""
    now = time.time()
    await writer(engine).record(machine_id, {"b_at": now, "b_beat": beat,
                                             "b_interval": interval,
                                             "b_version": agent_version})
    return now
