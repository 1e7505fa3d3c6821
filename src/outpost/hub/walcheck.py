"""SQLite's write-ahead log checkpointed off the event loop.

SQLite copies the write-ahead log back into the database file (a checkpoint) on the commit
that takes the log past ``wal_autocheckpoint`` pages, in the thread that committed. The hub
runs its SQLite statements in the event loop's thread (sqlite_inline.py), so that commit
stopped every request for as long as the checkpoint wrote some 4 MB and synced the file: tens
of milliseconds on a quiet disk, more on a busy one. A fleet's heartbeats fill the log every
few seconds, and a job submitted at such a moment waited for it.

The hub's own connection therefore never checkpoints (``wal_autocheckpoint=0``); a
``Checkpointer`` task does it on a worker thread with a connection of its own, once the log
holds ``PAGES`` pages, in PASSIVE mode: it copies what no reader still needs and never waits
for the writer, which goes on committing meanwhile. When the task cannot run (it failed, or
the hub stops), nothing is lost: the log only grows, and the next checkpoint, or the last
connection's close, copies it back. ``journal_size_limit`` trims the log file after a
checkpoint that let SQLite start it again.

Another process that opens the file (the CLI, a second hub by mistake) keeps SQLite's default
and checkpoints itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from typing import Any

log = logging.getLogger("outpost.hub")

PAGES = 1000  # SQLite's default wal_autocheckpoint: the log is checkpointed at ~4 MB
PERIOD = 0.5  # seconds between looks at the log's size
SIZE_LIMIT = 64 * 1024 * 1024  # bytes the log file is trimmed to after a checkpoint
WARN_EVERY = 60.0  # seconds between two warnings of a checkpoint that failed


class Checkpointer:
    """Checkpoints the database at ``path`` from a worker thread."""

    def __init__(self, path: str, pages: int = PAGES) -> None:
        self.path = path
        self.pages = pages
        self._conn: sqlite3.Connection | None = None
        self.checkpoints = 0  # for tests and benchmarks
        self.frames = 0  # log frames copied back
        self._warned = float("-inf")

    def _wal_bytes(self) -> int:
        try:
            return os.stat(self.path + "-wal").st_size
        except OSError:
            return 0

    def _checkpoint(self) -> tuple[int, int, int]:
        if self._conn is None:
            self._conn = sqlite3.connect(self.path, timeout=5, check_same_thread=False,
                                         isolation_level=None)
        row = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        busy, logged, copied = (int(v) for v in row)
        return busy, logged, copied

    async def check(self, page_size: int = 4096) -> bool:
        """One look: checkpoint when the log has grown ``pages`` pages since the last one
        that emptied it. Returns whether a checkpoint ran."""
        if self._wal_bytes() < self.pages * page_size:
            return False
        try:
            _busy, _logged, copied = await asyncio.to_thread(self._checkpoint)
        except sqlite3.Error as exc:
            # The file is locked by another process, unreadable or gone: the hub's own
            # statements meet the same and say so (E3007); here the log just waits.
            self.close()
            now = time.monotonic()
            if now - self._warned >= WARN_EVERY:
                self._warned = now
                log.warning("SQLite's log could not be checkpointed (it keeps growing "
                            "until it can): %s", exc)
            return False
        self.checkpoints += 1
        self.frames += max(copied, 0)
        return True

    async def run(self) -> None:
        """The supervised task's body: look every ``PERIOD`` seconds, for ever."""
        while True:
            await self.check()
            await asyncio.sleep(PERIOD)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def connection_pragmas(cursor: Any, *, checkpoints_elsewhere: bool) -> None:
    """The hub connection's log settings: with a ``Checkpointer`` running, it never
    checkpoints on commit; its log file is trimmed after a checkpoint either way."""
    if checkpoints_elsewhere:
        cursor.execute("PRAGMA wal_autocheckpoint=0")
    cursor.execute(f"PRAGMA journal_size_limit={SIZE_LIMIT}")
