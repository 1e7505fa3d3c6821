"""Machines: registration, heartbeats, and what the fleet views show."""

from __future__ import annotations

import re
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from outpost.protocol.errors import ALREADY_REGISTERED_TEXT, OutpostError
from outpost.protocol.models import Heartbeat, RegisterRequest

from . import notify
from .config import random_id
from .db import accounts, groups, machines, nonces, work_items
from .heartbeats import record as write_heartbeat

GROUP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Healthy until 3 heartbeats are missed, Unresponsive until 10 are, then Disconnected.
UNRESPONSIVE_AFTER = 3
DISCONNECTED_AFTER = 10


def check_name(name: str) -> None:
    """ED-7: the same rule and text as the edge runtime's host name check."""
    if not name or len(name) > 64:
        raise OutpostError("invalid_hostname", name=name, length=len(name))


def check_group(group: str) -> None:
    """A group name: 1 to 64 letters, digits, '.', '_' or '-', the first a letter or digit."""
    if not GROUP_RE.match(group):
        raise OutpostError(
            "invalid_request", f"Invalid group name '{group}'.",
            fix="Use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit.",
            group=group)


def status(row: Any, now: float) -> str:
    """The machine's status now: see docs/architecture.md, "Machine status"."""
    if getattr(row, "stopped_at", None) is not None:
        return "Stopped"  # its agent said so; its next heartbeat makes it Healthy again
    interval = max(float(row.heartbeat_interval), 0.001)
    last = row.last_heartbeat_at
    if last is None:
        elapsed = now - row.registered_at
        if elapsed < UNRESPONSIVE_AFTER * interval:
            return "Pending"
    else:
        elapsed = now - last
    if elapsed >= DISCONNECTED_AFTER * interval:
        return "Disconnected"
    if elapsed >= UNRESPONSIVE_AFTER * interval:
        return "Unresponsive"
    return "Healthy" if last is not None else "Pending"


async def register(
    engine: AsyncEngine, account_id: str, request: RegisterRequest, heartbeat_interval: float
) -> dict[str, Any]:
    check_name(request.name)
    check_group(request.group)
    now = time.time()
    async with engine.begin() as conn:
        existing = (await conn.execute(
            sa.select(machines.c.id, machines.c.group_name).where(
                machines.c.account_id == account_id, machines.c.name == request.name))).first()
        if existing is not None:
            if not request.force:
                account_name = await conn.scalar(
                    sa.select(accounts.c.name).where(accounts.c.id == account_id))
                raise OutpostError(
                    "already_registered",
                    f"{ALREADY_REGISTERED_TEXT}: '{request.name}' in account {account_id} "
                    f"({account_name}), group '{existing.group_name}'.",
                    account_id=account_id, account_name=account_name,
                    group=existing.group_name, name=request.name,
                )
            await _delete(conn, existing.id)
        machine_id = random_id()
        await conn.execute(machines.insert().values(
            id=machine_id, account_id=account_id, name=request.name,
            group_name=request.group, labels=request.labels, public_key=request.public_key,
            facts=request.facts.model_dump(), agent_version=request.facts.agent_version,
            registered_at=now, last_heartbeat_at=None, heartbeat_interval=heartbeat_interval,
            heartbeat=None,
        ))
    return {"machine_id": machine_id, "account_id": account_id, "name": request.name,
            "group": request.group, "hub_time": now, "heartbeat_interval": heartbeat_interval}


async def _delete(conn: Any, machine_id: str) -> None:
    await conn.execute(nonces.delete().where(nonces.c.machine_id == machine_id))
    await conn.execute(work_items.delete().where(work_items.c.machine_id == machine_id))
    await conn.execute(machines.delete().where(machines.c.id == machine_id))
    # Every replica forgets the row (this one at once) and wakes the machine's long-poll,
    # which then finds the machine gone.
    await notify.invalidate(conn, "machine", machine_id)
    await notify.wake(conn, notify.machine(machine_id))


async def deregister(engine: AsyncEngine, machine_id: str) -> None:
    async with engine.begin() as conn:
        await _delete(conn, machine_id)


# Every agent request is signed with its machine's key: the row that holds the key is kept
# here for KNOWN_SECONDS, so an agent's request costs no read of it. A machine id is never
# reused and its key, name, group and labels never change (registering again makes a new
# id); a heartbeat may change its interval and version, so this hub forgets the entry then
# (record_heartbeat). A removal is seen at once by every replica: _delete sends an
# invalidation (notify, "machine") that each one's forget_machine receives; KNOWN_SECONDS
# bounds what a lost notification costs, and how long another replica may measure leases
# in an interval the agent has changed. A heartbeat that agrees with the cached row renews
# it (record_heartbeat), so an agent that talks to one replica costs no read of its row.
KNOWN_SECONDS = 60.0
KNOWN_MAX = 200_000
_known: dict[str, tuple[float, Any]] = {}
# Counts forgets: a row read while one happened is not kept (it may be the row a removal
# deleted, read just before its commit).
_forgets = 0


def forget_machine(machine_id: str) -> None:
    """Drop a machine's cached row (``notify.ALL``: every one)."""
    global _forgets
    _forgets += 1
    if machine_id == notify.ALL:
        _known.clear()
    else:
        _known.pop(machine_id, None)


def follow(notifier: notify.Notifier) -> None:
    """Forget removed machines when any replica removes them."""
    notifier.on_invalidate("machine", forget_machine)


async def by_id(engine: AsyncEngine, machine_id: str, cached: bool = False) -> Any:
    now = time.monotonic()
    if cached:
        hit = _known.get(machine_id)
        if hit is not None and now - hit[0] < KNOWN_SECONDS:
            return hit[1]
    forgets = _forgets
    async with engine.connect() as conn:
        row = (await conn.execute(
            sa.select(machines).where(machines.c.id == machine_id))).first()
    if row is None:
        _known.pop(machine_id, None)
    elif forgets == _forgets:
        if len(_known) > KNOWN_MAX:
            _known.clear()
        _known[machine_id] = (now, row)
    return row


async def record_heartbeat(engine: AsyncEngine, machine_id: str, beat: Heartbeat) -> float:
    """Write the heartbeat (batched with others arriving at the same moment: heartbeats.py);
    returns once it is durable, with the time it was received."""
    now = await write_heartbeat(engine, machine_id, beat.model_dump(),
                                beat.heartbeat_interval, beat.agent_version)
    # The cached row stays good unless what it is used for changed: the interval (leases
    # are measured in it), the version, or a stop the heartbeat ends. Forgetting it at
    # every heartbeat cost each agent's next request a read of its row. Looked at once
    # written, so a row read while the write was under way is not kept.
    # A heartbeat that agrees with the cached row renews it: the agent has just said what
    # its interval and version are, so the row is as good as one read now.
    cached = _known.get(machine_id)
    if cached is not None:
        row = cached[1]
        if (row.heartbeat_interval != beat.heartbeat_interval
                or row.agent_version != beat.agent_version or row.stopped_at is not None):
            _known.pop(machine_id, None)
        else:
            _known[machine_id] = (time.monotonic(), row)
    return now


async def record_stop(engine: AsyncEngine, machine_id: str, run: str | None = None) -> float:
    """The machine's agent (its run ``run``) is stopping gracefully: it shows Stopped from
    now until a heartbeat of another run. Its jobs are left to their leases, as for a
    machine that went silent."""
    now = time.time()
    _known.pop(machine_id, None)
    async with engine.begin() as conn:
        await conn.execute(machines.update().where(machines.c.id == machine_id).values(
            stopped_at=now, stopped_run=run))
    return now


def view(row: Any, now: float) -> dict[str, Any]:
    beat = row.heartbeat or {}
    return {
        "id": row.id,
        "name": row.name,
        "group": row.group_name,
        "labels": row.labels,
        "agent_version": row.agent_version,
        "status": status(row, now),
        "stopped_at": row.stopped_at,
        "last_heartbeat_at": row.last_heartbeat_at,
        "registered_at": row.registered_at,
        "heartbeat_interval": row.heartbeat_interval,
        "facts": row.facts,
        "not_taking_work": beat.get("not_taking_work"),
    }


async def listing(engine: AsyncEngine, account_id: str) -> list[dict[str, Any]]:
    now = time.time()
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(machines).where(machines.c.account_id == account_id)
            .order_by(machines.c.name))
        return [view(row, now) for row in rows]


async def find(engine: AsyncEngine, account_id: str, name_or_id: str) -> Any:
    """A machine of this account by name or id; another account's machine is not found."""
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(machines).where(
            machines.c.account_id == account_id,
            sa.or_(machines.c.name == name_or_id, machines.c.id == name_or_id)))).first()
    if row is None:
        raise OutpostError("not_found", f"No machine named '{name_or_id}' in this account.",
                           fix="See 'outpost machine list' for the machines of this account.")
    return row


async def heartbeats(engine: AsyncEngine, account_id: str) -> list[dict[str, Any]]:
    """HW-9: the last heartbeat of each machine, as the hub received it."""
    now = time.time()
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(machines).where(machines.c.account_id == account_id)
            .order_by(machines.c.name))
        return [{
            "name": row.name,
            "status": status(row, now),
            "stopped_at": row.stopped_at,
            "last_heartbeat_at": row.last_heartbeat_at,
            "seconds_ago": None if row.last_heartbeat_at is None
            else round(now - row.last_heartbeat_at, 3),
            "heartbeat": row.heartbeat,
        } for row in rows]


def status_column(now: float) -> Any:
    """``status`` as a SQL expression, for counting in the database: one row per status
    rather than one per machine (a /metrics scrape of 10,000 machines fetched and judged
    10,000 rows on the event loop, about 50 ms)."""
    m = machines.c
    interval = sa.case((m.heartbeat_interval < 0.001, 0.001), else_=m.heartbeat_interval)
    elapsed = sa.literal(now) - sa.func.coalesce(m.last_heartbeat_at, m.registered_at)
    return sa.case(
        (m.stopped_at.is_not(None), "Stopped"),
        (sa.and_(m.last_heartbeat_at.is_(None), elapsed < UNRESPONSIVE_AFTER * interval),
         "Pending"),
        (elapsed >= DISCONNECTED_AFTER * interval, "Disconnected"),
        (elapsed >= UNRESPONSIVE_AFTER * interval, "Unresponsive"),
        (m.last_heartbeat_at.is_not(None), "Healthy"),
        else_="Pending")


async def counts_by_status(engine: AsyncEngine) -> dict[str, int]:
    """How many machines have each status now (``status``, counted by the database)."""
    judged = sa.select(status_column(time.time()).label("status")).subquery()
    async with engine.connect() as conn:
        rows = await conn.execute(sa.select(judged.c.status, sa.func.count())
                                  .group_by(judged.c.status))
        return {str(row[0]): int(row[1]) for row in rows}


async def wake_named(engine: AsyncEngine, account_id: str, name: str) -> None:
    """Wake the long-poll of machine ``name`` (after a commit that changed what it should
    run: its extension goal, its deployment): its agent hears the new etag in milliseconds
    rather than at its next heartbeat. Nothing when no such machine is registered."""
    async with engine.connect() as conn:
        found = await conn.scalar(sa.select(machines.c.id).where(
            machines.c.account_id == account_id, machines.c.name == name))
    if found is not None:
        notify.of(engine).wake_committed(notify.machine(str(found)))


async def target_name(conn: AsyncConnection, account_id: str, kind: str,
                      target: str) -> str | None:
    """The name a goal or a deployment is stored under: a machine's name (given its name or
    id), or a group's name (a group some machine is in, or one with settings); None when the
    account has no such machine or group."""
    if kind == "machine":
        name = await conn.scalar(sa.select(machines.c.name).where(
            machines.c.account_id == account_id,
            sa.or_(machines.c.name == target, machines.c.id == target)))
    else:
        name = await conn.scalar(sa.select(machines.c.group_name).where(
            machines.c.account_id == account_id, machines.c.group_name == target
        ).limit(1)) or await conn.scalar(sa.select(groups.c.name).where(
            groups.c.account_id == account_id, groups.c.name == target))
    return None if name is None else str(name)
