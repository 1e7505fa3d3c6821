"""Operator control: stop, suspend and resume a job, and naming a job by a prefix of its id."""

from __future__ import annotations

import re
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from outpost.protocol.errors import OutpostError

from .. import fanout, notify
from ..db import jobs
from .states import FULL_ID, HELD, _tell_ended
from .views import get


async def control(engine: AsyncEngine, account_id: str, job_id: str,
                  action: str) -> tuple[dict[str, Any], str | None]:
    """stop, suspend or resume; returns the job and the machine to tell, if one holds it."""
    async with engine.connect() as conn:
        parent = await fanout.is_parent(conn, account_id, job_id)
    if parent:  # a job on every machine of a group: its children are told
        if action != "stop":
            raise OutpostError("fanout_control_unsupported", job=job_id, action=action)
        await fanout.stop(engine, account_id, job_id)
        return await get(engine, account_id, job_id), None
    async with engine.begin() as conn:
        row = (await conn.execute(sa.select(jobs).where(
            jobs.c.id == job_id, jobs.c.account_id == account_id))).first()
        if row is None:
            raise OutpostError("not_found", f"No job '{job_id}' in this account.",
                               fix="See 'outpost job list'.")
        await fanout.check_control(conn, row, action)
        now = time.time()
        on_machine = row.machine_id is not None and row.status in HELD
        values: dict[str, Any]
        if action == "stop" and row.status in ("New", "Queued", "Suspended") \
                and not on_machine:
            values = {"status": "Stopped", "ended_at": now, "reason": "stopped by the operator"}
        elif action == "stop" and on_machine and row.status != "Stopping":
            values = {"status": "Stopping", "reason": "stop requested by the operator"}
        elif action == "suspend" and row.status in ("New", "Queued"):
            values = {"status": "Suspended", "reason": "suspended by the operator"}
        elif action == "suspend" and row.status in ("Activating", "Running", "Resuming"):
            values = {"status": "Suspending", "reason": "suspend requested by the operator"}
        elif action == "resume" and row.status == "Suspended" and on_machine:
            values = {"status": "Resuming", "reason": "resume requested by the operator"}
        elif action == "resume" and row.status == "Suspended":
            # A fresh start: the count of failed activations begins again (HW-1); attempts
            # keep their numbers.
            values = {"status": "Queued", "activations": 0, "reason": "resumed by the operator"}
        else:
            allowed = {"stop": "New, Queued, Activating, Running, Suspending, Suspended or "
                               "Resuming", "suspend": "Queued, Activating, Running or Resuming",
                       "resume": "Suspended"}[action]
            raise OutpostError("job_state_conflict", f"Job '{job_id}' is {row.status}; "
                               f"'{action}' applies to a job that is {allowed}.",
                               job=job_id, status=row.status, action=action)
        await conn.execute(jobs.update().where(jobs.c.id == job_id).values(**values))
        if values["status"] == "Stopped":
            await fanout.ended(conn, [(row.id, row.parent_id)])
        if values["status"] == "Queued":
            await notify.wake(conn, notify.group(account_id, row.group_name))
    if values["status"] == "Stopped":
        _tell_ended("Stopped", row.started_at, now)
    tell = row.machine_id if on_machine and values["status"] in (
        "Stopping", "Suspending", "Resuming") else None
    return await get(engine, account_id, job_id), tell


PREFIX_MIN = 4  # the shortest start of a job id taken in place of the id


_PREFIX = re.compile(r"^[0-9a-f-]+$")

_CANDIDATES = 10  # how many jobs an ambiguous prefix names


async def resolve(engine: AsyncEngine, account_id: str, job_id: str) -> str:
    """The id of the account's job that ``job_id`` names: the id itself, or any unique start
    of it of at least PREFIX_MIN characters (as git takes commits). A full id is returned
    unread (the route reads it anyway); none matching is left for the route to refuse
    (E3002), several matching are refused here (E8040) with the candidates."""
    text = job_id.strip().lower()
    if len(text) >= FULL_ID or not _PREFIX.match(text):
        return job_id
    if len(text) < PREFIX_MIN:
        raise OutpostError("not_found", f"No job '{job_id}' in this account.",
                           fix=f"Give at least {PREFIX_MIN} characters of the job's id "
                               "('outpost job list').", job=job_id)
    async with engine.connect() as conn:
        found = (await conn.execute(
            sa.select(jobs.c.id, jobs.c.runbook_name, jobs.c.status)
            .where(jobs.c.account_id == account_id, jobs.c.id.like(text + "%"))
            .order_by(jobs.c.created_at.desc()).limit(_CANDIDATES + 1))).all()
    if len(found) == 1:
        return str(found[0].id)
    if not found:
        return job_id
    shown = ", ".join(f"{r.id} ({r.runbook_name}, {r.status})" for r in found[:_CANDIDATES])
    more = " and more" if len(found) > _CANDIDATES else ""
    raise OutpostError("job_id_ambiguous",
                       f"Job id prefix '{job_id}' matches several jobs: {shown}{more}.",
                       fix="Give more characters of the id.", prefix=job_id,
                       candidates=[r.id for r in found[:_CANDIDATES]])
