"""What agents report of their extensions, and the per-machine views operators read.

An agent reports each extension's state (``ExtensionStatus``) after every step it takes; the
hub keeps one row per machine and extension, replaced only by a report whose ``changed_at``
is not older (reports sent again after a lost answer, or overtaken on the way, do not undo
newer news). A view joins that row with the goal that applies to the machine now, so an
operator sees both what is wanted and what is there.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from outpost.protocol.errors import OutpostError
from outpost.protocol.extensions import ExtensionStatus

from .db import extension_packages, extension_states, machines
from .extension_goals import AccountGoals, Resolved, load


def _values(status: ExtensionStatus, now: float) -> dict[str, Any]:
    return {"version": status.version, "target_version": status.target_version,
            "state": status.state, "step": status.step, "message": status.message,
            "code": status.code, "changed_at": status.changed_at, "seq": status.seq,
            "failed_versions": list(status.failed_versions),
            "last_ready_version": status.last_ready_version, "reported_at": now}


async def record(engine: AsyncEngine, machine_id: str,
                 reported: list[ExtensionStatus]) -> int:
    """Store ``machine_id``'s report; returns how many states it changed."""
    if not reported:
        return 0
    for _attempt in range(3):  # two reports of one machine racing to insert a first row
        try:
            return await _record(engine, machine_id, reported)
        except IntegrityError:
            continue
    raise OutpostError("conflict", "Could not store the extension report; send it again.")


async def _record(engine: AsyncEngine, machine_id: str,
                  reported: list[ExtensionStatus]) -> int:
    now = time.time()
    changed = 0
    names = sorted({s.name for s in reported})
    async with engine.begin() as conn:
        held = {r.name: r.changed_at for r in await conn.execute(
            sa.select(extension_states.c.name, extension_states.c.changed_at).where(
                extension_states.c.machine_id == machine_id,
                extension_states.c.name.in_(names)))}
        for status in reported:
            values = _values(status, now)
            if status.name not in held:
                await conn.execute(extension_states.insert().values(
                    machine_id=machine_id, name=status.name, **values))
            elif status.changed_at >= held[status.name]:
                await conn.execute(extension_states.update().where(
                    extension_states.c.machine_id == machine_id,
                    extension_states.c.name == status.name).values(**values))
            else:
                continue  # older news than what is held
            held[status.name] = status.changed_at
            changed += 1
    return changed


def _row(machine: Any, name: str, resolved: Resolved | None, state: Any) -> dict[str, Any]:
    goal = resolved.goal if resolved else None
    return {
        "machine": machine.name, "machine_id": machine.id, "group": machine.group_name,
        "name": name,
        "goal": goal.kind if goal else None,
        "desired_version": resolved.package.version if resolved else None,
        "enabled": goal.enabled if goal else None,
        "seq": goal.seq if goal else None,
        "retry": resolved.retry if resolved else 0,
        "state": state.state if state is not None else None,
        "version": state.version if state is not None else None,
        "target_version": state.target_version if state is not None else None,
        "step": state.step if state is not None else None,
        "message": state.message if state is not None else "",
        "code": state.code if state is not None else None,
        "changed_at": state.changed_at if state is not None else None,
        "reported_seq": state.seq if state is not None else None,
        "failed_versions": list(state.failed_versions or []) if state is not None else [],
        "last_ready_version": state.last_ready_version if state is not None else None,
        "reported_at": state.reported_at if state is not None else None,
    }


def _rows(goals: AccountGoals, fleet: list[Any], states: list[Any],
          name: str | None) -> list[dict[str, Any]]:
    reported = {(s.machine_id, s.name): s for s in states}
    found = []
    for machine in fleet:
        resolved = {r.goal.name: r for r in goals.resolve(machine)}
        names = set(resolved) | {n for (m, n) in reported if m == machine.id}
        for ext in sorted(names if name is None else names & {name}):
            found.append(_row(machine, ext, resolved.get(ext), reported.get((machine.id, ext))))
    return found


async def by_extension(engine: AsyncEngine, account_id: str, name: str) -> list[dict[str, Any]]:
    """Every machine that should have extension ``name`` or reported it."""
    async with engine.connect() as conn:
        published = await conn.scalar(sa.select(sa.func.count()).where(
            extension_packages.c.account_id == account_id,
            extension_packages.c.name == name))
        if not published:
            raise OutpostError("ext_not_found", f"No extension '{name}' is published in "
                               "this account.", name=name)
        goals = await load(conn, account_id)
        fleet = (await conn.execute(sa.select(
            machines.c.id, machines.c.name, machines.c.group_name).where(
            machines.c.account_id == account_id).order_by(machines.c.name))).all()
        states = (await conn.execute(sa.select(extension_states).join(
            machines, machines.c.id == extension_states.c.machine_id).where(
            machines.c.account_id == account_id, extension_states.c.name == name))).all()
    return _rows(goals, list(fleet), list(states), name)


async def by_machine(engine: AsyncEngine, account_id: str, machine: Any) -> list[dict[str, Any]]:
    """Every extension ``machine`` should have or reported."""
    async with engine.connect() as conn:
        goals = await load(conn, account_id)
        states = (await conn.execute(sa.select(extension_states).where(
            extension_states.c.machine_id == machine.id))).all()
    return _rows(goals, [machine], list(states), None)
