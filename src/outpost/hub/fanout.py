"""A job on every machine of a group, with rate control (``job start --all``).

The parent is a row of ``jobs`` that no machine claims (it is never Queued, and it has no
machine, so no lease is ever given to it): it holds the runbook, the parameters and the
aggregate status. Its rate control is a row of ``fanouts``. Each machine of the group at
submission gets a child: a row of ``jobs`` with ``parent_id`` and ``target_machine_id``,
which only that machine claims. A child is one of::

    Queued ... (the normal life of a job) ... Completed | Failed | Stopped
    New:     held back; released to Queued when a child ends and a slot is free
    Stopped: not started (the error threshold passed, the parent stopped, or the machine
             was lost: Unresponsive or Disconnected at submission, removed or Disconnected
             by the time its turn came), the reason saying which

Its ``slot`` says which running count of the parent's ``fanouts`` row holds it: ``held``
(``waiting``), ``busy`` (released and not ended: it holds one of ``max_concurrency``
slots, Suspended too, so resuming it queues it within the limit) or ``done`` (its end is
counted in ``completed``, ``failed`` or ``stopped``). Only the rate control moves a child
out of New (suspend and resume of a held child are refused, E8128), and once dispatching
stopped no Suspended child is queued again (resume refused, E8129).

A child that ends calls :func:`ended` inside the transaction that ended it: marking the
child ``done`` and adding to the counts are one statement each, so a child is counted once
even when its end is reported twice; the counts' update takes the parent's ``fanouts`` row
lock (after the child's: every path takes the children's locks first, so none waits in a
circle), and the next end on another replica waits for it and adds to what it committed.
With the counts it stops dispatching once more than ``max_errors`` children Failed,
otherwise releases the next held children into ``max_concurrency - busy`` free slots and
wakes their machines, and settles the parent's status: Running (Stopping once stopped)
while a child has not ended; then Completed when every child Completed, Stopped when the
operator stopped it, Failed otherwise. An end costs the same with ten children or ten
thousand: no statement counts the siblings.

A child can no longer run when its machine is lost: one holding a lease (Activating,
Running, ...) ends Failed when the reaper finds its lease expired (jobs/leases.py; not
queued again for a machine that may not come back); a released one not yet claimed ends
Stopped when :func:`sweep` finds its machine removed or Disconnected; a held one, when its
turn comes. Each frees its slot for the next held child.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from outpost.protocol.errors import OutpostError

from . import idempotency, notify
from .config import random_id
from .db import fanouts, jobs, machines, work_items
from .jobs.states import FINAL, VIEW_KEYS, _tell_ended
from .machines import DISCONNECTED_AFTER
from .machines import status as machine_status

# A child on a machine in these states is stopped through its agent (as 'job stop' does).
ON_MACHINE = ("Activating", "Running", "Suspending", "Suspended", "Resuming")
_LIMIT = re.compile(r"^\s*(\d{1,9})\s*(%?)\s*$")


def parse_limit(value: int | str | None, option: str, minimum: int
                ) -> tuple[str, int | None, int | None]:
    """``value`` of ``option`` as (the text given, a number, a percentage); None for
    neither when nothing was given. A number is at least ``minimum``; a percentage is
    1 to 100 (E8121)."""
    if value is None:
        return "all", None, None
    text = str(value) if not isinstance(value, bool) else ""
    found = _LIMIT.match(text)
    if found is None:
        raise _bad_limit(option, text or str(value), minimum)
    number = int(found.group(1))
    if found.group(2):
        if not 1 <= number <= 100:
            raise _bad_limit(option, text, minimum)
        return f"{number}%", None, number
    if number < minimum:
        raise _bad_limit(option, text, minimum)
    return str(number), number, None


def _bad_limit(option: str, value: str, minimum: int) -> OutpostError:
    at_least = "at least 1 (N)" if minimum >= 1 else "0 or more (N)"
    return OutpostError(
        "fanout_limit_invalid", f"The value '{value[:32]}' of {option} is not valid: give "
        f"a whole number {at_least} or a percentage from 1% to 100% (P%).",
        option=option, value=value[:32])


def resolve(number: int | None, percent: int | None, children: int, *,
            least: int) -> int | None:
    """A limit in children: the number, or ``percent`` of ``children`` rounded down and
    never below ``least``; None when neither was given."""
    if number is not None:
        return number
    if percent is not None:
        return max(least, children * percent // 100)
    return None


async def start(engine: AsyncEngine, account_id: str, values: dict[str, Any],
                concurrency: int | str | None = None,
                errors: int | str | None = None,
                key: idempotency.Key | None = None) -> dict[str, Any]:
    """Create the parent (``values``: a row prepared by ``jobs.prepare``) and one child per
    machine of its group, and release the first ``concurrency`` of them. Returns the
    parent's view with ``fanout`` and ``warnings``.

    Members are the group's machines now, Stopped ones (their agent said it was stopping)
    left out. Unresponsive and Disconnected ones get a child that is not started (Stopped,
    saying why; not counted as a failure), so one lost machine cannot hold a slot for ever:
    the parent then ends Failed, since the runbook did not run everywhere.
    """
    given_c, number_c, percent_c = parse_limit(concurrency, "--max-concurrency", 1)
    given_e, number_e, percent_e = parse_limit(errors, "--max-errors", 0)
    group = values["group_name"]
    async with engine.begin() as conn:
        await idempotency.record(conn, key, "fanout", [values["id"]])
        members = (await conn.execute(
            sa.select(machines.c.id, machines.c.name, machines.c.stopped_at,
                      machines.c.heartbeat_interval, machines.c.last_heartbeat_at,
                      machines.c.registered_at)
            .where(machines.c.account_id == account_id, machines.c.group_name == group)
            .order_by(machines.c.name))).all()
        if not members:
            raise OutpostError("fanout_group_empty", f"No machine is registered in group "
                               f"'{group}': there is no machine to run the job on.",
                               group=group)
        now = time.time()
        states = {m.id: machine_status(m, now) for m in members}
        ready = [m for m in members if states[m.id] in ("Healthy", "Pending")]
        late = [m for m in members if states[m.id] in ("Unresponsive", "Disconnected")]
        if not ready:
            shown = ", ".join(f"{m.name} {states[m.id]}" for m in members[:10])
            raise OutpostError("fanout_no_machine_ready", f"No machine of group '{group}' "
                               f"can take the job now ({shown}).", group=group,
                               machines={m.name: states[m.id] for m in members[:50]})
        count = len(ready) + len(late)
        max_concurrency = resolve(number_c, percent_c, count, least=1) or count
        max_errors = resolve(number_e, percent_e, count, least=0)
        parent_id = values["id"]
        parent = {**values, "status": "Running", "started_at": now,
                  "reason": f"{count} children, at most {max_concurrency} at a time"}
        await conn.execute(jobs.insert(), parent)
        children, warnings = [], []
        for index, member in enumerate(ready + late):
            # One set of keys for every child: they are inserted in one statement.
            child = {**values, "id": random_id(), "parent_id": parent_id,
                     "target_machine_id": member.id, "created_at": now + index * 1e-6,
                     "ended_at": None, "status": "New", "slot": "held",
                     "reason": f"waiting for a free slot (at most {max_concurrency} at a time)"}
            if index < max_concurrency and states[member.id] in ("Healthy", "Pending"):
                child.update(status="Queued", slot="busy", reason=None)
            elif member in late:
                why = (f"not started: machine {member.name} was {states[member.id]} at "
                       f"submission")
                child.update(status="Stopped", slot="done", ended_at=now, reason=why)
                warnings.append(f"{why}; its child job {child['id']} is Stopped")
            children.append(child)
        by_slot = {slot: sum(c["slot"] == slot for c in children)
                   for slot in ("held", "busy", "done")}
        await conn.execute(fanouts.insert().values(
            job_id=parent_id, children=count, concurrency_given=given_c,
            max_concurrency=max_concurrency, errors_given=None if errors is None else given_e,
            max_errors=max_errors, waiting=by_slot["held"], busy=by_slot["busy"],
            completed=0, failed=0, stopped=by_slot["done"]))
        await conn.execute(jobs.insert(), children)
        _tell_stopped(sum(child["status"] == "Stopped" for child in children), now)
        for child in children:
            if child["status"] == "Queued":
                await notify.wake(conn, notify.machine(child["target_machine_id"]))
        left_out = [m.name for m in members if states[m.id] == "Stopped"]
        if left_out:
            more = " and more" if len(left_out) > 20 else ""
            warnings.append(f"left out (Stopped: their agents said they were stopping): "
                            f"{', '.join(left_out[:20])}{more}")
        await _settle(conn, parent_id, _delta())  # the parent's reason counts its children
        view = await detail(conn, account_id, parent_id)
    assert view is not None
    view["warnings"] = warnings
    return view


_PARENT = (sa.select(jobs.c.id, jobs.c.status, jobs.c.account_id, jobs.c.started_at,
                     fanouts.c.children, fanouts.c.max_concurrency, fanouts.c.concurrency_given,
                     fanouts.c.max_errors, fanouts.c.errors_given, fanouts.c.halted,
                     fanouts.c.stopped_at)
           .select_from(jobs.join(fanouts, fanouts.c.job_id == jobs.c.id))
           .where(jobs.c.id == sa.bindparam("b_parent")))

COUNTERS = ("waiting", "busy", "completed", "failed", "stopped")
# The count that holds a child in each slot it may be in; an ended child is counted by its
# final status.
_SLOT_COUNTER = {"held": "waiting", "busy": "busy"}


def _delta() -> dict[str, int]:
    return dict.fromkeys(COUNTERS, 0)


# The statements of a child's end are built once, with bound parameters: building one and
# its cache key cost more than SQLite takes to run it (as in jobs/claims.py).
_MARK = {slot: jobs.update().where(
    jobs.c.id.in_(sa.bindparam("b_ids", expanding=True)), jobs.c.slot == slot,
    jobs.c.status.in_(FINAL)).values(slot="done").returning(jobs.c.parent_id, jobs.c.status)
    for slot in _SLOT_COUNTER}
_ADD = (fanouts.update().where(fanouts.c.job_id == sa.bindparam("b_parent"))
        .values(**{name: fanouts.c[name] + sa.bindparam(f"b_{name}") for name in COUNTERS})
        .returning(*fanouts.c))


async def ended(conn: AsyncConnection,
                children: Iterable[tuple[str, str | None]]) -> None:
    """These jobs, (id, parent id), may have reached a final status in this transaction:
    count the ends of those that are children (each once), release the next held ones or
    stop dispatching, and settle each parent (module docstring)."""
    ids = sorted({job_id for job_id, parent_id in children if parent_id})
    if not ids:
        return
    deltas: dict[str, dict[str, int]] = {}
    counted = 0
    for slot, counter in _SLOT_COUNTER.items():
        # Marking the child counted in the statement that counts it: a second end of the
        # same child (a report repeated on another replica) finds it counted and adds
        # nothing. A child ends from 'busy' but for a held one the operator stops, so the
        # second statement runs only when the first did not find them all.
        if counted == len(ids):
            break
        rows = (await conn.execute(_MARK[slot], {"b_ids": ids})).all()
        for row in rows:
            delta = deltas.setdefault(str(row.parent_id), _delta())
            delta[counter] -= 1
            delta[str(row.status).lower()] += 1
        counted += len(rows)
    for parent_id in sorted(deltas):
        await _settle(conn, parent_id, deltas[parent_id])


async def _add(conn: AsyncConnection, parent_id: str, delta: dict[str, int]) -> Any:
    """Add ``delta`` to the parent's counts; returns its fanouts row as it is then. The
    statement takes the row's lock (after every child's lock this transaction holds: each
    path moves its children first), so two ends on two replicas count one after the other,
    and the last one sees every end before it."""
    return (await conn.execute(_ADD, {"b_parent": parent_id, **{
        f"b_{name}": delta.get(name, 0) for name in COUNTERS}})).first()


async def _settle(conn: AsyncConnection, parent_id: str, delta: dict[str, int]) -> None:
    fan = await _add(conn, parent_id, delta)
    if fan is None:
        return
    now = time.time()
    if fan.waiting:
        change = _delta()
        halted = fan.halted
        if halted is None and fan.max_errors is not None and fan.failed > fan.max_errors:
            halted = (f"{fan.failed} children failed, more than --max-errors "
                      f"{fan.errors_given} lets pass ({fan.max_errors})")
            await conn.execute(fanouts.update().where(fanouts.c.job_id == parent_id).values(
                halted=halted, halted_at=now))
        if halted is not None:
            await _stop_held(conn, parent_id, f"not started: {halted}", change, now)
        elif fan.max_concurrency > fan.busy:
            await _release(conn, parent_id, fan.max_concurrency - fan.busy, change, now)
        if any(change.values()):
            fan = await _add(conn, parent_id, change)
        fan = SimpleNamespace(**{**fan._mapping, "halted": halted})
    await _update_parent(conn, fan, now)


async def _stop_held(conn: AsyncConnection, parent_id: str, reason: str,
                     change: dict[str, int], now: float) -> None:
    """No further child starts: the held ones end Stopped, saying why. One that another
    transaction holds is skipped (it is ending there, or is stopped at the next end)."""
    picked: list[str] = list((await conn.execute(
        sa.select(jobs.c.id).where(jobs.c.parent_id == parent_id, jobs.c.status == "New",
                                   jobs.c.slot == "held")
        .with_for_update(skip_locked=True))).scalars().all())
    if not picked:
        return
    done = await conn.execute(jobs.update().where(
        jobs.c.id.in_(picked), jobs.c.status == "New", jobs.c.slot == "held").values(
        status="Stopped", slot="done", ended_at=now, reason=reason))
    change["waiting"] -= done.rowcount
    change["stopped"] += done.rowcount
    _tell_stopped(done.rowcount, now)


def _tell_stopped(count: int, now: float) -> None:
    """The metrics count children that end Stopped without starting, as 'job stop' does."""
    for _ in range(max(count, 0)):
        _tell_ended("Stopped", None, now)


_HELD = (sa.select(jobs.c.id, jobs.c.target_machine_id, machines.c.name,
                   machines.c.stopped_at, machines.c.heartbeat_interval,
                   machines.c.last_heartbeat_at, machines.c.registered_at)
         .select_from(jobs.outerjoin(machines, machines.c.id == jobs.c.target_machine_id))
         .where(jobs.c.parent_id == sa.bindparam("b_parent"), jobs.c.status == "New",
                jobs.c.slot == "held")
         .order_by(jobs.c.created_at).limit(sa.bindparam("b_free"))
         .with_for_update(of=jobs, skip_locked=True))


_QUEUE = jobs.update().where(jobs.c.id.in_(sa.bindparam("b_ids", expanding=True))).values(
    status="Queued", slot="busy", reason=None)


def lost(row: Any, now: float) -> str | None:
    """Why a child's machine can no longer take it (``row``: the machine's columns, ``name``
    null once it is removed); None while it may. A machine whose agent said it was stopping
    counts as lost only once it has been silent as long as a Disconnected one: an agent's
    restart must not cost its child."""
    if row.name is None:
        return "its machine was removed"
    interval = max(float(row.heartbeat_interval), 0.001)
    last = row.last_heartbeat_at if row.last_heartbeat_at is not None else row.registered_at
    if now - last < DISCONNECTED_AFTER * interval:
        return None
    if row.stopped_at is not None:
        return f"machine {row.name} stopped (its agent said so) and has not come back"
    return f"machine {row.name} is Disconnected"


async def _release(conn: AsyncConnection, parent_id: str, free: int,
                   change: dict[str, int], now: float) -> None:
    """Release the oldest held children into ``free`` slots and wake their machines; one
    whose machine is lost ends Stopped instead, and the next one takes its slot."""
    while free > 0:
        picked = (await conn.execute(_HELD, {"b_parent": parent_id, "b_free": free})).all()
        if not picked:
            return
        gone = [(row, why) for row in picked if (why := lost(row, now)) is not None]
        for row, why in gone:
            await conn.execute(jobs.update().where(jobs.c.id == row.id).values(
                status="Stopped", slot="done", ended_at=now, reason=f"not started: {why}"))
        _tell_stopped(len(gone), now)
        change["waiting"] -= len(gone)
        change["stopped"] += len(gone)
        ready = [row for row in picked if lost(row, now) is None]
        if ready:
            await conn.execute(_QUEUE, {"b_ids": [row.id for row in ready]})
            for row in ready:
                await notify.wake(conn, notify.machine(row.target_machine_id))
            change["waiting"] -= len(ready)
            change["busy"] += len(ready)
            free -= len(ready)
        if len(picked) < free + len(ready):
            return  # every held child was looked at


# How often the reaper looks for children released to lost machines (a machine is lost
# after DISCONNECTED_AFTER heartbeat intervals, so seconds more do not matter).
SWEEP_SECONDS = 5.0

_QUEUED = (sa.select(jobs.c.id, jobs.c.parent_id, jobs.c.started_at, machines.c.name,
                    machines.c.stopped_at,
                    machines.c.heartbeat_interval, machines.c.last_heartbeat_at,
                    machines.c.registered_at)
           .select_from(fanouts.join(jobs, jobs.c.parent_id == fanouts.c.job_id)
                        .outerjoin(machines, machines.c.id == jobs.c.target_machine_id))
           .where(fanouts.c.busy > 0, jobs.c.status == "Queued", jobs.c.slot == "busy"))


async def sweep(engine: AsyncEngine) -> int:
    """Children released to a machine that is lost (removed, Disconnected, or stopped and
    silent as long) and not yet claimed end Stopped, freeing their slots for the next held
    ones; returns how many. The hub's reaper runs this every few seconds. (A child on a
    machine that goes silent ends when its lease is reaped: jobs/leases.py.)"""
    async with engine.begin() as conn:
        now = time.time()
        rows = (await conn.execute(_QUEUED)).all()
        gone = []
        for row in rows:
            why = lost(row, now)
            if why is None:
                continue
            # Unless it was claimed meanwhile (the claim holds the row until it commits).
            # (one queued again after a failed activation had started before)
            reason = f"not started: {why}" if row.started_at is None else \
                f"stopped before it was claimed again: {why}"
            done = await conn.execute(jobs.update().where(
                jobs.c.id == row.id, jobs.c.status == "Queued").values(
                status="Stopped", ended_at=now, reason=reason))
            if done.rowcount:
                gone.append((row.id, row.parent_id))
        _tell_stopped(len(gone), now)
        await ended(conn, gone)
    return len(gone)


def summary(fan: Any) -> str:
    """'3 Completed, 1 Failed, 2 in progress, 4 waiting': the children by their counts
    (in progress: released and not ended; waiting: held back)."""
    shown = [(fan.completed, "Completed"), (fan.failed, "Failed"), (fan.stopped, "Stopped"),
             (fan.busy, "in progress"), (fan.waiting, "waiting")]
    return ", ".join(f"{n} {name}" for n, name in shown if n) or "none"


async def _update_parent(conn: AsyncConnection, fan: Any, now: float) -> None:
    values: dict[str, Any]
    reason = f"{fan.children} children: {summary(fan)}"
    if fan.waiting or fan.busy:
        values = {"status": "Stopping" if fan.stopped_at is not None else "Running",
                  "reason": reason}
    else:
        if fan.stopped_at is not None:
            status = "Stopped"
        elif fan.completed == fan.children:
            status = "Completed"
        else:
            status = "Failed"
        if fan.halted and fan.stopped_at is None:
            reason += f"; dispatching stopped: {fan.halted}"
        values = {"status": status, "ended_at": now, "reason": reason}
    await conn.execute(_PARENT_OPEN if "ended_at" not in values else _PARENT_END,
                       {"b_parent": fan.job_id, **{f"b_{k}": v for k, v in values.items()}})


_PARENT_OPEN = jobs.update().where(jobs.c.id == sa.bindparam("b_parent"),
                                   jobs.c.status.notin_(FINAL)).values(
    status=sa.bindparam("b_status"), reason=sa.bindparam("b_reason"))
_PARENT_END = jobs.update().where(jobs.c.id == sa.bindparam("b_parent"),
                                  jobs.c.status.notin_(FINAL)).values(
    status=sa.bindparam("b_status"), reason=sa.bindparam("b_reason"),
    ended_at=sa.bindparam("b_ended_at"))


async def check_control(conn: AsyncConnection, row: Any, action: str) -> None:
    """Refuse an operator's action on a child (``row``: its job) that would queue it
    outside its parent's rate control: suspending or resuming a held child (E8128), and
    resuming a Suspended one once dispatching stopped (E8129). A Suspended child keeps its
    slot, so resuming it otherwise queues it within the limit."""
    if row.parent_id is None or action == "stop":
        return
    if row.status == "New":
        raise OutpostError(
            "fanout_child_held", f"Job '{row.id}' is held back by the rate control of its "
            f"parent job '{row.parent_id}' (waiting for a free slot); only that rate control "
            f"starts it, so '{action}' does not apply to it.", job=row.id,
            parent=row.parent_id, status=row.status, action=action)
    if action == "resume" and row.status == "Suspended" and row.machine_id is None:
        halted = await conn.scalar(sa.select(fanouts.c.halted).where(
            fanouts.c.job_id == row.parent_id))
        if halted is not None:
            raise OutpostError(
                "fanout_dispatch_halted", f"Job '{row.id}' is not resumed: no further child "
                f"of job '{row.parent_id}' starts ({halted}).", job=row.id,
                parent=row.parent_id, halted=halted, action=action)


async def is_parent(conn: AsyncConnection, account_id: str, job_id: str) -> bool:
    """Whether the account's job ``job_id`` is the parent of a job on every machine."""
    return await conn.scalar(sa.select(fanouts.c.job_id).select_from(
        fanouts.join(jobs, jobs.c.id == fanouts.c.job_id)).where(
        fanouts.c.job_id == job_id, jobs.c.account_id == account_id)) is not None


async def stop(engine: AsyncEngine, account_id: str, parent_id: str) -> None:
    """Stop a parent: held and queued children end Stopped, the ones on machines are told
    to stop (as 'job stop' tells one), and the parent is Stopping until they have ended."""
    async with engine.begin() as conn:
        parent = (await conn.execute(_PARENT, {"b_parent": parent_id})).first()
        if parent is None or parent.account_id != account_id:
            raise OutpostError("not_found", f"No job '{parent_id}' in this account.",
                               fix="See 'outpost job list'.")
        if parent.status in FINAL or parent.stopped_at is not None:
            raise OutpostError("job_state_conflict", f"Job '{parent_id}' is {parent.status}; "
                               "'stop' applies to a job on every machine of a group that is "
                               "Running.", job=parent_id, status=parent.status, action="stop")
        now = time.time()
        # The children's locks first, the parent's last (in _settle), as every child's end
        # takes them.
        change = _delta()
        held_back = await conn.execute(jobs.update().where(
            jobs.c.parent_id == parent_id, jobs.c.status == "New",
            jobs.c.slot == "held").values(
            status="Stopped", slot="done", ended_at=now,
            reason="not started: the operator stopped its parent job"))
        change["waiting"] -= held_back.rowcount
        queued = await conn.execute(jobs.update().where(
            jobs.c.parent_id == parent_id, jobs.c.slot == "busy",
            sa.or_(jobs.c.status == "Queued",
                   sa.and_(jobs.c.status == "Suspended", jobs.c.machine_id.is_(None)))
        ).values(status="Stopped", slot="done", ended_at=now,
                 reason="stopped by the operator, with its parent job"))
        change["busy"] -= queued.rowcount
        change["stopped"] += held_back.rowcount + queued.rowcount
        _tell_stopped(held_back.rowcount + queued.rowcount, now)
        held = (await conn.execute(sa.select(jobs.c.id, jobs.c.attempt, jobs.c.machine_id)
                                   .where(jobs.c.parent_id == parent_id,
                                          jobs.c.status.in_(ON_MACHINE),
                                          jobs.c.machine_id.isnot(None)))).all()
        if held:
            await conn.execute(jobs.update().where(
                jobs.c.id.in_([h.id for h in held]), jobs.c.status.in_(ON_MACHINE)).values(
                status="Stopping", reason="stop requested by the operator, with its parent "
                                          "job"))
            await conn.execute(work_items.insert(), [
                {"id": random_id(), "account_id": account_id, "machine_id": h.machine_id,
                 "group_name": None, "kind": "job_control", "created_at": now,
                 "payload": {"job_id": h.id, "attempt": h.attempt, "action": "stop"}}
                for h in held])
            for h in held:
                await notify.wake(conn, notify.machine(h.machine_id))
        await conn.execute(fanouts.update().where(fanouts.c.job_id == parent_id).values(
            stopped_at=now, halted=sa.func.coalesce(fanouts.c.halted,
                                                    "the operator stopped the job"),
            halted_at=sa.func.coalesce(fanouts.c.halted_at, now)))
        await _settle(conn, parent_id, change)


async def detail(conn: AsyncConnection, account_id: str, parent_id: str
                 ) -> dict[str, Any] | None:
    """The parent's view with ``fanout`` (its rate control, counts and one line per
    machine); None when the job is not such a parent."""
    parent = (await conn.execute(sa.select(jobs, fanouts).select_from(
        jobs.join(fanouts, fanouts.c.job_id == jobs.c.id)).where(
        jobs.c.id == parent_id, jobs.c.account_id == account_id))).first()
    if parent is None:
        return None
    view = {key: parent._mapping[key] for key in VIEW_KEYS}
    view["attempts"] = []
    view["fanout"] = await fanout_view(conn, parent)
    return view


async def fanout_view(conn: AsyncConnection, parent: Any) -> dict[str, Any]:
    """``fanout`` of a parent's view; ``parent`` is its row joined with its fanouts row."""
    rows = (await conn.execute(
        sa.select(jobs.c.id, jobs.c.status, jobs.c.exit_code, jobs.c.signal,
                  jobs.c.started_at, jobs.c.ended_at, jobs.c.reason,
                  jobs.c.target_machine_id, machines.c.name, machines.c.stopped_at,
                  machines.c.heartbeat_interval, machines.c.last_heartbeat_at,
                  machines.c.registered_at)
        .select_from(jobs.outerjoin(machines, machines.c.id == jobs.c.target_machine_id))
        .where(jobs.c.parent_id == parent.id).order_by(jobs.c.created_at))).all()
    now = time.time()
    counts: dict[str, int] = {}
    breakdown = []
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
        state = None
        if r.name is not None:
            state = machine_status(SimpleNamespace(
                stopped_at=r.stopped_at, heartbeat_interval=r.heartbeat_interval,
                last_heartbeat_at=r.last_heartbeat_at, registered_at=r.registered_at), now)
        breakdown.append({"machine_id": r.target_machine_id, "machine": r.name,
                          "machine_status": state, "job_id": r.id, "status": r.status,
                          "exit_code": r.exit_code, "signal": r.signal,
                          "started_at": r.started_at, "ended_at": r.ended_at,
                          "reason": r.reason})
    return {"children": parent.children, "concurrency_given": parent.concurrency_given,
            "max_concurrency": parent.max_concurrency, "errors_given": parent.errors_given,
            "max_errors": parent.max_errors, "halted": parent.halted, "counts": counts,
            "breakdown": breakdown}
