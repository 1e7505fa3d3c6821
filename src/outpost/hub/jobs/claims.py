"""Claiming: an agent takes queued jobs of its group under a lease, up to its free slots."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..config import random_id
from ..db import groups, job_attempts, jobs
from ..db import runbooks as runbook_table
from .states import HELD, LEASE_BEATS, LEASE_MIN, SEQ_SHIFT


def lease_seconds(machine: Any) -> float:
    return max(LEASE_BEATS * float(machine.heartbeat_interval or 30), LEASE_MIN)


# The statements of the hot paths (claim, reports) are built once, with bound parameters:
# building a statement and generating its cache key cost more than SQLite takes to run it.
_HELD_BY = sa.select(sa.func.count()).select_from(jobs).where(
    jobs.c.machine_id == sa.bindparam("b_machine"), jobs.c.status.in_(HELD))

# The pick is a materialized CTE, run once: as a subquery PostgreSQL may run it again for
# each row it updates, and FOR UPDATE then sees the rows just claimed as no longer Queued and
# picks further ones, so a claim could take more than the free slots.
_PICK = (sa.select(jobs.c.id)
         .where(jobs.c.account_id == sa.bindparam("b_account"),
                jobs.c.group_name == sa.bindparam("b_group"), jobs.c.status == "Queued",
                # a child of a job on every machine of a group is for its machine only
                sa.or_(jobs.c.target_machine_id.is_(None),
                       jobs.c.target_machine_id == sa.bindparam("b_machine")))
         .order_by(jobs.c.created_at).limit(sa.bindparam("b_free"))
         .with_for_update(skip_locked=True)
         .cte("pick").prefix_with("MATERIALIZED", dialect="postgresql"))


_CLAIM = (jobs.update()
          .where(jobs.c.id.in_(sa.select(_PICK.c.id)), jobs.c.status == "Queued")
          .values(status="Activating", machine_id=sa.bindparam("b_machine"),
                  lease_expires_at=sa.bindparam("b_lease"),
                  activations=jobs.c.activations + 1, attempt=jobs.c.attempt + 1)
          .returning(jobs))


_NEW_ATTEMPT = job_attempts.insert()


_SETTINGS = sa.select(groups.c.run_as, groups.c.memory_mb, groups.c.cpus,
                      groups.c.max_processes).where(
    groups.c.account_id == sa.bindparam("b_account"), groups.c.name == sa.bindparam("b_group"))


async def claim(conn: AsyncConnection, machine: Any, capacity: int) -> list[dict[str, Any]]:
    """Claim queued jobs of the machine's group in one statement, under a lease.

    ``capacity`` is how many jobs the agent runs at most; the jobs this machine already holds
    count against it, so a slot is free only once its job's end has reached the hub.
    """
    if capacity <= 0:
        return []
    held = await conn.scalar(_HELD_BY, {"b_machine": machine.id})
    free = capacity - int(held or 0)
    if free <= 0:
        return []
    now = time.time()
    rows = (await conn.execute(_CLAIM, {
        "b_account": machine.account_id, "b_group": machine.group_name, "b_free": free,
        "b_machine": machine.id, "b_lease": now + lease_seconds(machine)})).all()
    if not rows:
        return []
    rows.sort(key=lambda r: r.created_at)
    await conn.execute(_NEW_ATTEMPT, [
        {"id": random_id(), "job_id": r.id, "number": r.attempt, "machine_id": machine.id,
         "started_at": now} for r in rows])
    books = await _books(conn, machine.account_id,
                         {(r.runbook_name, r.runbook_version) for r in rows})
    settings = (await conn.execute(_SETTINGS, {"b_account": machine.account_id,
                                               "b_group": machine.group_name})).first()
    run_as = settings.run_as if settings is not None else None
    # The group's limits; the agent's defaults stand in for those it does not set.
    limits = {"memory_mb": settings.memory_mb, "cpus": settings.cpus,
              "processes": settings.max_processes} if settings is not None else None
    claimed = []
    for row in rows:
        book = books[(row.runbook_name, row.runbook_version)]
        claimed.append({"id": row.id, "kind": "job", "created_at": row.created_at, "payload": {
            "job_id": row.id, "attempt": row.attempt, "runbook": row.runbook_name,
            "version": row.runbook_version, "type": book.type, "content": book.content,
            "params": row.params, "timeout": row.timeout_seconds,
            "log_verbose": book.log_verbose, "log_progress": book.log_progress,
            "run_as": run_as, "limits": limits,
            "seq_base": (row.attempt - 1) << SEQ_SHIFT}})
    return claimed

# A runbook version never changes once published (a new version is a new row) and is never
# deleted, so what a claim sends of it is kept here after the first read, up to
# _BOOKS_BYTES of content (then the cache starts again empty).
_BOOKS_BYTES = 16 * 1024 * 1024

_books_seen: dict[tuple[str, str, int], Any] = {}


_books_size = [0]


async def _books(conn: AsyncConnection, account_id: str,
                 wanted: set[tuple[str, int]]) -> dict[tuple[str, int], Any]:
    """The type, content and stream switches of each runbook version (name, version)."""
    found = {key: _books_seen[(account_id, *key)] for key in wanted
             if (account_id, *key) in _books_seen}
    missing = [key for key in wanted if key not in found]
    if missing:
        rb = runbook_table.c
        for b in (await conn.execute(sa.select(
                rb.name, rb.version, rb.type, rb.content, rb.log_verbose, rb.log_progress
        ).where(rb.account_id == account_id,
                sa.tuple_(rb.name, rb.version).in_(missing)))).all():
            found[(b.name, b.version)] = b
            size = len(b.content)
            if _books_size[0] + size > _BOOKS_BYTES:
                _books_seen.clear()
                _books_size[0] = 0
            _books_seen[(account_id, b.name, b.version)] = b
            _books_size[0] += size
    return found
