"""Failover, test failover and failback: the recovery actions (table ``recovery_actions``,
docs/recovery.md), each a small state machine of hub/actions.py that the recovery pass
(hub/recovery.py, ``Recovery.tick``) advances.

A failover asks ``recover`` of the point on the target (with ``source_machine_id``: it reads
the source's repository through a restore grant), then runs the protection's post-failover
runbook there as a job; a test failover does the same into a scratch directory and leaves the
source's protection as it is; a failback takes a point of the paths on the machine failed over
to (tag ``failback``), recovers it on the source and resumes the protection. The first step is
asked in the request, so a silent target is refused at once (E9080, 151099); each next step
is started by the pass, every move a conditional update.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from outpost.protocol.errors import OutpostError, entry

from . import actions, backup_catalog, machines, runbooks
from .config import random_id
from .db import protections, recovery_actions
from .db import machines as machine_rows
from .extension_ops import ExtensionOps
from .jobs import submission

log = logging.getLogger("outpost.hub.failover")

NAME = "recovery"  # the extension
SCRATCH = "/var/tmp/outpost-recovery"  # a test failover restores under SCRATCH/<action id>
KINDS = ("failover", "test", "failback")
ACTIVE = ("Queued", "Restoring", "RunningRunbook")
# The facts of an action a post-failover runbook may declare as parameters (each reaches
# its script as an environment variable of that name).
RUNBOOK_FACTS = ("recovery_action", "recovery_kind", "source_machine", "target_machine",
                 "recovery_point", "target_dir")
KIND_TEXT = {"failover": "failover", "test": "test failover", "failback": "failback"}


def _when(at: float | None) -> str:
    return "never" if at is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def _directory(target_dir: str | None) -> None:
    if target_dir is not None and not target_dir.startswith("/"):
        problem = f"the target directory must be absolute (not {target_dir})"
        raise OutpostError("recovery_settings_invalid", f"The protection's settings are not "
                           f"usable: {problem}.", problem=problem)


def action_view(row: Any, names: dict[str, str]) -> dict[str, Any]:
    return {
        "id": row.id, "kind": row.kind, "machine": names.get(row.machine_id, row.machine_id),
        "machine_id": row.machine_id,
        "target": names.get(row.target_machine_id, row.target_machine_id),
        "target_machine_id": row.target_machine_id, "point": row.point,
        "target_dir": row.target_dir, "status": row.status, "step": row.step,
        "op_id": row.op_id, "job_id": row.job_id, "code": row.code, "message": row.message,
        "output": row.output or [], "attempts": int(row.attempts),
        "requested_by": row.requested_by, "created_at": row.created_at,
        "updated_at": row.updated_at, "ended_at": row.ended_at,
    }


async def protection_row(engine: AsyncEngine, account_id: str, machine: Any) -> Any:
    """The protection of ``machine`` (E9121 when it has none)."""
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(protections).where(
            protections.c.account_id == account_id,
            protections.c.machine_id == machine.id))).first()
    if row is None:
        raise OutpostError("recovery_not_protected", f"Machine {machine.name} is not "
                           "protected.", machine=machine.name)
    return row


class Failovers:
    """The recovery actions of every account; one per hub process (``Recovery.failovers``)."""

    def __init__(self, engine: AsyncEngine, ext_ops: ExtensionOps) -> None:
        self._engine = engine
        self._ops = ext_ops

    async def _row(self, account_id: str, machine: Any) -> Any:
        return await protection_row(self._engine, account_id, machine)

    async def list_actions(self, account_id: str, machine: Any | None = None,
                      limit: int = 200) -> list[dict[str, Any]]:
        t = recovery_actions
        query = sa.select(t).where(t.c.account_id == account_id)
        if machine is not None:
            query = query.where(t.c.machine_id == machine.id)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query.order_by(t.c.created_at.desc()).limit(limit))).all()
            names = {m.id: m.name for m in await conn.execute(
                sa.select(machine_rows.c.id, machine_rows.c.name).where(
                    machine_rows.c.account_id == account_id))}
        return [action_view(r, names) for r in rows]

    async def action(self, account_id: str, action_id: str) -> dict[str, Any]:
        t = recovery_actions
        async with self._engine.connect() as conn:
            row = (await conn.execute(sa.select(t).where(
                t.c.account_id == account_id, t.c.id == action_id))).first()
            if row is None:
                raise OutpostError("recovery_action_not_found", f"No recovery action "
                                   f"'{action_id}' in this account.", action=action_id)
            names = {m.id: m.name for m in await conn.execute(
                sa.select(machine_rows.c.id, machine_rows.c.name).where(
                    machine_rows.c.id.in_([row.machine_id, row.target_machine_id])))}
        return action_view(row, names)

    async def idle(self, account_id: str, machine: Any) -> None:
        t = recovery_actions
        async with self._engine.connect() as conn:
            busy = (await conn.execute(sa.select(t.c.id, t.c.kind, t.c.status).where(
                t.c.machine_id == machine.id, t.c.status.in_(ACTIVE)).limit(1))).first()
        if busy is not None:
            raise OutpostError("recovery_action_busy", f"A recovery action of machine "
                               f"{machine.name} is still running: {KIND_TEXT[busy.kind]} "
                               f"{busy.id} is {busy.status}.", machine=machine.name,
                               action=busy.id)

    async def failover(self, account_id: str, machine: Any, target: Any, point: str,
                       test: bool, target_dir: str | None,
                       requested_by: str | None) -> dict[str, Any]:
        """Recover a point of ``machine`` on ``target`` (a test: into a scratch directory,
        the source's protection untouched), then its post-failover runbook there."""
        p = await self._row(account_id, machine)
        if p.state == "FailedOver" and not test:
            active = await machines.by_id(self._engine, p.active_machine_id or "")
            raise OutpostError("recovery_failed_over", f"Machine {machine.name} is failed over "
                               f"to {active.name if active else p.active_machine_id}.",
                               machine=machine.name, target=active.name if active else "")
        if target.id == machine.id:
            raise OutpostError("recovery_target_invalid", f"Machine {target.name} cannot be "
                               "the target: it is the protected machine itself.",
                               target=target.name, problem="it is the protected machine")
        if p.target_group and target.group_name != p.target_group:
            raise OutpostError("recovery_target_invalid", f"Machine {target.name} cannot be "
                               f"the target: it is in group {target.group_name}, not in the "
                               f"protection's target group {p.target_group}.",
                               target=target.name, problem="not in the target group")
        _directory(target_dir)
        await self.idle(account_id, machine)
        chosen = await backup_catalog.show(self._engine, account_id, machine, point, "recovery")
        if chosen["forgotten_at"] is not None:
            raise OutpostError("backup_snapshot_forgotten", f"Snapshot {chosen['short_id']} "
                               f"of machine {machine.name} was forgotten (operation "
                               f"{chosen['forgotten_by']}).", snapshot=chosen["short_id"],
                               machine=machine.name)
        action_id = random_id()
        directory = target_dir or (f"{SCRATCH}/{action_id}" if test else "/")
        params = {"point": chosen["id"], "target": directory,
                  "source_machine_id": machine.id, "source_machine": machine.name}
        # Asked at once: a target whose agent is silent is refused now (E9080, 151099),
        # naming it, and nothing is stored.
        op = await self._ops.ask(account_id, target, NAME, "recover", params, requested_by)
        kind = "test" if test else "failover"
        now = time.time()
        async with self._engine.begin() as conn:
            await conn.execute(recovery_actions.insert().values(
                id=action_id, account_id=account_id, machine_id=machine.id, kind=kind,
                target_machine_id=target.id, point=chosen["id"], target_dir=directory,
                status="Restoring", step="recover", op_id=op["id"], job_id=None, code=None,
                message=f"recovering point {chosen['short_id']} on {target.name} into "
                        f"{directory}", output=[], attempts=1,
                requested_by=op["requested_by"], created_at=now, updated_at=now,
                ended_at=None))
            if not test:  # the source's points stop while its data moves to the target
                await conn.execute(protections.update().where(protections.c.id == p.id).values(
                    state="FailedOver", active_machine_id=target.id, updated_at=now,
                    updated_by=op["requested_by"]))
        log.info("%s of %s to %s asked (action %s)", KIND_TEXT[kind], machine.name,
                 target.name, action_id)
        return await self.action(account_id, action_id)

    async def failback(self, account_id: str, machine: Any, target_dir: str | None,
                       requested_by: str | None) -> dict[str, Any]:
        """Take a point of the protection's paths on the machine failed over to, recover it
        on ``machine`` (into ``target_dir``, default the files' places), resume protection."""
        p = await self._row(account_id, machine)
        if p.state != "FailedOver" or not p.active_machine_id:
            raise OutpostError("recovery_not_failed_over", f"Machine {machine.name} is not "
                               f"failed over (its protection is {p.state}).",
                               machine=machine.name)
        _directory(target_dir)
        await self.idle(account_id, machine)
        status = machines.status(machine, time.time())
        if status != "Healthy":  # the recover on it would be refused: say so before the point
            raise OutpostError(
                "ext_op_agent_unresponsive", f"The agent is not ready / unresponsive "
                f"(151099): machine {machine.name} is {status}, last heard from "
                f"{_when(machine.last_heartbeat_at)}.", machine=machine.name, status=status,
                last_heartbeat_at=machine.last_heartbeat_at)
        active = await machines.by_id(self._engine, p.active_machine_id)
        if active is None:
            raise OutpostError("recovery_target_invalid", f"Machine {p.active_machine_id} "
                               "cannot be the source of the failback: it was removed.",
                               target=p.active_machine_id, problem="it was removed")
        op = await self._ops.ask(account_id, active, NAME, "point",
                                 {"paths": list(p.paths), "tag": "failback"}, requested_by)
        action_id, now = random_id(), time.time()
        async with self._engine.begin() as conn:
            await conn.execute(recovery_actions.insert().values(
                id=action_id, account_id=account_id, machine_id=machine.id, kind="failback",
                target_machine_id=machine.id, point=None, target_dir=target_dir or "/",
                status="Queued", step="point", op_id=op["id"], job_id=None, code=None,
                message=f"taking a point of {', '.join(p.paths)} on {active.name}",
                output=[], attempts=1, requested_by=op["requested_by"], created_at=now,
                updated_at=now, ended_at=None))
        return await self.action(account_id, action_id)

    # --- the pass ------------------------------------------------------------------------
    async def tick(self) -> None:
        """Each active action's next step, if what it waits on has ended."""
        t = recovery_actions
        now = time.time()
        async with self._engine.connect() as conn:
            rows = (await conn.execute(sa.select(t).where(t.c.status.in_(ACTIVE)))).all()
            waits = {}
            for row in rows:
                if row.job_id:
                    waits[row.id] = await actions.job_outcome(conn, row.job_id)
                elif row.op_id:
                    waits[row.id] = await actions.op_outcome(conn, row.op_id)
        for row in rows:
            outcome = waits.get(row.id)
            try:
                if outcome is None:
                    if actions.stalled(row, now):
                        await self._restart(row)
                    continue
                if not outcome.done:
                    if outcome.message and outcome.status == "Waiting":
                        await self._say(row, f"{row.step}: {outcome.status}: {outcome.message}")
                    continue
                await self._next(row, outcome)
            except OutpostError as exc:
                await self._fail(row, exc.code, f"step {row.step}: {exc.message}")

    async def _say(self, row: Any, message: str) -> None:
        if message != row.message:
            async with self._engine.begin() as conn:
                await conn.execute(recovery_actions.update().where(
                    recovery_actions.c.id == row.id, recovery_actions.c.status == row.status,
                    recovery_actions.c.step == row.step).values(message=message))

    async def _fail(self, row: Any, code: str | None, message: str,
                    output: list[str] | None = None) -> None:
        async with self._engine.begin() as conn:
            moved = await actions.move(conn, recovery_actions, row, status="Failed", code=code,
                                       message=message, output=output or row.output or [])
            if moved and row.kind == "failover":  # the source is protected again
                await conn.execute(protections.update().where(
                    protections.c.machine_id == row.machine_id,
                    protections.c.state == "FailedOver",
                    protections.c.active_machine_id == row.target_machine_id).values(
                        state="Protecting", active_machine_id=None, next_point_at=time.time(),
                        updated_at=time.time()))
        log.warning("recovery action %s failed: %s", row.id, message)

    async def _next(self, row: Any, outcome: actions.Outcome) -> None:
        what = "the post-failover runbook's job" if row.step == "runbook" else \
            f"the {row.step} operation"
        if not outcome.ok:
            code = outcome.code or (entry("recovery_action_failed").code
                                    if row.step == "runbook" else None)
            await self._fail(row, code,
                             f"{what} {row.job_id or row.op_id} {outcome.status}: "
                             f"{outcome.message}", outcome.output)
            return
        if row.kind == "failback" and row.step == "point":
            await self._failback_recover(row, outcome)
        elif row.step == "recover" and row.kind in ("failover", "test"):
            await self._runbook(row, outcome)
        else:
            await self._succeed(row, outcome)

    async def _succeed(self, row: Any, outcome: actions.Outcome) -> None:
        now = time.time()
        output = list(row.output or []) + outcome.output
        async with self._engine.begin() as conn:
            moved = await actions.move(conn, recovery_actions, row, status="Succeeded",
                                       message=f"{KIND_TEXT[row.kind]} done",
                                       output=output[-actions.OUTPUT_LINES:])
            if moved and row.kind == "failback":
                await conn.execute(protections.update().where(
                    protections.c.machine_id == row.machine_id).values(
                        state="Protecting", active_machine_id=None, next_point_at=now,
                        reason=None, updated_at=now))

    async def _runbook(self, row: Any, outcome: actions.Outcome) -> None:
        async with self._engine.connect() as conn:
            p = (await conn.execute(sa.select(protections).where(
                protections.c.machine_id == row.machine_id))).first()
        book = p.post_failover_runbook if p is not None else None
        lines = [f"recover: {outcome.message}"] if outcome.message else []
        if not book:
            await self._succeed(row, actions.Outcome(True, True, output=lines))
            return
        target = await machines.by_id(self._engine, row.target_machine_id)
        source = await machines.by_id(self._engine, row.machine_id)
        if target is None or source is None:
            await self._fail(row, None, "the target or the source machine was removed")
            return
        declared = {s["name"] for s in (await runbooks.get(
            self._engine, row.account_id, book))["params"]}
        facts = {"recovery_action": row.id, "recovery_kind": row.kind,
                 "source_machine": source.name, "target_machine": target.name,
                 "recovery_point": row.point or "", "target_dir": row.target_dir or "/"}
        values = await submission.prepare(self._engine, row.account_id, book,
                                          target.group_name,
                                          {k: v for k, v in facts.items() if k in declared})
        values["target_machine_id"] = target.id  # this machine, not any of its group
        async with self._engine.begin() as conn:
            moved = await actions.move(conn, recovery_actions, row, status="RunningRunbook",
                                       step="runbook", job_id=values["id"],
                                       output=(list(row.output or []) + lines),
                                       message=f"running runbook {book} on {target.name} "
                                               f"(job {values['id']})")
            if moved:
                await submission.insert(conn, values)

    async def _failback_recover(self, row: Any, outcome: actions.Outcome) -> None:
        point = outcome.result.get("snapshot_id") or outcome.result.get("snapshot")
        async with self._engine.connect() as conn:
            p = (await conn.execute(sa.select(protections).where(
                protections.c.machine_id == row.machine_id))).first()
        if not isinstance(point, str) or p is None or not p.active_machine_id:
            await self._fail(row, None, "the failback point reported no snapshot id")
            return
        async with self._engine.begin() as conn:  # claimed: op_id None until asked
            moved = await actions.move(conn, recovery_actions, row, status="Restoring",
                                       step="recover", op_id=None, point=point,
                                       message=f"recovering point {point[:8]} on the source")
        if not moved:
            return
        await self._ask_recover(row.id, p.active_machine_id, point)

    async def _ask_recover(self, action_id: str, active_id: str, point: str) -> None:
        t = recovery_actions
        async with self._engine.connect() as conn:
            row = (await conn.execute(sa.select(t).where(t.c.id == action_id))).first()
        if row is None:
            return
        source = await machines.by_id(self._engine, row.machine_id)
        active = await machines.by_id(self._engine, active_id)
        if source is None or active is None:
            await self._fail(row, None, "the source or the active machine was removed")
            return
        try:
            op = await self._ops.ask(row.account_id, source, NAME, "recover", {
                "point": point, "target": row.target_dir or "/",
                "source_machine_id": active.id, "source_machine": active.name},
                row.requested_by)
        except OutpostError as exc:
            await self._fail(row, exc.code, f"step recover: {exc.message}")
            return
        async with self._engine.begin() as conn:
            await conn.execute(t.update().where(t.c.id == row.id, t.c.op_id.is_(None))
                               .values(op_id=op["id"], updated_at=time.time()))

    async def _restart(self, row: Any) -> None:
        """A step whose replica stopped between claiming it and asking its operation."""
        if row.kind == "failback" and row.step == "recover" and row.point:
            async with self._engine.connect() as conn:
                p = (await conn.execute(sa.select(protections).where(
                    protections.c.machine_id == row.machine_id))).first()
            async with self._engine.begin() as conn:
                moved = await actions.move(conn, recovery_actions, row,
                                           attempts=int(row.attempts) + 1)
            if moved and p is not None and p.active_machine_id:
                await self._ask_recover(row.id, p.active_machine_id, row.point)
        else:
            await self._fail(row, None, f"step {row.step} was never started")
