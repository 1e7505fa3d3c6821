"""Extension operations on the hub: asked by an operator, handed to the machine's agent as an
``ext_op`` work item, tracked like jobs (docs/extensions.md, "Operations").

``ask`` refuses at once what could only wait for nothing: a machine whose agent is
unresponsive (E9080, 151099) or stopped (E9081), an agent older than the extension needs
(E9082, 151095), a previous operation of the extension on the machine still running past its
expected time (E9083, 150066). One still within its expected time: the new one is Queued
behind it. Operations of one extension on one machine are handed out one at a time.

``tick`` is the periodic pass, safe on every replica at once (each change is a conditional
UPDATE): it fails what no agent started within its start timeout (E9084, 151076), hands out
the next Queued operation of each extension and machine whose turn has come (a retry whose
backoff passed, one behind another that ended, one Waiting for its extension to be Ready
again, a scheduled one whose ``not_before`` has come), and nothing else.

A schedule's run asks an operation of each machine of its target through ``ask_scheduled``
(hub/schedules.py), with ``not_before`` at the machine's offset within the spread (EX-7):
Queued until then, its start timeout counted from then; a refusal ``ask`` would answer is
stored as an operation that Failed at once, so one machine does not stop the run.

An end with ``transient: true`` is retried with backoff up to ``MAX_ATTEMPTS`` (EX-12).

``ExtensionOps.ended`` holds listeners called with each operation's final end (Succeeded or
Failed, no attempt left), inside the transaction that records it: what they write is kept
exactly when the end is (the backup catalog, hub/backup_catalog.py).

A Running operation whose agent is gone ends Failed with E9093 (``_end_lost``), like a job's
lease (HW-1): its machine sent no heartbeat for a lease (3 intervals, at least 5 s), or its
agent started again after the operation started (a new process runs no operation of the old
one). The start records the run of the agent heartbeating then (``started_run``, the
heartbeat's ``run``, an id each agent process makes at start); a heartbeat of another run ends
it at the next pass, however soon after the start the agent was restarted. The next one in
line is then handed out.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from outpost.protocol import work as wire
from outpost.protocol.errors import OutpostError, entry
from outpost.protocol.extensions import Manifest
from outpost.protocol.extensions import Operation as OperationSpec

from . import machines, notify
from .config import random_id
from .db import (extension_holds, extension_operations, extension_packages, extension_states,
                 tokens, work_items)
from .db import machines as machine_rows
from .extension_goals import AccountGoals, GoalCache, version_key
from .jobs.leases import REAP_GAP
from .jobs.states import LEASE_BEATS, LEASE_MIN

MAX_ATTEMPTS = 3
RETRY_BASE = 2.0  # seconds before the second attempt; doubled for each next one
RETRY_CAP = 300.0
OUTPUT_KEPT = 64 * 1024
ACTIVE = ("Queued", "Waiting", "Running")
SCHEDULED = "scheduled: "  # the reason of an operation waiting for its scheduled start
START_TIMEOUT_TEXT = entry("ext_op_start_timeout").message.rstrip(".")
# An agent's start, as the hub reckons it from a heartbeat (its time less the uptime it
# carries), is late by the heartbeat's time in transit: only a start this much after the
# claim says that another process claimed it. Used where the run that started an operation
# is not known (an agent that sends no ``run``).
RESTART_MARGIN = 5.0

# (connection, the operation's row before its end, the values its end wrote)
EndListener = Callable[[AsyncConnection, Any, dict[str, Any]], Awaitable[None]]


def _alias(key: str) -> str:
    return entry(key).aliases[0]


def view(row: Any) -> dict[str, Any]:
    return {
        "id": row.id, "machine_id": row.machine_id, "extension": row.extension,
        "version": row.version, "operation": row.operation, "params": row.params or {},
        "status": row.status, "code": row.code, "message": row.message,
        "attempt": int(row.attempt), "max_attempts": int(row.max_attempts),
        "next_try_at": row.next_try_at, "requested_by": row.requested_by,
        "created_at": row.created_at, "started_at": row.started_at,
        "ended_at": row.ended_at, "output": row.output, "result": row.result,
        "start_deadline": row.start_deadline, "expected_end": row.expected_end,
        "waited_seconds": row.waited_seconds, "wait_reason": row.wait_reason,
        "not_before": row.not_before, "schedule_id": row.schedule_id,
    }


def _due(now: float) -> tuple[Any, ...]:
    """A Queued operation whose retry backoff and scheduled start (not_before) have passed."""
    t = extension_operations
    return (sa.or_(t.c.next_try_at.is_(None), t.c.next_try_at <= now),
            sa.or_(t.c.not_before.is_(None), t.c.not_before <= now))


def _overdue(previous: Any, name: str, machine: Any) -> OutpostError:
    return OutpostError(
        "ext_op_previous_overdue", f"The previous extension operation is taking longer than "
        f"expected ({_alias('ext_op_previous_overdue')}): {previous.operation} {previous.id} "
        f"of extension {name} on {machine.name} started at {_when(previous.started_at)} and "
        f"was expected to end by {_when(previous.expected_end)}.",
        previous=previous.id, name=name, machine=machine.name)


async def _end_holds(conn: AsyncConnection, machine_ids: list[str],
                     name: str) -> tuple[set[str], set[str]]:
    """The holds of extension ``name`` on ``machine_ids`` that an operation asked now ends:
    (ended, kept). A hold ends only once its machine has uninstalled the extension (its last
    report says NotInstalled, or it never reported one); until then it stays, so an agent
    that had not yet seen the hold when the operation was asked still uninstalls it before
    installing it again, rather than never seeing the hold at all (the operation waits for
    both; ``tick`` ends the hold when the uninstall is reported)."""
    h, s = extension_holds, extension_states
    rows = (await conn.execute(sa.select(h.c.machine_id, s.c.state).select_from(
        h.outerjoin(s, sa.and_(s.c.machine_id == h.c.machine_id, s.c.name == h.c.name)))
        .where(h.c.machine_id.in_(machine_ids), h.c.name == name))).all()
    ended = {r.machine_id for r in rows if r.state in (None, "NotInstalled")}
    if ended:
        await conn.execute(h.delete().where(h.c.machine_id.in_(ended), h.c.name == name))
    return ended, {r.machine_id for r in rows} - ended


def _held_message(name: str, machine: Any, uninstalled: bool) -> str:
    if uninstalled:
        return (f"waiting for extension {name} to be installed again on {machine.name} (it "
                "was uninstalled there)")
    return (f"waiting for extension {name} to be uninstalled on {machine.name} and installed "
            "again")


def _chunks(ids: list[str], size: int = 500) -> list[list[str]]:
    """Ids for ``IN (...)`` a few hundred at a time (SQLite's limit on parameters)."""
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def _when(at: float | None) -> str:
    if at is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


class ExtensionOps:
    def __init__(self, engine: AsyncEngine, goals: GoalCache) -> None:
        self._engine = engine
        self._goals = goals
        self.ended: list[EndListener] = []
        # Heartbeats are trusted to be recorded from this time (wall clock) on: see _end_lost.
        self._trusted_from: float | None = None
        self._tick_ended: float | None = None  # time.monotonic() as the last pass ended
        self._failures = 0  # the engine's failures as that pass began

    # --- operators -----------------------------------------------------------------------
    async def ask(self, account_id: str, machine: Any, name: str, operation: str,
                  params: dict[str, Any], requested_by: str | None) -> dict[str, Any]:
        now = time.time()
        goals = await self._goals.get(account_id)
        version, op = await self._checked(account_id, machine, name, operation, now, goals)
        op_id = random_id()
        async with self._engine.begin() as conn:
            if requested_by:  # the token's name, as the operator knows it
                named = (await conn.execute(sa.select(tokens.c.name).where(
                    tokens.c.id == requested_by))).scalar()
                requested_by = named or requested_by
            held = await self._insert(conn, account_id, machine, name, version, op, now, {
                "id": op_id, "operation": operation, "params": params,
                "requested_by": requested_by})
        if held:
            self._goals.forget(account_id)
        return await self.show(account_id, op_id)

    async def goals(self, account_id: str) -> AccountGoals:
        """The account's goals, read before a transaction that asks operations (on SQLite
        the one connection is that transaction's)."""
        return await self._goals.get(account_id)

    async def ask_scheduled(self, conn: AsyncConnection, goals: AccountGoals,
                            account_id: str, name: str, operation: str,
                            params: dict[str, Any], slots: list[tuple[Any, float, str]], *,
                            schedule_id: str, due_at: float, requested_by: str,
                            ) -> list[str | None]:
        """The operations a schedule's run asks, one for each ``(machine row, not_before,
        reason)`` of ``slots``, in the run's transaction (hub/schedules.py): each handed out
        at its ``not_before``, Queued with its ``reason`` until then, its start timeout
        counted from then. What ``ask`` refuses at once is stored as an operation that
        Failed at once with that code. The id of each, or None for a machine the extension
        is not set for (the run counts it as skipped).

        A few statements for the whole run rather than a few per machine: on PostgreSQL
        each is a round trip, and the run holds its transaction (and on SQLite the hub's
        one connection) until it commits."""
        now = time.time()
        t = extension_operations
        manifests: dict[tuple[str, str], Manifest] = {}
        checked: dict[str, tuple[str, OperationSpec]] = {}
        refused: dict[str, OutpostError] = {}
        skipped: set[str] = set()
        for machine, _, _ in slots:
            # Not set for the machine: skipped, whatever its agent's state.
            if name not in {r.goal.name for r in goals.resolve(machine, held=True)}:
                skipped.add(machine.id)
                continue
            try:
                checked[machine.id] = await self._checked(
                    account_id, machine, name, operation, now, goals, conn, manifests)
            except OutpostError as exc:
                refused[machine.id] = exc
        versions = {m: v for m, (v, _) in checked.items()}
        versions |= {m: e.details["version"] for m, e in refused.items()
                     if "version" in e.details}
        running: dict[str, Any] = {}
        held: set[str] = set()
        for chunk in _chunks(list(checked)):
            for r in await conn.execute(sa.select(t).where(
                    t.c.machine_id.in_(chunk), t.c.extension == name,
                    t.c.status == "Running").order_by(t.c.started_at)):
                running.setdefault(r.machine_id, r)
        for machine, _, _ in slots:
            previous = running.get(machine.id)
            if machine.id in checked and previous is not None \
                    and previous.expected_end is not None and previous.expected_end < now:
                refused[machine.id] = _overdue(previous, name, machine)
                del checked[machine.id]
        released: set[str] = set()
        for chunk in _chunks(list(checked)):
            ended, kept = await _end_holds(conn, chunk, name)
            released |= ended
            held |= ended | kept
        rows: list[dict[str, Any]] = []
        ids: list[str | None] = []
        for machine, not_before, reason in slots:
            refusal = refused.get(machine.id)
            if machine.id in skipped or (refusal is not None
                                         and refusal.reason == "ext_op_no_goal"):
                ids.append(None)
                continue
            values: dict[str, Any] = {
                "id": random_id(), "account_id": account_id, "machine_id": machine.id,
                "extension": name, "operation": operation, "params": params,
                "requested_by": requested_by, "not_before": not_before,
                "schedule_id": schedule_id, "schedule_due_at": due_at, "attempt": 1,
                "max_attempts": MAX_ATTEMPTS, "next_try_at": None, "item_id": None,
                "created_at": now, "output": "", "result": None, "expected_end": None}
            if refusal is not None:
                values.update(version=versions.get(machine.id), status="Failed",
                              code=refusal.code, message=refusal.message, ended_at=now,
                              start_deadline=None)
            else:
                version, op = checked[machine.id]
                message = reason
                if machine.id in held:
                    message = f"{_held_message(name, machine, machine.id in released)}; {reason}"
                values.update(
                    version=version, status="Waiting" if machine.id in held else "Queued",
                    code=None, message=message, ended_at=None,
                    start_deadline=max(now, not_before) + op.start_timeout_seconds)
            rows.append(values)
            ids.append(values["id"])
        if rows:
            await conn.execute(t.insert(), rows)
        if released:  # installed again: each machine's long-poll answers with the new etag
            await notify.invalidate(conn, "extensions", account_id)
            for machine_id in released:
                await notify.wake(conn, notify.machine(machine_id))
            self._goals.forget(account_id)
        for machine, not_before, _ in slots:
            if machine.id in checked and machine.id not in held and not_before <= now:
                await self._hand_out(conn, machine.id, name, now)
        return ids

    async def _checked(self, account_id: str, machine: Any, name: str, operation: str,
                       now: float, goals: AccountGoals, conn: AsyncConnection | None = None,
                       manifests: dict[tuple[str, str], Manifest] | None = None,
                       ) -> tuple[str, OperationSpec]:
        """The version set for the machine and its operation, or the refusal (EX-3, EX-4,
        EX-10) ``ask`` answers at once."""
        status = machines.status(machine, now)
        if status == "Stopped":
            raise OutpostError(
                "ext_op_machine_stopped", f"The agent of machine {machine.name} is stopped: "
                f"it told the hub it was stopping at {_when(machine.stopped_at)} (its service "
                "was stopped or the machine shut down); the operation would never start.",
                machine=machine.name, stopped_at=machine.stopped_at)
        if status != "Healthy":
            raise OutpostError(
                "ext_op_agent_unresponsive", f"The agent is not ready / unresponsive "
                f"({_alias('ext_op_agent_unresponsive')}): machine {machine.name} is "
                f"{status}, last heard from {_when(machine.last_heartbeat_at)}.",
                machine=machine.name, status=status,
                last_heartbeat_at=machine.last_heartbeat_at)
        resolved = {r.goal.name: r for r in goals.resolve(machine, held=True)}.get(name)
        if resolved is None:
            raise OutpostError("ext_op_no_goal", f"Extension {name} is not set for machine "
                               f"{machine.name}.", name=name, machine=machine.name)
        version = resolved.package.version
        manifests = {} if manifests is None else manifests
        if (name, version) not in manifests:
            manifests[(name, version)] = await self._manifest(account_id, name, version, conn)
        manifest = manifests[(name, version)]
        op = manifest.operations.get(operation)
        if op is None:
            known = ", ".join(sorted(manifest.operations)) or "none"
            raise OutpostError(
                "ext_op_unknown_operation", f"Extension {name} {version} has no operation "
                f"'{operation}' (its operations: {known}).", name=name, version=version,
                operation=operation)
        agent = machine.agent_version or "0"
        if version_key(agent) < version_key(manifest.min_agent_version):
            raise OutpostError(
                "ext_op_agent_too_old", f"The Linux agent is out of date "
                f"({_alias('ext_op_agent_too_old')}): extension {name} {version} needs agent "
                f"{manifest.min_agent_version} or newer; machine {machine.name} runs "
                f"{agent}.", name=name, version=version, needed=manifest.min_agent_version,
                agent_version=agent, machine=machine.name)
        return version, op

    async def _insert(self, conn: AsyncConnection, account_id: str, machine: Any, name: str,
                      version: str, op: OperationSpec, now: float,
                      values: dict[str, Any]) -> bool:
        """Store a checked operation (``values``: id, operation, params, requested_by) and
        hand it out if its turn has come; True if it released a hold (the caller forgets
        the account's goals after its commit)."""
        previous = (await conn.execute(
            sa.select(extension_operations).where(
                extension_operations.c.machine_id == machine.id,
                extension_operations.c.extension == name,
                extension_operations.c.status == "Running")
            .order_by(extension_operations.c.started_at))).first()
        if previous is not None and previous.expected_end is not None \
                and previous.expected_end < now:
            raise _overdue(previous, name, machine)
        released, kept = await _end_holds(conn, [machine.id], name)
        held = bool(released or kept)
        status_now, message = "Queued", ""
        if held:
            status_now = "Waiting"
            message = _held_message(name, machine, bool(released))
        await conn.execute(extension_operations.insert().values(
            **values, account_id=account_id, machine_id=machine.id, extension=name,
            version=version, status=status_now, code=None, message=message, attempt=1,
            max_attempts=MAX_ATTEMPTS, next_try_at=None, item_id=None, created_at=now,
            output="", result=None, start_deadline=now + op.start_timeout_seconds,
            expected_end=None))
        if released:  # installed again: the machine's long-poll answers with the new etag
            await notify.invalidate(conn, "extensions", account_id)
            await notify.wake(conn, notify.machine(machine.id))
        elif not held:
            await self._hand_out(conn, machine.id, name, now)
        return bool(released)

    async def show(self, account_id: str, op_id: str) -> dict[str, Any]:
        async with self._engine.connect() as conn:
            row = (await conn.execute(sa.select(extension_operations).where(
                extension_operations.c.id == op_id,
                extension_operations.c.account_id == account_id))).first()
            if row is None:
                raise OutpostError("ext_op_not_found", f"No extension operation '{op_id}' in "
                                   "this account.", op_id=op_id)
            return (await self._named(conn, [row]))[0]

    async def listing(self, account_id: str, machine: Any | None = None,
                      extension: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        query = sa.select(extension_operations).where(
            extension_operations.c.account_id == account_id)
        if machine is not None:
            query = query.where(extension_operations.c.machine_id == machine.id)
        if extension is not None:
            query = query.where(extension_operations.c.extension == extension)
        query = query.order_by(extension_operations.c.created_at.desc()).limit(limit)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
            return await self._named(conn, rows)

    async def hold(self, account_id: str, machine: Any, name: str) -> dict[str, Any]:
        """Uninstall extension ``name`` from one machine, whatever its state: its goal is
        held back for that machine until the next operation asked of it there finds it
        uninstalled (``_end_holds``)."""
        goals = await self._goals.get(account_id)
        if name not in goals.by_target.get(("machine", machine.name), {}) and \
                name not in goals.by_target.get(("group", machine.group_name), {}):
            raise OutpostError("ext_op_no_goal", f"Extension {name} is not set for machine "
                               f"{machine.name}.", name=name, machine=machine.name)
        now = time.time()
        async with self._engine.begin() as conn:
            exists = (await conn.execute(sa.select(extension_holds.c.name).where(
                extension_holds.c.machine_id == machine.id,
                extension_holds.c.name == name))).first()
            if exists is None:
                await conn.execute(extension_holds.insert().values(
                    machine_id=machine.id, name=name, held_at=now))
            await notify.invalidate(conn, "extensions", account_id)
            # Its long-poll answers with the new etag: uninstalled in milliseconds, not at
            # the next heartbeat.
            await notify.wake(conn, notify.machine(machine.id))
        self._goals.forget(account_id)
        return {"name": name, "machine": machine.name, "machine_id": machine.id,
                "uninstalling": True}

    async def _named(self, conn: AsyncConnection, rows: Any) -> list[dict[str, Any]]:
        ids = {r.machine_id for r in rows}
        names: dict[str, str] = {}
        if ids:
            for r in await conn.execute(sa.select(machine_rows.c.id, machine_rows.c.name)
                                        .where(machine_rows.c.id.in_(ids))):
                names[r.id] = r.name
        return [view(r) | {"machine": names.get(r.machine_id, r.machine_id)} for r in rows]

    async def _manifest(self, account_id: str, name: str, version: str,
                        conn: AsyncConnection | None = None) -> Manifest:
        query = sa.select(extension_packages.c.manifest).where(
            extension_packages.c.account_id == account_id,
            extension_packages.c.name == name, extension_packages.c.version == version)
        if conn is not None:
            row = (await conn.execute(query)).first()
        else:
            async with self._engine.connect() as own:
                row = (await own.execute(query)).first()
        if row is None:  # removed since the goals were read
            raise OutpostError("ext_op_no_goal", f"Extension {name} {version} is no longer "
                               "published.", name=name, machine="")
        return Manifest.model_validate(row.manifest)

    # --- handing out ---------------------------------------------------------------------
    async def _hand_out(self, conn: AsyncConnection, machine_id: str, name: str,
                        now: float) -> None:
        """The oldest Queued operation of ``name`` on the machine gets a work item, unless
        another one of them is handed out or running."""
        t = extension_operations
        busy = (await conn.execute(sa.select(t.c.id).where(
            t.c.machine_id == machine_id, t.c.extension == name,
            sa.or_(t.c.status == "Running",
                   sa.and_(t.c.status.in_(("Queued", "Waiting")),
                           t.c.item_id.is_not(None)))).limit(1))).first()
        if busy is not None:
            return
        row = (await conn.execute(sa.select(t).where(
            t.c.machine_id == machine_id, t.c.extension == name, t.c.status == "Queued",
            t.c.item_id.is_(None), *_due(now))
            .order_by(t.c.created_at).limit(1))).first()
        if row is None:
            return
        item_id = random_id()
        values: dict[str, Any] = {"item_id": item_id}
        if row.not_before is not None and row.message.startswith(SCHEDULED):
            values["message"] = ""  # its time has come
        claimed = (await conn.execute(t.update().where(
            t.c.id == row.id, t.c.item_id.is_(None), t.c.status == "Queued").values(
                **values))).rowcount
        if not claimed:
            return
        payload = wire.ExtOpPayload(
            op_id=row.id, extension=row.extension, version=row.version,
            operation=row.operation, attempt=int(row.attempt), params=row.params or {},
            deadline=row.start_deadline).model_dump()
        await conn.execute(work_items.insert().values(
            id=item_id, account_id=row.account_id, machine_id=machine_id, group_name=None,
            kind=wire.EXT_OP, payload=payload, created_at=now))
        await notify.wake(conn, notify.machine(machine_id))

    async def tick(self) -> None:
        """The periodic pass (every replica may run it: each change is conditional)."""
        now = time.time()
        t = extension_operations
        health = getattr(self._engine, "health", None)
        failures = health.failures if health is not None else 0
        async with self._engine.begin() as conn:
            await self._end_lost(conn, time.time(), failures)
            late = (await conn.execute(sa.select(t.c.id, t.c.message, t.c.item_id).where(
                t.c.status.in_(("Queued", "Waiting")), t.c.start_deadline.is_not(None),
                t.c.start_deadline < now))).all()
            for row in late:
                why = f" (it was {row.message})" if row.message else ""
                await conn.execute(t.update().where(
                    t.c.id == row.id, t.c.status.in_(("Queued", "Waiting"))).values(
                        status="Failed", code=_alias("ext_op_start_timeout"), ended_at=now,
                        message=f"{START_TIMEOUT_TEXT}{why}.", next_try_at=None))
                if row.item_id is not None:  # not to be run by an agent that comes back
                    await conn.execute(work_items.delete().where(
                        work_items.c.id == row.item_id, work_items.c.claimed_by.is_(None)))
            await self._end_asked_holds(conn)
            # Waiting for the extension to be installed again (after an uninstall).
            waiting = (await conn.execute(sa.select(t.c.id, t.c.machine_id, t.c.extension,
                                                    t.c.created_at).where(
                t.c.status == "Waiting", t.c.item_id.is_(None)))).all()
            for row in waiting:
                state = (await conn.execute(sa.select(
                    extension_states.c.state, extension_states.c.reported_at).where(
                    extension_states.c.machine_id == row.machine_id,
                    extension_states.c.name == row.extension))).first()
                still_held = (await conn.execute(sa.select(extension_holds.c.name).where(
                    extension_holds.c.machine_id == row.machine_id,
                    extension_holds.c.name == row.extension))).first() is not None
                # Ready as reported since it was asked: not a Ready from before the uninstall
                # (nor one the agent reported before it saw the hold).
                if state is not None and state.state == "Ready" and not still_held \
                        and state.reported_at >= row.created_at:
                    await conn.execute(t.update().where(
                        t.c.id == row.id, t.c.status == "Waiting",
                        t.c.item_id.is_(None)).values(status="Queued", message=""))
            pending = (await conn.execute(sa.select(t.c.machine_id, t.c.extension).where(
                t.c.status == "Queued", t.c.item_id.is_(None), *_due(now)).distinct())).all()
            for row in pending:
                await self._hand_out(conn, row.machine_id, row.extension, now)
        self._tick_ended, self._failures = time.monotonic(), failures

    async def _end_asked_holds(self, conn: AsyncConnection) -> None:
        """End each hold that an operation waits on once its machine has uninstalled the
        extension: the goal comes back, and the agent installs it again."""
        t, h = extension_operations, extension_holds
        asked = (await conn.execute(sa.select(h.c.machine_id, h.c.name).select_from(
            t.join(h, sa.and_(h.c.machine_id == t.c.machine_id, h.c.name == t.c.extension)))
            .where(t.c.status == "Waiting", t.c.item_id.is_(None)).distinct())).all()
        accounts: set[str] = set()
        for row in asked:
            released, _ = await _end_holds(conn, [row.machine_id], row.name)
            if not released:
                continue
            account_id = await conn.scalar(sa.select(machine_rows.c.account_id).where(
                machine_rows.c.id == row.machine_id))
            if account_id is not None:
                accounts.add(account_id)
            await conn.execute(t.update().where(
                t.c.machine_id == row.machine_id, t.c.extension == row.name,
                t.c.status == "Waiting", t.c.item_id.is_(None)).values(
                message=f"waiting for extension {row.name} to be installed again"))
            await notify.wake(conn, notify.machine(row.machine_id))
        for account_id in accounts:
            await notify.invalidate(conn, "extensions", account_id)
            self._goals.forget(account_id)

    async def _end_lost(self, conn: AsyncConnection, now: float, failures: int) -> None:
        """End Failed (E9093) each Running operation whose agent is gone: no heartbeat from
        its machine for a lease, or a heartbeat from an agent process started after the
        operation was claimed. As the jobs' reaper does (jobs/leases.py), a silence is
        counted only from when this process could record heartbeats: its first pass, a
        database failure it saw, or a pass late by more than REAP_GAP moves that time to now,
        so a hub or database outage fails nothing by itself."""
        began = time.monotonic()
        if self._trusted_from is None or self._tick_ended is None \
                or began - self._tick_ended > REAP_GAP or failures != self._failures:
            self._trusted_from = now
        t, m = extension_operations, machine_rows
        rows = (await conn.execute(
            sa.select(t.c.id, t.c.machine_id, t.c.extension, t.c.operation, t.c.attempt,
                      t.c.started_at, m.c.name, m.c.last_heartbeat_at, m.c.heartbeat_interval,
                      m.c.heartbeat, m.c.stopped_at, t.c.started_run,
                      work_items.c.claimed_at)
            .select_from(t.join(m, m.c.id == t.c.machine_id)
                         .outerjoin(work_items, work_items.c.id == t.c.item_id))
            .where(t.c.status == "Running"))).all()
        await self._hand_out_again(conn, now)
        for row in rows:
            lease = max(LEASE_BEATS * float(row.heartbeat_interval or 30.0), LEASE_MIN)
            heard = row.last_heartbeat_at or 0.0
            uptime = (row.heartbeat or {}).get("uptime_seconds")
            # 0 or none: an agent that does not say (every agent's uptime is above 0).
            began_at = heard - float(uptime) if isinstance(uptime, (int, float)) \
                and uptime > 0 else None
            run = (row.heartbeat or {}).get("run")
            other_run = bool(row.started_run and run and run != row.started_run)
            what = f"{row.operation} of extension {row.extension} on {row.name}"
            if now - max(heard, self._trusted_from) > lease:
                stop = (f"; it told the hub it was stopping at {_when(row.stopped_at)}"
                        if row.stopped_at else "")
                why = (f"the agent stopped heartbeating while the operation {what} ran: "
                       f"last heard from at {_when(row.last_heartbeat_at)}, over "
                       f"{lease:.0f} s ago (3 heartbeat intervals){stop}; how far it got "
                       "is unknown")
            elif other_run or (began_at is not None and row.claimed_at is not None
                               and began_at > row.claimed_at + RESTART_MARGIN):
                again = f"at {_when(began_at)}" if began_at is not None else "since"
                why = (f"the agent stopped while the operation {what} ran and started again "
                       f"{again} (after the operation was handed to it at "
                       f"{_when(row.claimed_at or row.started_at)}); the new agent does not "
                       "run it, and how far it got is unknown")
            else:
                continue
            ended = (await conn.execute(t.update().where(
                t.c.id == row.id, t.c.status == "Running", t.c.attempt == row.attempt).values(
                    status="Failed", code=entry("ext_op_agent_lost").code, ended_at=now,
                    message=why[:1].upper() + why[1:] + ".", next_try_at=None))).rowcount
            if ended:
                await self._hand_out(conn, row.machine_id, row.extension, now)

    async def _hand_out_again(self, conn: AsyncConnection, now: float) -> None:
        """An operation the agent held back for the machine's load (Waiting, its work item
        taken) whose agent has since started again: it never started, so it goes back in
        line for the new agent rather than waiting out its start timeout."""
        t, m = extension_operations, machine_rows
        rows = (await conn.execute(
            sa.select(t.c.id, t.c.machine_id, t.c.extension, t.c.attempt, t.c.item_id,
                      t.c.started_run, t.c.waiting_since, t.c.waited_seconds, m.c.heartbeat)
            .select_from(t.join(m, m.c.id == t.c.machine_id))
            .where(t.c.status == "Waiting", t.c.item_id.is_not(None),
                   t.c.started_run.is_not(None)))).all()
        for row in rows:
            run = (row.heartbeat or {}).get("run")
            if not run or run == row.started_run:
                continue
            again = (await conn.execute(t.update().where(
                t.c.id == row.id, t.c.status == "Waiting", t.c.attempt == row.attempt,
                t.c.item_id == row.item_id).values(
                    status="Queued", item_id=None, started_run=None, waiting_since=None,
                    waited_seconds=round((row.waited_seconds or 0.0) + max(
                        0.0, now - (row.waiting_since or now)), 3),
                    message="the agent started again while the operation waited for the "
                            "machine's load; handed out to the new agent"))).rowcount
            if again:
                await conn.execute(work_items.delete().where(work_items.c.id == row.item_id))
                await self._hand_out(conn, row.machine_id, row.extension, now)

    # --- agents --------------------------------------------------------------------------
    async def _mine(self, conn: AsyncConnection, machine: Any, op_id: str,
                    attempt: int) -> Any:
        row = (await conn.execute(sa.select(extension_operations).where(
            extension_operations.c.id == op_id,
            extension_operations.c.machine_id == machine.id))).first()
        if row is None or int(row.attempt) != attempt or row.status not in ACTIVE:
            raise OutpostError("ext_op_stale_report", op_id=op_id, attempt=attempt)
        return row

    @staticmethod
    async def _run_of(conn: AsyncConnection, machine_id: str) -> str | None:
        """The run of the machine's agent as its last recorded heartbeat says."""
        beat = (await conn.execute(sa.select(machine_rows.c.heartbeat).where(
            machine_rows.c.id == machine_id))).scalar()
        run = (beat or {}).get("run") if isinstance(beat, dict) else None
        return str(run)[:32] if run else None

    async def progress(self, machine: Any, op_id: str, body: wire.ExtOpProgress) -> None:
        t = extension_operations
        async with self._engine.begin() as conn:
            row = await self._mine(conn, machine, op_id, body.attempt)
            if body.state == "waiting":
                values: dict[str, Any] = {"status": "Waiting", "message": body.message,
                                          "wait_reason": body.message,
                                          "waiting_since": row.waiting_since or body.at}
            else:
                manifest = await self._manifest(row.account_id, row.extension,
                                                row.version or "", conn)
                op = manifest.operations.get(row.operation)
                expected = op.expected_seconds if op is not None else None
                values = {"status": "Running", "message": body.message,
                          "started_at": row.started_at or body.at}
                if expected is not None:
                    values["expected_end"] = values["started_at"] + expected
                if row.waiting_since is not None:  # the load passed: how long it held it
                    values["waiting_since"] = None
                    values["waited_seconds"] = round(
                        (row.waited_seconds or 0.0) + max(0.0, body.at - row.waiting_since), 3)
            if row.started_run is None:  # the agent process that took it
                values["started_run"] = await self._run_of(conn, machine.id)
            await conn.execute(t.update().where(t.c.id == op_id,
                                                t.c.attempt == body.attempt,
                                                t.c.status.in_(ACTIVE)).values(**values))

    async def end(self, machine: Any, op_id: str, body: wire.ExtOpEnd) -> None:
        t = extension_operations
        now = time.time()
        async with self._engine.begin() as conn:
            row = await self._mine(conn, machine, op_id, body.attempt)
            output = body.output[-OUTPUT_KEPT:]
            if body.status == "failed" and body.transient and row.attempt < row.max_attempts:
                delay = min(RETRY_CAP, RETRY_BASE * 2 ** (int(row.attempt) - 1))
                manifest = await self._manifest(row.account_id, row.extension,
                                                row.version or "", conn)
                op = manifest.operations.get(row.operation)
                start_timeout = op.start_timeout_seconds if op is not None else 600.0
                values: dict[str, Any] = {
                    "status": "Queued", "attempt": int(row.attempt) + 1, "item_id": None,
                    "next_try_at": now + delay, "code": body.code, "output": output,
                    "started_at": None, "started_run": None, "expected_end": None,
                    "start_deadline": now + delay + start_timeout,
                    "message": f"attempt {row.attempt} of {row.max_attempts} failed "
                               f"({body.code or 'no code'}: {body.message}); attempt "
                               f"{int(row.attempt) + 1} at {_when(now + delay)}"}
            else:
                values = {"status": "Succeeded" if body.status == "succeeded" else "Failed",
                          "code": body.code, "message": body.message, "output": output,
                          "result": body.result, "ended_at": body.at or now,
                          "next_try_at": None}
                if body.status == "failed" and body.transient:
                    values["message"] = (f"{body.message} (attempt {row.attempt} of "
                                         f"{row.max_attempts}; no attempts left)")
            done = (await conn.execute(t.update().where(
                t.c.id == op_id, t.c.attempt == body.attempt,
                t.c.status.in_(ACTIVE)).values(**values))).rowcount
            if done and values["status"] != "Queued":
                for listener in self.ended:
                    await listener(conn, row, values)
            await self._hand_out(conn, machine.id, row.extension, now)
