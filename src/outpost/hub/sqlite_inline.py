"""SQLite in the event loop's own thread.

aiosqlite runs every call (cursor, execute, fetch, commit) on a worker thread and hands the
result back through the event loop: under load each hand-off cost the hub a third of a
millisecond of waiting for the interpreter lock, some 40 of them a job, where the statements
themselves take microseconds. This connection keeps aiosqlite's interface (so SQLAlchemy's
aiosqlite dialect drives it unchanged) but makes each call directly.

The price is that a statement blocks the event loop while it runs. The hub's statements are
small and indexed, and the hub is SQLite's only writer (the engine keeps one connection), so
a statement never waits on SQLite's lock, except behind another process writing the file;
the busy timeout bounds that wait (db.py).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Generator
from functools import partial
from typing import Any

import aiosqlite


class InlineConnection(aiosqlite.Connection):
    """An aiosqlite connection whose calls run where they are awaited; no worker thread."""

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self._running or self._connection is None:
            raise ValueError("Connection closed")
        return fn(*args, **kwargs)

    async def _connect(self) -> InlineConnection:
        if self._connection is None:
            self._connection = self._connector()
        return self

    def __await__(self) -> Generator[Any, None, InlineConnection]:
        return self._connect().__await__()

    def stop(self) -> None:
        self._running = False
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def close(self) -> None:
        self.stop()


async def connect(*args: Any, **kwargs: Any) -> InlineConnection:
    """For ``create_async_engine(..., async_creator=...)``."""
    return await InlineConnection(partial(sqlite3.connect, *args, **kwargs), 64)
