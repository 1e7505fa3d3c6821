"""Reading jobs: one job with its attempts, the list, and its output records."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from outpost.protocol.errors import OutpostError

from .. import fanout
from ..db import job_attempts, job_records, jobs, machines
from ..machines import status as machine_status
from .states import STATES, STREAMS, _view


async def get(engine: AsyncEngine, account_id: str, job_id: str) -> dict[str, Any]:
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(jobs).where(
            jobs.c.id == job_id, jobs.c.account_id == account_id))).first()
        if row is None:
            raise OutpostError("not_found", f"No job '{job_id}' in this account.",
                               fix="See 'outpost job list'.")
        # (a parent never ran itself: no attempt, and never Queued)
        if row.attempt == 0 and row.parent_id is None and row.status != "Queued":
            parent = await fanout.detail(conn, account_id, job_id)
            if parent is not None:
                return parent
        tried = (await conn.execute(
            sa.select(job_attempts, machines.c.name.label("machine"))
            .select_from(job_attempts.outerjoin(
                machines, machines.c.id == job_attempts.c.machine_id))
            .where(job_attempts.c.job_id == job_id).order_by(job_attempts.c.number))).all()
        waiting = await _waiting_for(conn, row) if row.status == "Queued" else None
    view = _view(row)
    view["attempts"] = [{k: a._mapping[k] for k in (
        "number", "machine_id", "machine", "started_at", "ended_at", "exit_code", "signal",
        "reason", "run_as")} for a in tried]
    if waiting:
        view["waiting_for"] = waiting
    return view


async def _waiting_for(conn: AsyncConnection, row: Any) -> str | None:
    """Why a queued job may wait long: its group has no machine, or none is Healthy."""
    members = (await conn.execute(sa.select(machines).where(
        machines.c.account_id == row.account_id,
        machines.c.group_name == row.group_name))).all()
    group = row.group_name
    if not members:
        return (f"No machine is registered in group '{group}': the job waits until one is "
                f"('outpost agent register ... --group {group}').")
    now = time.time()
    states = {m.name: machine_status(m, now) for m in members}
    if "Healthy" in states.values():
        return None
    shown = ", ".join(f"{name} {state}" for name, state in sorted(states.items())[:5])
    return (f"No machine of group '{group}' is Healthy ({shown}): the job waits until one "
            f"heartbeats ('outpost machine list').")


async def listing(engine: AsyncEngine, account_id: str, status: str | None = None,
                  limit: int = 200) -> list[dict[str, Any]]:
    if status is not None:  # in any case, as a stream's name
        known = {state.lower(): state for state in STATES}
        if status.strip().lower() not in known:
            raise OutpostError("invalid_request", f"Unknown job status '{status}'.",
                               fix=f"Use one of {', '.join(STATES)} (in any case).")
        status = known[status.strip().lower()]
    # A job on every machine of a group is listed once, as its parent.
    query = sa.select(jobs).where(jobs.c.account_id == account_id, jobs.c.parent_id.is_(None))
    if status:
        query = query.where(jobs.c.status == status)
    async with engine.connect() as conn:
        rows = (await conn.execute(
            query.order_by(jobs.c.created_at.desc()).limit(limit))).all()
    return [_view(r) for r in rows]


def stream_name(name: str) -> str:
    """A stream's name as stored, from any case ("error" is Error); else E3003."""
    for stream in STREAMS:
        if stream.lower() == name.strip().lower():
            return stream
    raise OutpostError("invalid_request", f"Unknown stream '{name}'.",
                       fix=f"Use one of {', '.join(STREAMS)} (in any case).", stream=name)


async def records(engine: AsyncEngine, account_id: str, job_id: str, after: int = -1,
                  streams: list[str] | None = None, limit: int = 10000
                  ) -> list[dict[str, Any]]:
    """Up to ``limit`` records after sequence ``after``, in order (a page: ask again with the
    last one's ``seq`` for the next)."""
    if streams:
        streams = [stream_name(s) for s in streams]
    async with engine.connect() as conn:  # existence and account
        if await conn.scalar(sa.select(jobs.c.id).where(
                jobs.c.id == job_id, jobs.c.account_id == account_id)) is None:
            raise OutpostError("not_found", f"No job '{job_id}' in this account.",
                               fix="See 'outpost job list'.")
    query = sa.select(job_records).where(job_records.c.job_id == job_id,
                                         job_records.c.seq > after)
    if streams:
        query = query.where(job_records.c.stream.in_(streams))
    async with engine.connect() as conn:
        rows = (await conn.execute(query.order_by(job_records.c.seq).limit(limit))).all()
    return [{"seq": r.seq, "stream": r.stream, "text": r.text, "at": r.at,
             "continues": bool(r.continues)} for r in rows]
