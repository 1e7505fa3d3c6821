"""Leases and reaping: heartbeats renew the leases of held jobs; the reaper ends expired ones."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .. import fanout, notify
from ..db import job_attempts, jobs, machines
from .claims import lease_seconds
from .reports import _activation_failed, _close_attempt
from .states import HELD, LEASE_BEATS, LEASE_MIN, _tell_ended


async def renew(engine: AsyncEngine, machine: Any,
                held: list[tuple[str, int]]) -> list[str]:
    """Renew the leases of the jobs a heartbeat says the agent runs.

    Returns the jobs the agent should let go of: those it runs on an attempt the hub has
    given up (its lease expired while it was cut off, or the job was removed).
    """
    if not held:
        return []
    now = time.time()
    async with engine.begin() as conn:
        rows = {r.id: r for r in (await conn.execute(
            sa.select(jobs.c.id, jobs.c.attempt, jobs.c.status, jobs.c.machine_id).where(
                jobs.c.id.in_([job_id for job_id, _ in held])))).all()}
        keep, drop = [], []
        for job_id, attempt in held:
            row = rows.get(job_id)
            if row is not None and row.attempt == attempt and row.machine_id == machine.id:
                if row.status in HELD:
                    keep.append(job_id)
                # else it has just ended: its report crossed this heartbeat
            else:
                drop.append(job_id)  # reaped, retried elsewhere, or gone
        if keep:
            await conn.execute(jobs.update().where(
                jobs.c.id.in_(keep), jobs.c.machine_id == machine.id).values(
                lease_expires_at=now + lease_seconds(machine)))
    return drop


async def _extend_leases(conn: AsyncConnection, now: float) -> None:
    """Every held job gets a full lease from ``now`` (see Reaper)."""
    interval = sa.select(machines.c.heartbeat_interval).where(
        machines.c.id == jobs.c.machine_id).scalar_subquery()
    length = sa.func.coalesce(interval, 30.0) * LEASE_BEATS
    # (a job held by no machine, such as the parent of a job on every machine, has no lease)
    await conn.execute(jobs.update().where(jobs.c.status.in_(HELD),
                                           jobs.c.machine_id.isnot(None)).values(
        lease_expires_at=now + sa.case((length < LEASE_MIN, LEASE_MIN), else_=length)))

# An attempt whose claim the machine never received (the answer that carried it was lost)
NOT_RECEIVED = ("the machine never received it: its heartbeats went on without listing the "
                "job (the answer that carried it was lost); queued again, not counted as a "
                "failed activation")

# ... is not counted at most this many times a job, so a job an agent always drops without
# a word still ends Suspended rather than circling for ever.
NOT_RECEIVED_MAX = 3


async def _never_received(conn: AsyncConnection, row: Any) -> bool:
    """Whether an Activating job whose lease expired never reached its machine.

    The machine's agent lists every job it holds in each heartbeat, from the moment it gets
    the claim. If it went on heartbeating for a whole interval after the claim and no
    heartbeat listed the job (none renewed the lease), the claim never arrived: not a failed
    activation. A machine that stopped heartbeating (killed, cut off) still fails it."""
    if row.status != "Activating" or row.m_beat is None:
        return False
    claimed = await conn.scalar(sa.select(job_attempts.c.started_at).where(
        job_attempts.c.job_id == row.id, job_attempts.c.number == row.attempt))
    if claimed is None or row.m_beat < claimed + float(row.m_interval or 30):
        return False
    earlier = await conn.scalar(sa.select(sa.func.count()).select_from(job_attempts).where(
        job_attempts.c.job_id == row.id, job_attempts.c.reason == NOT_RECEIVED))
    return int(earlier or 0) < NOT_RECEIVED_MAX

# A pass of the reaper that begins this long after the last one ended (the database hung
# without an error, or the process stalled) finds leases nobody could renew meanwhile.
REAP_GAP = 3.0


class Reaper:
    """HW-1's reaper in one hub process (run once a second): every expired lease ends.

    A lease must not run out for time during which the hub could not record its renewals:
    when the database comes back, the agents' next heartbeats (still listing their attempts)
    must find their leases standing. So a pass first gives every held job a full lease from
    now when this process may have missed renewals since its last completed pass: on its
    first pass (the hub just started), after any database failure it saw (a request or a
    task, counted in the engine's ``health``), or when the pass begins more than REAP_GAP
    seconds after the last one ended. The extension and the judging are one transaction, so
    no pass judges a lease through an outage its process saw. A machine that stays silent
    for a whole lease after that still loses its jobs (HW-1).
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._ended: float | None = None  # time.monotonic() as the last completed pass ended
        self._failures = 0  # the engine's failures as that pass began
        self._swept = 0.0  # time.monotonic() at the last fanout.sweep

    async def __call__(self) -> list[tuple[str, str]]:
        """One pass; returns the (account, group) pairs whose jobs were queued again (their
        pollers are woken at its commit)."""
        health = getattr(self.engine, "health", None)
        failures = health.failures if health is not None else 0
        async with self.engine.begin() as conn:
            # Taken once the connection answered: time before that was not the database's.
            now, began = time.time(), time.monotonic()
            if self._ended is None or began - self._ended > REAP_GAP \
                    or failures != self._failures:
                await _extend_leases(conn, now)
            woken = await _reap(conn, now)
            # HW-1: an expired lease is a failed activation; the group's pollers retry it.
            for account_id, group in dict.fromkeys(woken):
                await notify.wake(conn, notify.group(account_id, group))
        self._ended, self._failures = time.monotonic(), failures
        if self._ended - self._swept >= fanout.SWEEP_SECONDS:
            # Children released to machines lost before they claimed them (hub/fanout.py).
            await fanout.sweep(self.engine)
            self._swept = self._ended
        return woken


async def _reap(conn: AsyncConnection, now: float) -> list[tuple[str, str]]:
    """End every lease that expired before ``now``; returns the (account, group) pairs to
    wake."""
    woken = []
    rows = (await conn.execute(
        sa.select(jobs, machines.c.last_heartbeat_at.label("m_beat"),
                  machines.c.heartbeat_interval.label("m_interval"))
        .select_from(jobs.outerjoin(machines, machines.c.id == jobs.c.machine_id))
        .where(jobs.c.status.in_(HELD), jobs.c.lease_expires_at < now)
        .with_for_update(of=jobs, skip_locked=True))).all()
    for row in rows:
        reason = "lease expired: the machine stopped renewing it (no heartbeat)"
        if await _never_received(conn, row):
            await _close_attempt(conn, row.id, row.attempt, now, None, None, NOT_RECEIVED)
            await conn.execute(jobs.update().where(jobs.c.id == row.id).values(
                status="Queued", machine_id=None, lease_expires_at=None,
                activations=jobs.c.activations - 1,
                reason=f"attempt {row.attempt}: {NOT_RECEIVED}"))
            woken.append((row.account_id, row.group_name))
        elif row.status == "Stopping":
            await _close_attempt(conn, row.id, row.attempt, now, None, None, reason)
            await conn.execute(jobs.update().where(jobs.c.id == row.id).values(
                status="Stopped", ended_at=now, lease_expires_at=None,
                reason="stopped; the machine was lost before it confirmed"))
            await fanout.ended(conn, [(row.id, row.parent_id)])
            _tell_ended("Stopped", row.started_at, now)
        elif row.target_machine_id is not None:
            # A child of a job on every machine runs on its own machine only: queued again,
            # it would wait for a machine that may never come back, holding its parent's
            # slot. It ends Failed (the runbook did not run to its end there).
            await _close_attempt(conn, row.id, row.attempt, now, None, None, reason)
            await conn.execute(jobs.update().where(jobs.c.id == row.id).values(
                status="Failed", ended_at=now, lease_expires_at=None,
                reason=f"{reason}; a child job runs on its own machine only, so it is not "
                       "queued again"))
            await fanout.ended(conn, [(row.id, row.parent_id)])
            _tell_ended("Failed", row.started_at, now)
        elif row.status in ("Suspending", "Suspended", "Resuming"):
            await _close_attempt(conn, row.id, row.attempt, now, None, None, reason)
            await conn.execute(jobs.update().where(jobs.c.id == row.id).values(
                status="Suspended", machine_id=None, lease_expires_at=None,
                reason="suspended; the machine that held it was lost"))
        elif await _activation_failed(conn, row, now, reason) == "Queued":
            woken.append((row.account_id, row.group_name))
    return woken
