"""Writes that many requests make at once, committed together.

A fleet's agents send a steady stream of small writes (a heartbeat's row, a signed
request's nonce): 10,000 agents make some 700 requests a second. Written one transaction
each, the commits and SQLAlchemy's per-statement cost take most of the hub's time. A
``Batcher`` collects the rows that arrive within its ``window`` and writes them in one
transaction (``write``, which subclasses give), and each caller returns once that
transaction has committed: an answer still means the write is durable.

A caller that cannot wait (``now=True``) writes the batch at once, with whatever joined it
so far. A batch that fails fails every caller in it with the database's error (503 E3007
for an outage), except what ``write`` reports per row (``outcome``): a replayed nonce
fails only its own request. The write runs as a task that every caller awaits shielded,
so a caller that goes away does not cancel the others' write.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

K = TypeVar("K", bound=Hashable)


@dataclass
class Batch(Generic[K]):
    rows: dict[K, dict[str, Any]] = field(default_factory=dict)
    # Per-row failures that ``write`` found (the others' writes stand).
    outcome: dict[K, BaseException] = field(default_factory=dict)
    due: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Future[None] | None = None


class Batcher(Generic[K]):
    """Coalesces the rows of one engine into one transaction per ``window``."""

    def __init__(self, engine: AsyncEngine, window: float) -> None:
        self.engine = engine
        self.window = window
        self._batch: Batch[K] | None = None
        self.batches = 0  # transactions written, for tests and benchmarks
        self.written = 0  # rows written

    def pending(self, key: K) -> bool:
        """Whether the batch being collected holds ``key``."""
        return self._batch is not None and key in self._batch.rows

    async def add(self, key: K, row: dict[str, Any], *, now: bool = False) -> None:
        """Write ``row`` (the latest row of a key wins); returns once committed."""
        batch = self._batch
        if batch is None or batch.task is None \
                or batch.task.get_loop() is not asyncio.get_running_loop():
            batch = self._batch = Batch()
            task = asyncio.ensure_future(self._run(batch))
            # Retrieved here too, so a batch whose callers all went away logs nothing.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            batch.task = task
        batch.rows[key] = row
        if now:
            batch.due.set()
        await asyncio.shield(batch.task)
        failed = batch.outcome.get(key)
        if failed is not None:
            raise failed

    async def _run(self, batch: Batch[K]) -> None:
        try:
            await asyncio.wait_for(batch.due.wait(), self.window)
        except TimeoutError:
            pass
        if self._batch is batch:
            self._batch = None  # rows from now on go to the next batch
        await self.write(batch)
        self.batches += 1
        self.written += len(batch.rows) - len(batch.outcome)

    async def write(self, batch: Batch[K]) -> None:
        raise NotImplementedError
