"""Store-and-forward of the messages routes send ``INTO $upstream``.

``Store`` appends each message to a segment file in ``<state>/messages/upstream/``
(``NNNNNNNNNNNNNNNNNNNN.seg``, named by its first seq; segments.py, the inboxes' format
too) before the sender's ack: a record is ``u32 length, u32 crc32, JSON`` (an
``UpstreamMessage`` plus ``expires_at``). The files
together are bounded by ``store_max_mb``: an append that does not fit, once the expired
messages at the front are dropped, raises ``StoreFull`` (the sender is answered 507).
``acked`` holds the highest seq the hub accepted; a new store reads the segments (a record
torn by a kill is cut off), so seqs go on where they stopped and nothing the hub accepted
is sent again.

Durability: each record is written with one ``write`` before the ack, so it is in the
kernel once the module hears 200 and a kill -9 of the agent loses nothing. ``fsync`` is
not on that path (it would bound a module to the disk's flush rate, tens per second on an
SD card); the uploader syncs the open segment at most once a second and a segment is synced
when it is closed, so a power cut may lose the last second of messages (docs/messages.md).

``Uploader`` sends batches in seq order through ``send_upstream`` (the hub's
``POST /v1/agent/messages``), deletes what ``accepted_through`` covers, waits with a
doubling backoff while the hub cannot be reached, and drops a message only when its
``expires_at`` passed (counted, and reported in the next batch's ``dropped_expired``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from outpost.protocol.modreaders import UpstreamAck, UpstreamBatch, UpstreamMessage

from .segments import Segment, Segments, encode, records

log = logging.getLogger("outpost.agent.messages")

ACKED = "acked"
SendUpstream = Callable[[UpstreamBatch], Awaitable[UpstreamAck]]


class StoreFull(Exception):
    """The store has no room for a message (``store_max_mb``)."""


@dataclass(frozen=True)
class Sizes:
    """How much the store and uploader hold at once (smaller in constrained mode)."""

    segment_bytes: int
    batch_messages: int
    batch_bytes: int


NORMAL = Sizes(segment_bytes=4 << 20, batch_messages=500, batch_bytes=1 << 20)
CONSTRAINED = Sizes(segment_bytes=256 << 10, batch_messages=50, batch_bytes=128 << 10)


class Store:
    def __init__(self, directory: Path, max_bytes: int, sizes: Sizes = NORMAL) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.sizes = sizes
        self.files = Segments(directory)
        self.acked = self._read_acked()
        self.queued = 0
        self.dropped_expired = 0  # since the last batch the hub accepted
        self.expired_total = 0
        self._counted_through = self.acked  # expired records already counted
        self._cursor: tuple[int, int] = (0, 0)  # (index in segments, offset) of the front
        self._load()
        self.next_seq = max([self.acked] + [s.last for s in self.segments]) + 1

    @property
    def segments(self) -> list[Segment]:
        return self.files.segments

    # --- reading what is on disk ----------------------------------------------------------
    def _read_acked(self) -> int:
        try:
            return int((self.directory / ACKED).read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _load(self) -> None:
        for segment, record in self.files.load():
            segment.last = record["seq"]
            if segment.last > self.acked:
                self.queued += 1
        for segment in [s for s in self.segments if s.last <= self.acked]:
            self.files.remove(segment)

    @property
    def size(self) -> int:
        return self.files.size

    # --- writing --------------------------------------------------------------------------
    def append(self, message: dict[str, Any], ttl_seconds: float) -> int:
        """Write one message (``UpstreamMessage`` fields but ``seq``): its seq, once it is in
        the file; StoreFull when it does not fit."""
        seq = self.next_seq
        data = encode(dict(message, seq=seq, expires_at=time.time() + ttl_seconds))
        if self.size + len(data) > self.max_bytes:
            self.drop_expired_front()
            if self.size + len(data) > self.max_bytes:
                raise StoreFull()
        tail = self.files.append(data, seq, self.sizes.segment_bytes)
        tail.last = seq
        self.next_seq = seq + 1
        self.queued += 1
        return seq

    def sync(self) -> None:
        self.files.sync()

    def close(self) -> None:
        self.files.close()

    # --- the front: what goes next ------------------------------------------------------
    def _front(self) -> Iterator[tuple[tuple[int, int], dict[str, Any]]]:
        """((segment index, offset after), record) from the cursor on, unacked only."""
        index, offset = self._cursor
        while index < len(self.segments):
            for end, record in records(self.segments[index].path, offset):
                if record["seq"] > self.acked:
                    yield (index, end), record
            index, offset = index + 1, 0

    def batch(self, now: float | None = None) -> tuple[list[dict[str, Any]], int]:
        """The next messages to send (expired ones skipped and counted) and the highest seq
        read, which the hub's ack lets go of."""
        now = time.time() if now is None else now
        out: list[dict[str, Any]] = []
        size, through = 0, self.acked
        for _, record in self._front():
            if record["expires_at"] <= now:
                self._count_expired(record["seq"])
            else:
                body = len(record.get("body", ""))
                if out and (len(out) >= self.sizes.batch_messages
                            or size + body > self.sizes.batch_bytes):
                    break
                out.append(record)
                size += body
            through = record["seq"]
        return out, through

    def _count_expired(self, seq: int) -> None:
        if seq > self._counted_through:
            self._counted_through = seq
            self.dropped_expired += 1
            self.expired_total += 1

    def drop_expired_front(self, now: float | None = None) -> None:
        """Let go of the expired messages at the front (a full store makes room so)."""
        now = time.time() if now is None else now
        through = self.acked
        for _, record in self._front():
            if record["expires_at"] > now:
                break
            self._count_expired(record["seq"])
            through = record["seq"]
        if through > self.acked:
            self.release(through)

    def release(self, through: int) -> None:
        """The hub holds (or expiry dropped) everything up to ``through``: forget it."""
        if through <= self.acked:
            return
        gone, cursor = 0, self._cursor
        for position, record in self._front():
            if record["seq"] > through:
                break
            gone, cursor = gone + 1, position
        self.acked = through
        self._counted_through = max(self._counted_through, through)
        self.queued = max(0, self.queued - gone)
        tmp = self.directory / f"{ACKED}.tmp"
        tmp.write_text(str(through))
        os.replace(tmp, self.directory / ACKED)
        popped = 0
        while self.segments and self.segments[0].last <= through:
            self.files.remove(self.segments[0])
            popped += 1
        index, offset = cursor
        self._cursor = (index - popped, offset) if index >= popped else (0, 0)


_WIRE = tuple(UpstreamMessage.__dataclass_fields__)


def wire(record: dict[str, Any]) -> UpstreamMessage:
    """A stored record as the message the hub takes (the store's own fields left out)."""
    return UpstreamMessage(**{k: record[k] for k in _WIRE if k in record})


class Uploader:
    """The task that drains the store to the hub."""

    def __init__(self, store: Store, send_upstream: SendUpstream, *,
                 backoff_base: float = 1.0, backoff_cap: float = 60.0) -> None:
        self.store = store
        self.send_upstream = send_upstream
        self.sent = 0
        self._wake = asyncio.Event()
        self._backoff = (backoff_base, backoff_cap)
        self._task: asyncio.Task[None] | None = None
        self.last_error: str | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="upstream")

    def wake(self) -> None:
        self._wake.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self.store.close()

    async def _run(self) -> None:
        wait = self._backoff[0]
        last_sync = time.monotonic()
        while True:
            if time.monotonic() - last_sync >= 1.0:
                self.store.sync()
                last_sync = time.monotonic()
            records, through = self.store.batch()
            if not records:
                if through > self.store.acked:
                    self.store.release(through)  # all expired
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass
                continue
            batch = UpstreamBatch(messages=[wire(r) for r in records],
                                  dropped_expired=self.store.dropped_expired)
            try:
                ack = await self.send_upstream(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the hub away, or any answer but an ack
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.info("upstream messages wait: %s (next try in %.1f s)", self.last_error,
                         wait)
                await asyncio.sleep(wait)
                wait = min(wait * 2, self._backoff[1])
                continue
            wait = self._backoff[0]
            self.last_error = None
            accepted = min(ack.accepted_through, records[-1]["seq"])
            before = self.store.acked
            self.store.dropped_expired -= batch.dropped_expired
            # Counted before the store lets them go: a reader of the counters (another
            # thread's, in tests) never sees a message neither queued nor sent.
            self.sent += sum(1 for r in records if before < r["seq"] <= accepted)
            self.store.release(through if accepted >= records[-1]["seq"] else accepted)
