"""Submitting jobs: checking a request and queueing one job or a batch."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from outpost.protocol import durations, params
from outpost.protocol.errors import OutpostError

from .. import idempotency, notify, runbooks
from ..config import random_id
from ..db import jobs
from ..machines import check_group
from .states import MAX_TIMEOUT, VIEW_KEYS


async def start(engine: AsyncEngine, account_id: str, runbook: str, group: str,
                given: dict[str, Any], version: int | None = None,
                timeout: float | str | None = None,
                key: idempotency.Key | None = None) -> dict[str, Any]:
    """Check everything, then queue: a bad parameter is refused before anything is stored.
    ``key``: stored with the job in its transaction (``idempotency.Raced`` when another
    request with it committed first)."""
    values = await prepare(engine, account_id, runbook, group, given, version, timeout)
    async with engine.begin() as conn:
        await idempotency.record(conn, key, "job", [values["id"]])
        await insert(conn, values)
    # What was stored is known: the answer is made from it, not read back.
    view = {key: values.get(key) for key in VIEW_KEYS}
    view["attempts"] = []
    return view


async def start_many(engine: AsyncEngine, account_id: str,
                     entries: Iterable[dict[str, Any]],
                     key: idempotency.Key | None = None) -> list[dict[str, Any]]:
    """Queue every entry or none: each is checked as ``start`` checks one, before anything is
    stored, then all are inserted in one transaction. Returns their views in order.

    An entry holds ``runbook``, ``group``, ``params`` and optionally ``version`` and
    ``timeout``. The first bad entry refuses the batch with the error ``start`` would give,
    its message prefixed ``jobs[INDEX]: ``. Entries are read one at a time, so a caller
    that checks each as it is read refuses at the first bad one too. Each distinct
    (runbook, version) is read once. Each group's pollers are woken at the commit.
    """
    books: dict[tuple[str, int | None], dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for index, entry in enumerate(entries):
        try:
            row = await prepare(engine, account_id, entry["runbook"], entry["group"],
                                entry.get("params") or {}, entry.get("version"),
                                entry.get("timeout"), books)
        except OutpostError as exc:
            raise OutpostError(exc.reason, f"jobs[{index}]: {exc.message}", fix=exc.fix,
                               **{**exc.details, "index": index}) from exc
        # Claims take the oldest first: entries keep their order even within one clock tick.
        if rows and row["created_at"] <= rows[-1]["created_at"]:
            row["created_at"] = rows[-1]["created_at"] + 1e-6
        rows.append(row)
    if not rows:
        return []
    async with engine.begin() as conn:
        await idempotency.record(conn, key, "jobs", [row["id"] for row in rows])
        await conn.execute(jobs.insert(), rows)
        for group in dict.fromkeys(row["group_name"] for row in rows):
            await notify.wake(conn, notify.group(account_id, group))
    views = []
    for values in rows:
        view = {key: values.get(key) for key in VIEW_KEYS}
        view["attempts"] = []
        views.append(view)
    return views


async def prepare(engine: AsyncEngine, account_id: str, runbook: str, group: str,
                  given: dict[str, Any], version: int | None = None,
                  timeout: float | str | None = None,
                  books: dict[tuple[str, int | None], dict[str, Any]] | None = None
                  ) -> dict[str, Any]:
    """The row of a new job, checked (group, timeout, runbook, parameters) but not stored.

    Schedules and webhooks call this, then ``insert`` in a transaction of their own.
    ``books`` keeps the runbook versions read, for a caller preparing many (``start_many``).
    """
    check_group(group)
    if timeout is not None:
        timeout = durations.parse(timeout, "timeout", maximum=MAX_TIMEOUT, positive=True)
    books = {} if books is None else books
    if (runbook, version) not in books:
        books[(runbook, version)] = await runbooks.get(engine, account_id, runbook, version)
    book = books[(runbook, version)]
    values = params.check(book["params"], given)
    return {"id": random_id(), "account_id": account_id, "runbook_name": book["name"],
            "runbook_version": book["version"], "group_name": group, "params": values,
            "status": "Queued", "timeout_seconds": timeout, "created_at": time.time(),
            "activations": 0, "attempt": 0}


_INSERT = jobs.insert()


async def insert(conn: AsyncConnection, values: dict[str, Any]) -> None:
    """Queue a prepared job and wake its group's pollers (at the commit of ``conn``'s
    transaction)."""
    await conn.execute(_INSERT, values)
    await notify.wake(conn, notify.group(values["account_id"], values["group_name"]))
