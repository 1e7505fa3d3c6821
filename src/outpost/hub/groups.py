"""Groups: the machines that share a group name, and the group's settings.

A group exists as soon as a machine registers into it; settings (the run-as user, HW-1a, and
the jobs' resource limits) are stored only for groups that have them. A change sets only the
settings it names.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from outpost.protocol.errors import OutpostError
from outpost.protocol.names import did_you_mean

from .db import groups, machines
from .machines import check_group

# What useradd accepts by default: a lower-case letter or '_' first, at most 32 characters.
USER_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\$?$")


SETTINGS = ("run_as", "memory_mb", "cpus", "max_processes")


def _row(row: Any) -> dict[str, Any]:
    return {k: (getattr(row, k) if row is not None else None) for k in SETTINGS}


async def configure(engine: AsyncEngine, account_id: str, name: str,
                    changes: dict[str, Any]) -> dict[str, Any]:
    """Set the settings in ``changes`` (a limit of 0 or None: the agent's default)."""
    check_group(name)
    run_as = changes.get("run_as")
    if run_as is not None and not USER_RE.match(run_as):
        raise OutpostError("invalid_request", f"'{run_as}' is not a valid user name.",
                           fix="Give a user name such as 'runbooks' (lower-case letters, "
                               "digits, '_', '-', '.'; at most 32 characters).")
    values = {k: (v or None) for k, v in changes.items() if k in SETTINGS}
    now = time.time()
    async with engine.begin() as conn:
        changed = await conn.execute(groups.update().where(
            groups.c.account_id == account_id, groups.c.name == name).values(
            **values, updated_at=now))
        if not changed.rowcount:
            await conn.execute(groups.insert().values(account_id=account_id, name=name,
                                                      **values, updated_at=now))
        row = (await conn.execute(sa.select(groups).where(
            groups.c.account_id == account_id, groups.c.name == name))).first()
    return {"name": name, **_row(row)}


async def listing(engine: AsyncEngine, account_id: str) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        counts: dict[str, int] = {row[0]: row[1] for row in (await conn.execute(
            sa.select(machines.c.group_name, sa.func.count())
            .where(machines.c.account_id == account_id)
            .group_by(machines.c.group_name))).all()}
        settings = {r.name: r for r in (await conn.execute(
            sa.select(groups).where(groups.c.account_id == account_id))).all()}
    return [{"name": name, "machines": counts.get(name, 0), **_row(settings.get(name))}
            for name in sorted(set(counts) | set(settings))]


async def unknown_group_warnings(engine: AsyncEngine, account_id: str,
                                 names: Iterable[str]) -> list[str]:
    """For each group no machine has joined and no setting names, and that is near a known
    one: "no group 'lcoal'; did you mean 'local'?" (the job still queues: a machine may join
    later; that it waits is said by the job's ``waiting_for``)."""
    named = list(dict.fromkeys(names))
    # Most jobs name a group that exists: one indexed look per name answers them, where the
    # listing counts every machine of the account (10,000 rows, with the event loop held).
    async with engine.connect() as conn:
        found: set[str] = set((await conn.execute(
            sa.select(machines.c.group_name).distinct().where(
                machines.c.account_id == account_id, machines.c.group_name.in_(named))
        )).scalars()) | set((await conn.execute(
            sa.select(groups.c.name).where(groups.c.account_id == account_id,
                                           groups.c.name.in_(named)))).scalars())
    named = [name for name in named if name not in found]
    if not named:
        return []
    known = [g["name"] for g in await listing(engine, account_id)]
    warnings = []
    for name in named:
        hint = did_you_mean(name, known) if name not in known else ""
        if hint:
            warnings.append(f"no group '{name}'; {hint}")
    return warnings
