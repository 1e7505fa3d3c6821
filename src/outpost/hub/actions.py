"""Multi-step actions the hub's periodic pass drives: each step starts an extension operation
or a job on a machine and waits for it; the pass reads what it waits on and moves the action
to its next step (or to its end), every move a conditional UPDATE so hub replicas running the
pass at once move each action once.

What a step waits on is read here (``op_outcome``, ``job_outcome``); what the steps are, and
what each one starts, is the caller's (hub/recovery.py: failover, test failover, failback).
A row of an action table has at least ``id``, ``status``, ``step``, ``op_id``, ``job_id``,
``attempts``, ``updated_at``; ``move`` changes it only if it is still as the pass read it.

A replica that claimed a step and stopped before it started the step's work leaves the row
with neither ``op_id`` nor ``job_id``: ``stalled`` finds it after ``STALL_SECONDS`` so the
pass starts that step again (``attempts`` counts the starts).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from .db import extension_operations, job_records, jobs

OUTPUT_LINES = 200  # lines of a job's output kept with the action
STALL_SECONDS = 60.0
ENDED = ("Succeeded", "Failed")


@dataclass(frozen=True)
class Outcome:
    """Where the operation or job a step waits on stands."""

    done: bool
    ok: bool = False
    status: str = ""
    code: str | None = None
    message: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    output: list[str] = field(default_factory=list)


async def op_outcome(conn: AsyncConnection, op_id: str) -> Outcome:
    """An extension operation: done when Succeeded or Failed (no attempt left)."""
    t = extension_operations
    row = (await conn.execute(sa.select(t.c.status, t.c.code, t.c.message, t.c.result,
                                        t.c.output).where(t.c.id == op_id))).first()
    if row is None:  # its machine was removed
        return Outcome(True, False, "Failed", None, f"the operation {op_id} no longer exists")
    if row.status not in ENDED:
        return Outcome(False, status=row.status, message=row.message or "")
    lines = (row.output or "").splitlines()[-OUTPUT_LINES:]
    return Outcome(True, row.status == "Succeeded", row.status, row.code, row.message or "",
                   row.result or {}, lines)


async def job_outcome(conn: AsyncConnection, job_id: str) -> Outcome:
    """A job: done when Completed, Failed or Stopped; its output's last lines."""
    row = (await conn.execute(sa.select(jobs.c.status, jobs.c.exit_code, jobs.c.reason)
                              .where(jobs.c.id == job_id))).first()
    if row is None:
        return Outcome(True, False, "Failed", None, f"the job {job_id} no longer exists")
    if row.status not in ("Completed", "Failed", "Stopped"):
        return Outcome(False, status=row.status)
    records = (await conn.execute(
        sa.select(job_records.c.stream, job_records.c.text)
        .where(job_records.c.job_id == job_id)
        .order_by(job_records.c.seq.desc()).limit(OUTPUT_LINES))).all()
    lines = [r.text if r.stream == "Output" else f"[{r.stream}] {r.text}"
             for r in reversed(records)]
    why = row.reason or (f"exit code {row.exit_code}" if row.exit_code is not None else "")
    return Outcome(True, row.status == "Completed", row.status, None, why, {}, lines)


async def move(conn: AsyncConnection, table: sa.Table, row: Any, **values: Any) -> bool:
    """Change an action row only if it is still at the status, step and time the pass read
    (another replica may have moved it); True when this call moved it."""
    values.setdefault("updated_at", time.time())
    if values.get("status") in ENDED:
        values.setdefault("ended_at", values["updated_at"])
    t = table
    done = (await conn.execute(t.update().where(
        t.c.id == row.id, t.c.status == row.status, t.c.step == row.step,
        t.c.updated_at == row.updated_at).values(**values))).rowcount
    return bool(done)


def stalled(row: Any, now: float) -> bool:
    """A step claimed but never started (its replica stopped in between)."""
    return (row.op_id is None and row.job_id is None and row.status not in ENDED
            and now - row.updated_at > STALL_SECONDS)
