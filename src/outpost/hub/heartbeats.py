"""Heartbeats written in batches.

A fleet sends a steady stream of heartbeats (10,000 agents at the default 30 s: 333 a
second), each an UPDATE of its machine's row. Written one transaction each, their commits
and the per-statement cost of SQLAlchemy take a large share of the hub's time; here the
heartbeats that arrive within ``WINDOW`` seconds are written as one UPDATE executed for many
rows (executemany), in one transaction, ordered by machine id so that two hubs writing
overlapping batches on PostgreSQL take their row locks in the same order.

The answer keeps its meaning: a heartbeat is answered once its batch has committed, so an
acknowledged heartbeat is durable (batching.py). A batch that fails fails every heartbeat
in it, and their agents send again.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from .batching import Batch, Batcher
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
            # A heartbeat ends a stop told of by another run of the agent (a restart), never
            # one told of by its own run: sent before the stop notice, it can arrive after
            # it (a poll cancelled in flight, another connection). From an agent that names
            # no run, it ends a stop told of before it arrived, not one told of after it (a
            # poll that carried it may commit after the stop notice: batched).
            stopped_at=sa.case(
                (machines.c.stopped_run == sa.bindparam("b_run"), machines.c.stopped_at),
                (sa.and_(machines.c.stopped_run.is_(None),
                         machines.c.stopped_at > sa.bindparam("b_at_stop")),
                 machines.c.stopped_at),
                else_=None),
            stopped_run=sa.case(
                (machines.c.stopped_run == sa.bindparam("b_run"), machines.c.stopped_run),
                else_=None))
)


class HeartbeatWriter(Batcher[str]):
    """Coalesces the heartbeats of one engine into one transaction per ``window``."""

    def __init__(self, engine: AsyncEngine, window: float = WINDOW) -> None:
        super().__init__(engine, window)

    async def record(self, machine_id: str, values: dict[str, Any]) -> None:
        """Write this machine's heartbeat (``b_at``, ``b_beat``, ``b_interval``,
        ``b_version``); returns once it is committed."""
        await self.add(machine_id, {"b_id": machine_id, **values})

    async def write(self, batch: Batch[str]) -> None:
        rows = [batch.rows[key] for key in sorted(batch.rows)]
        async with self.engine.begin() as conn:
            await conn.execute(_WRITE, rows)


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
    await writer(engine).record(machine_id, {"b_at": now, "b_at_stop": now, "b_beat": beat,
                                             "b_interval": interval,
                                             "b_version": agent_version,
                                             "b_run": beat.get("run")})
    return now
