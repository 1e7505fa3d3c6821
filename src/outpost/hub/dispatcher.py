"""Work dispatch: the long-poll, the atomic claim, and work items (ping, job control).

A poller registers its wake-up (``notify.machine`` and ``notify.group`` keys, through the
hub's notifier) before it looks for work, so an item created between the look and the wait
is never missed. Whoever commits work wakes those keys inside its transaction (``submit``
here, ``jobs.start`` and the rest in the jobs package). On PostgreSQL the notifier carries
each wake-up to every replica on the database (notify.py).

A waiting poller does not look at the database again until it is woken. A notification
that is lost (a listening connection that broke) is made good by one pass per replica every
``RECHECK`` seconds (``catch_up``): it reads, per group and per machine, a summary of the
open work, and wakes the local pollers of each whose summary changed since the pass before.
Work that nobody could take at the last pass (every machine busy) wakes nobody again: what
frees a slot wakes its machine itself. So a fleet of idle pollers costs the database one
pass per replica, not one claim per poller every few seconds.

Nor does a poll that follows an empty one claim again when nothing could have changed: the
notifier counts the wake-ups of each key (``Notifier.mark``), and a poll whose machine and
group keys heard none since that machine's last empty claim (same capacity, same group)
goes straight to waiting. Whatever makes work claimable wakes one of those keys (a submit,
a requeue, a freed slot, the catch-up pass), so the claim it skips would have found nothing.
A PostgreSQL replica whose listening connection is down hears nothing reliably and always
claims.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from . import jobs, machines, notify
from .config import random_id
from .db import jobs as jobs_table
from .db import work_items

RECHECK = notify.RECHECK

# One summary per group with queued jobs, and per machine (or group) with open work items:
# a change in any of them since the last pass means work a lost notification may hide.
_QUEUED_BY_GROUP = (
    sa.select(jobs_table.c.account_id, jobs_table.c.group_name, sa.func.count(),
              sa.func.max(jobs_table.c.created_at), sa.func.sum(jobs_table.c.activations),
              sa.func.sum(jobs_table.c.attempt))
    .where(jobs_table.c.status == "Queued")
    .group_by(jobs_table.c.account_id, jobs_table.c.group_name)
)
_OPEN_ITEMS = (
    sa.select(work_items.c.account_id, work_items.c.machine_id, work_items.c.group_name,
              sa.func.count(), sa.func.max(work_items.c.created_at))
    .where(work_items.c.claimed_by.is_(None))
    .group_by(work_items.c.account_id, work_items.c.machine_id, work_items.c.group_name)
)


# Built once with bound parameters: every long-poll claims with it. The pick is a
# materialized CTE for the reason jobs.claims._PICK is.
_PICK_ITEMS = (
    sa.select(work_items.c.id)
    .where(
        work_items.c.account_id == sa.bindparam("b_account"),
        work_items.c.claimed_by.is_(None),
        sa.or_(work_items.c.machine_id == sa.bindparam("b_machine"),
               sa.and_(work_items.c.machine_id.is_(None),
                       work_items.c.group_name == sa.bindparam("b_group"))),
    )
    .order_by(work_items.c.created_at)
    .limit(sa.bindparam("b_limit"))
    .with_for_update(skip_locked=True)
    .cte("pick").prefix_with("MATERIALIZED", dialect="postgresql")
)
_CLAIM_ITEMS = (
    work_items.update()
    .where(work_items.c.id.in_(sa.select(_PICK_ITEMS.c.id)), work_items.c.claimed_by.is_(None))
    .values(claimed_by=sa.bindparam("b_machine"), claimed_at=sa.bindparam("b_now"))
    .returning(work_items.c.id, work_items.c.kind, work_items.c.payload,
               work_items.c.created_at)
)


class Dispatcher:
    def __init__(self, engine: AsyncEngine, notifier: notify.Notifier | None = None) -> None:
        self._engine = engine
        self._notifier = notifier if notifier is not None else notify.of(engine)
        self._open: dict[str, tuple[Any, ...]] = {}  # catch_up's summaries at its last pass
        self.caught_up = 0
        # Per machine, what its last claim that found nothing saw: the notifier's mark of
        # its keys, the capacity it asked with and its group. A poll that finds the same
        # again skips its first claim (``skipped``): nothing it could take has appeared.
        self._idle: dict[str, tuple[Any, ...]] = {}
        self.skipped = 0

    async def catch_up(self) -> None:
        """Wake this replica's pollers of every group and machine whose open work changed
        since the last pass (``caught_up``: how many keys the last pass woke)."""
        summaries: dict[str, tuple[Any, ...]] = {}
        async with self._engine.connect() as conn:
            for row in await conn.execute(_QUEUED_BY_GROUP):
                summaries[notify.group(row[0], row[1])] = tuple(row[2:])
            for row in await conn.execute(_OPEN_ITEMS):
                key = notify.machine(row[1]) if row[1] else notify.group(row[0], row[2])
                summaries[key] = (*summaries.get(key, ()), *row[3:])
        changed = [key for key, summary in summaries.items()
                   if self._open.get(key) != summary]
        self._open = summaries
        for key in changed:
            self._notifier.deliver_wake(key)
        self.caught_up = len(changed)

    async def submit(self, account_id: str, kind: str, payload: dict[str, Any], *,
                     machine_id: str | None = None, group: str | None = None) -> str:
        item_id = random_id()
        async with self._engine.begin() as conn:
            await conn.execute(work_items.insert().values(
                id=item_id, account_id=account_id, machine_id=machine_id, group_name=group,
                kind=kind, payload=payload, created_at=time.time(),
            ))
            await notify.wake(conn, notify.machine(machine_id) if machine_id
                              else notify.group(account_id, group or ""))
        return item_id

    async def claim(self, machine: Any, limit: int, capacity: int = 0) -> list[dict[str, Any]]:
        """Claim open items for this machine in one statement: no item goes to two pollers."""
        async with self._engine.begin() as conn:
            rows = (await conn.execute(_CLAIM_ITEMS, {
                "b_account": machine.account_id, "b_machine": machine.id,
                "b_group": machine.group_name, "b_limit": limit, "b_now": time.time()})).all()
            claimed = [dict(row._mapping) for row in sorted(rows, key=lambda r: r.created_at)]
            claimed += await jobs.claim(conn, machine, capacity)
        return claimed

    async def poll(self, machine: Any, timeout: float, limit: int = 16, capacity: int = 0,
                   gone: Callable[[], Awaitable[bool]] | None = None) -> list[dict[str, Any]]:
        """Work for the machine, waiting up to ``timeout`` seconds for some to appear.

        ``gone`` tells whether the poller hung up: an agent killed while it waited must not
        claim work it can never receive (the job would wait out a lease for nothing).
        """
        keys = (notify.machine(machine.id), notify.group(machine.account_id, machine.group_name))
        with self._notifier.waiting(*keys) as ev:
            deadline = time.monotonic() + timeout
            first = True
            while True:
                if gone is not None and await gone():
                    return []
                if not first:
                    # The row as it is now: a heartbeat since the poll began may have changed
                    # the interval that a claim's lease is measured in.
                    machine = await machines.by_id(self._engine, machine.id, cached=True)
                    if machine is None:  # removed while it waited
                        return []
                # Taken before the claim: a wake-up during it makes the next poll look.
                seen = (self._notifier.mark(*keys), capacity, machine.group_name)
                if first and seen[0] is not None and self._idle.get(machine.id) == seen:
                    self.skipped += 1
                else:
                    items = await self.claim(machine, limit, capacity)
                    if items:
                        self._idle.pop(machine.id, None)
                        return items
                    if len(self._idle) >= notify.Notifier.WAKES_KEPT:
                        self._idle.clear()
                    self._idle[machine.id] = seen
                first = False
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._notifier.closing:
                    return []
                try:
                    await asyncio.wait_for(ev.wait(), remaining)
                except TimeoutError:
                    # Nothing woke it: nothing it could take appeared (a lost wake-up is the
                    # catch-up pass's, which wakes).
                    return []
                ev.clear()

    async def complete(self, machine_id: str, item_id: str, result: dict[str, Any]) -> bool:
        async with self._engine.begin() as conn:
            done = await conn.execute(
                work_items.update()
                .where(work_items.c.id == item_id, work_items.c.claimed_by == machine_id)
                .values(done_at=time.time(), result=result))
            if done.rowcount:
                # The caller waiting for the answer (machine ping) may be on another replica.
                await notify.wake(conn, notify.item(item_id))
        return bool(done.rowcount)

    async def withdraw(self, item_id: str) -> None:
        """Remove an item nobody finished, so a late agent does not answer a stale request."""
        async with self._engine.begin() as conn:
            await conn.execute(work_items.delete().where(work_items.c.id == item_id,
                                                         work_items.c.done_at.is_(None)))

    async def wait_done(self, item_id: str, timeout: float) -> dict[str, Any] | None:
        """The finished item, or None if it did not finish within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._notifier.waiting(notify.item(item_id)) as ev:
            while True:
                async with self._engine.connect() as conn:
                    row = (await conn.execute(
                        sa.select(work_items).where(work_items.c.id == item_id))).first()
                if row is not None and row.done_at is not None:
                    return dict(row._mapping)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                if self._notifier.closing:  # every waiter is answered: look once a second
                    await asyncio.sleep(min(remaining, 1.0))
                    continue
                try:
                    await asyncio.wait_for(ev.wait(), min(remaining, 1.0))
                except TimeoutError:
                    pass
                ev.clear()
