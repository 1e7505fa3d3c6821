"""Groups: the machines that share a group name, and the group's settings.

A group exists as soon as a machine registers into it; settings (the run-as user, HW-1a) are
stored only for groups that have them.
"""

from __future__ import annotations

import re
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from outpost.protocol.errors import OutpostError

from .db import groups, machines
from .machines import check_group

# What useradd accepts by default: a lower-case letter or '_' first, at most 32 characters.
USER_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\$?$")


async def configure(engine: AsyncEngine, account_id: str, name: str,
                    run_as: str | None) -> dict[str, Any]:
    check_group(name)
    if run_as is not None and not USER_RE.match(run_as):
        raise OutpostError("invalid_request", f"'{run_as}' is not a valid user name.",
                           fix="Give a user name such as 'runbooks' (lower-case letters, "
                               "digits, '_', '-', '.'; at most 32 characters).")
    now = time.time()
    async with engine.begin() as conn:
        changed = await conn.execute(groups.update().where(
            groups.c.account_id == account_id, groups.c.name == name).values(
            run_as=run_as, updated_at=now))
        if not changed.rowcount:
            await conn.execute(groups.insert().values(account_id=account_id, name=name,
                                                      run_as=run_as, updated_at=now))
    return {"name": name, "run_as": run_as}


async def listing(engine: AsyncEngine, account_id: str) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        counts: dict[str, int] = dict((await conn.execute(
            sa.select(machines.c.group_name, sa.func.count())
            .where(machines.c.account_id == account_id)
            .group_by(machines.c.group_name))).tuples().all())
        settings = {r.name: r for r in (await conn.execute(
            sa.select(groups).where(groups.c.account_id == account_id))).all()}
    return [{"name": name, "machines": counts.get(name, 0),
             "run_as": settings[name].run_as if name in settings else None}
            for name in sorted(set(counts) | set(settings))]
