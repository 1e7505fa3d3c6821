"""Disaster recovery on the hub: protections, their recovery points, and failover, test
failover and failback (docs/recovery.md).

A **protection** (table ``protections``, one per machine) sets the shipped ``recovery``
extension on the machine with role ``source`` (its paths, excludes and pre-script) and, when
it names a target group, on that group with role ``target``. Both goals carry the repository
password the machine's repository already has (its backup goal's), else a new one: the
recovery and backup extensions write into the same repository on the hub
(backup_catalog.password_for, extensions.SHARED_REPOSITORY).

The **point pass** (``tick``, a task on the hub's Supervisor, safe on every replica) asks a
``point`` operation of each Protecting machine every ``interval_seconds`` (RPO/2 by default,
at least ``MIN_INTERVAL``), every Nth one application-consistent, and now and then a
``prune`` by the retention. It claims each turn with a conditional update of
``next_point_at``; a refusal (E9080/151099 for a silent agent, ...) is recorded as the
protection's ``reason``, never raised. Points that end well land in the catalog with kind
``recovery`` (backup_catalog.on_end).

**Health** is computed on read (``health``): Protecting, Behind (the newest point is older
than the RPO, with the cause: the pending point's Waiting message, the agent's silence, the
extension's state and step, the last point's failure, the last refusal), Paused, FailedOver,
Failed (the extension Failed on the machine).

**Actions** (table ``recovery_actions``, advanced by hub/actions.py's helpers in the same
pass): a failover asks ``recover`` of the point on the target (with ``source_machine_id``:
it reads the source's repository through a restore grant), then runs the post-failover
runbook there as a job; a test failover does the same into a scratch directory and leaves
the source's protection as it is; a failback takes a point of the paths on the active
machine (tag ``failback``), recovers it on the source and resumes protection.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from outpost.protocol import durations
from outpost.protocol.errors import OutpostError, entry

from . import actions, backup_catalog, backupstore, machines, runbooks
from .config import random_id
from .db import (backup_snapshots, extension_holds, extension_operations, extension_states,
                 protections, recovery_actions, tokens)
from .db import machines as machine_rows
from .extension_ops import ExtensionOps
from .extensions import Extensions
from .jobs import submission

log = logging.getLogger("outpost.hub.recovery")

NAME = "recovery"
MIN_INTERVAL = 5.0
DEFAULT_RPO = 300.0
PRUNE_EVERY = 3600.0  # at most this long between prunes (half the retention when shorter)
MIN_PRUNE_EVERY = 60.0
SCRATCH = "/var/tmp/outpost-recovery"  # a test failover restores under SCRATCH/<action id>
KINDS = ("failover", "test", "failback")
ACTIVE = ("Queued", "Restoring", "RunningRunbook")
# The facts of an action a post-failover runbook may declare as parameters (each reaches
# its script as an environment variable of that name).
RUNBOOK_FACTS = ("recovery_action", "recovery_kind", "source_machine", "target_machine",
                 "recovery_point", "target_dir")
KIND_TEXT = {"failover": "failover", "test": "test failover", "failback": "failback"}


def _problem(problem: str) -> OutpostError:
    return OutpostError("recovery_settings_invalid", f"The protection's settings are not "
                        f"usable: {problem}.", problem=problem)


def interval_for(rpo: float, given: float | None = None) -> float:
    """Seconds between points: the one given, else half the RPO; never under MIN_INTERVAL."""
    return max(MIN_INTERVAL, given if given is not None else rpo / 2)


def span(seconds: float) -> str:
    """A short age or duration for the health message: 45s, 12m, 2h5m, 3d."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def _when(at: float | None) -> str:
    return "never" if at is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def health(p: Any, machine: Any, newest: Any | None, op: Any | None, ext: Any | None,
           active: Any | None, now: float) -> tuple[str, str]:
    """(health, message) of protection ``p`` of ``machine``: ``newest`` its newest point
    (a catalog row), ``op`` the last point operation asked, ``ext`` the recovery
    extension's reported state there, ``active`` the machine it failed over to."""
    if p.state == "FailedOver":
        where = active.name if active is not None else p.active_machine_id
        return "FailedOver", (f"failed over to {where}; no points are taken until 'outpost "
                              "failback'")
    if ext is not None and ext.state == "NotReady" and str(ext.message).startswith("disabled"):
        return "Paused", ("the recovery extension is disabled on the machine ('outpost "
                          "extension set recovery --machine M --enabled' resumes)")
    rpo = f"RPO {durations.describe(p.rpo_seconds)}"
    taken = None if newest is None else (newest.taken_at or newest.created_at)
    last = "no point yet" if taken is None else f"last point {span(now - taken)} ago"
    ext_note = _extension_note(ext)
    if ext is not None and ext.state == "Failed":
        return "Failed", f"{rpo}, {last}: {ext_note}"
    if taken is not None and now - taken <= p.rpo_seconds:
        return "Protecting", f"{rpo}, {last}" + (f" ({ext_note})" if ext_note else "")
    if taken is None and now - p.created_at <= p.rpo_seconds:
        return "Protecting", f"{rpo}, {last} (the first is due)" + (
            f" ({ext_note})" if ext_note else "")
    return "Behind", f"{rpo}, {last}: behind because {_cause(p, machine, op, ext, now)}"


def _extension_note(ext: Any | None) -> str:
    if ext is None:
        return "the recovery extension has not reported yet"
    if ext.state == "Ready":
        return ""
    step = f" at step {ext.step}" if ext.step else ""
    message = f": {ext.message}" if ext.message else ""
    return f"the recovery extension is {ext.state}{step}{message}"


def _cause(p: Any, machine: Any, op: Any | None, ext: Any | None, now: float) -> str:
    status = machines.status(machine, now)
    if status != "Healthy":
        heard = machine.last_heartbeat_at
        return (f"the agent of {machine.name} is {status} (last heard from "
                + (f"{span(now - heard)} ago)" if heard else "never)"))
    if op is not None and op.status == "Waiting" and op.message:
        return str(op.message).removeprefix("waiting: ")
    note = _extension_note(ext)
    if note:
        return note
    if op is not None and op.status == "Failed":
        return f"the last point failed ({op.code or 'no code'}: {op.message})"
    if p.reason:
        return str(p.reason)
    if op is not None and op.status == "Running":
        return f"a point is being taken (running for {span(now - (op.started_at or now))})"
    if op is not None and op.status == "Queued":
        return f"a point is queued ({op.message})" if op.message else "a point is queued"
    return "no point has been taken yet"


def _view(p: Any, machine: Any, newest: Any | None, op: Any | None, ext: Any | None,
          active: Any | None, kept: tuple[int, int], now: float) -> dict[str, Any]:
    state, message = health(p, machine, newest, op, ext, active, now)
    taken = None if newest is None else (newest.taken_at or newest.created_at)
    return {
        "id": p.id, "machine": machine.name, "machine_id": p.machine_id,
        "health": state, "message": message, "state": p.state,
        "paths": p.paths or [], "exclude": p.exclude or [], "rpo_seconds": p.rpo_seconds,
        "interval_seconds": p.interval_seconds,
        "app_consistent_every": int(p.app_consistent_every),
        "pre_script_runbook": p.pre_script_runbook,
        "post_failover_runbook": p.post_failover_runbook, "target_group": p.target_group,
        "retention": p.retention,
        "active_machine": active.name if active is not None else None,
        "active_machine_id": p.active_machine_id,
        "last_point": None if newest is None else (newest.snapshot_id or newest.short_id),
        "last_point_at": taken,
        "last_point_age_seconds": None if taken is None else round(now - taken, 3),
        "points": kept[0], "points_bytes_added": kept[1],
        "next_point_at": p.next_point_at, "point_op_id": p.point_op_id,
        "point_op_status": op.status if op is not None else None,
        "reason": p.reason,
        "extension_state": ext.state if ext is not None else None,
        "extension_step": ext.step if ext is not None else None,
        "extension_message": ext.message if ext is not None else None,
        "created_by": p.created_by, "created_at": p.created_at,
        "updated_by": p.updated_by, "updated_at": p.updated_at,
    }


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


async def views(engine: AsyncEngine, account_id: str | None, machine: Any | None = None
                ) -> list[dict[str, Any]]:
    """The protections of an account (of one machine; of every account with None), each
    with its health computed now."""
    now = time.time()
    query = sa.select(protections)
    if account_id is not None:
        query = query.where(protections.c.account_id == account_id)
    if machine is not None:
        query = query.where(protections.c.machine_id == machine.id)
    s, o, e = backup_snapshots, extension_operations, extension_states
    async with engine.connect() as conn:
        rows = (await conn.execute(query.order_by(protections.c.created_at))).all()
        if not rows:
            return []
        ids = [r.machine_id for r in rows]
        wanted = ids + [r.active_machine_id for r in rows if r.active_machine_id]
        fleet = {m.id: m for m in await conn.execute(sa.select(machine_rows).where(
            machine_rows.c.id.in_(wanted)))}
        points = (await conn.execute(sa.select(s).where(
            s.c.machine_id.in_(ids), s.c.kind == "recovery", s.c.forgotten_at.is_(None))
            .order_by(s.c.created_at))).all()
        op_ids = [r.point_op_id for r in rows if r.point_op_id]
        ops = {r.id: r for r in await conn.execute(
            sa.select(o).where(o.c.id.in_(op_ids)))} if op_ids else {}
        exts = {r.machine_id: r for r in await conn.execute(sa.select(e).where(
            e.c.machine_id.in_(ids), e.c.name == NAME))}
    newest: dict[str, Any] = {}
    kept: dict[str, list[int]] = {}
    for r in points:
        newest[r.machine_id] = r
        count = kept.setdefault(r.machine_id, [0, 0])
        count[0] += 1
        count[1] += int(r.bytes_added or 0)
    found = []
    for p in rows:
        m = fleet.get(p.machine_id)
        if m is None:
            continue
        k = kept.get(p.machine_id, [0, 0])
        found.append(_view(p, m, newest.get(p.machine_id), ops.get(p.point_op_id or ""),
                           exts.get(p.machine_id), fleet.get(p.active_machine_id or ""),
                           (k[0], k[1]), now))
    return found


class Recovery:
    """Protections, the point pass and the recovery actions; one per hub process."""

    def __init__(self, engine: AsyncEngine, extensions: Extensions, ext_ops: ExtensionOps,
                 store: backupstore.Store) -> None:
        self._engine = engine
        self._store = store
        self._extensions = extensions
        self._ops = ext_ops

    # --- protect / unprotect -------------------------------------------------------------
    async def _who(self, requested_by: str | None) -> str | None:
        if not requested_by:
            return None
        async with self._engine.connect() as conn:
            named = await conn.scalar(sa.select(tokens.c.name).where(
                tokens.c.id == requested_by))
        return str(named or requested_by)

    async def _row(self, account_id: str, machine: Any) -> Any:
        async with self._engine.connect() as conn:
            row = (await conn.execute(sa.select(protections).where(
                protections.c.account_id == account_id,
                protections.c.machine_id == machine.id))).first()
        if row is None:
            raise OutpostError("recovery_not_protected", f"Machine {machine.name} is not "
                               "protected.", machine=machine.name)
        return row

    async def protect(self, account_id: str, machine: Any, *, paths: list[str],
                      exclude: list[str], rpo: float, interval: float | None,
                      app_consistent_every: int, pre_script: str | None,
                      post_failover_runbook: str | None, target_group: str | None,
                      retention: str | None, repair: bool,
                      requested_by: str | None) -> dict[str, Any]:
        """Protect ``machine`` (or change its protection); with ``repair``, uninstall its
        recovery extension so that the next point installs it again (the points stay)."""
        if not paths:
            raise _problem("give at least one path (--paths)")
        relative = [p for p in paths if not p.startswith("/")]
        if relative:
            raise _problem(f"paths must be absolute (not {', '.join(relative)})")
        if rpo < MIN_INTERVAL:
            raise _problem(f"the RPO must be at least {MIN_INTERVAL:g} s")
        if app_consistent_every < 0:
            raise _problem("--app-consistent-every must be 0 (never) or more")
        if retention is not None and durations.seconds(retention) is None:
            raise _problem(f"the retention '{retention}' is not a duration (24h, 7d)")
        who = await self._who(requested_by)
        script = None
        if pre_script:
            script = (await runbooks.get(self._engine, account_id, pre_script))["content"]
        if post_failover_runbook:
            await runbooks.get(self._engine, account_id, post_failover_runbook)
        existing = None
        async with self._engine.connect() as conn:
            existing = (await conn.execute(sa.select(protections).where(
                protections.c.machine_id == machine.id))).first()
            if target_group is not None:
                known = await conn.scalar(sa.select(machine_rows.c.id).where(
                    machine_rows.c.account_id == account_id,
                    machine_rows.c.group_name == target_group).limit(1))
                if known is None:
                    raise OutpostError("ext_target_unknown", f"Cannot set an extension on "
                                       f"group '{target_group}': this account has none by "
                                       "that name.", kind="group", target=target_group)
        if existing is not None and existing.state == "FailedOver":
            active = await machines.by_id(self._engine, existing.active_machine_id or "")
            raise OutpostError("recovery_failed_over", f"Machine {machine.name} is failed over "
                               f"to {active.name if active else existing.active_machine_id}.",
                               machine=machine.name, target=active.name if active else "")
        generated = None
        password = await backup_catalog.password_for(self._extensions, machine)
        if password is None:
            generated = password = secrets.token_urlsafe(32)
        settings: dict[str, Any] = {"role": "source", "paths": paths}
        if exclude:
            settings["exclude"] = exclude
        if script is not None:
            settings["pre_script"] = script
        goal = await self._extensions.set_goal(account_id, NAME, "machine", machine.name, {
            "settings": settings, "protected_settings": {"repository_password": password},
            "run_as": "root", "enabled": True})
        if target_group is not None:
            await self._target_goal(account_id, target_group)
        now = time.time()
        values: dict[str, Any] = {
            "paths": paths, "exclude": exclude, "rpo_seconds": rpo,
            "interval_seconds": interval_for(rpo, interval),
            "app_consistent_every": app_consistent_every, "pre_script_runbook": pre_script,
            "post_failover_runbook": post_failover_runbook, "target_group": target_group,
            "retention": retention, "state": "Protecting", "active_machine_id": None,
            "next_point_at": now, "reason": None, "updated_by": who, "updated_at": now}
        async with self._engine.begin() as conn:
            if existing is None:
                await conn.execute(protections.insert().values(
                    id=random_id(), account_id=account_id, machine_id=machine.id,
                    points_asked=0, point_op_id=None, last_prune_at=None, created_by=who,
                    created_at=now, **values))
            else:
                await conn.execute(protections.update().where(
                    protections.c.id == existing.id).values(**values))
        if repair:
            # The version that failed there may be tried again, and the extension's own
            # uninstall for this machine; the next point releases the hold and installs it
            # again (docs/extensions.md, "Uninstall from one machine").
            await self._extensions.retry(account_id, machine, NAME)
            await self._ops.hold(account_id, machine, NAME)
        log.info("machine %s protected (rpo %gs) in account %s%s", machine.name, rpo,
                 account_id, " (repair)" if repair else "")
        shown = await self.show(account_id, machine)
        return {**shown, "extension_version": goal.get("resolved_version"),
                "repository_password": generated, "repaired": repair}

    async def _target_goal(self, account_id: str, group: str) -> None:
        """The recovery extension on the target group, role target, with the group's
        repository password (its own recovery goal's, else its backup goal's, else new)."""
        shown = await self._extensions.show(account_id, NAME)
        mine = [g for g in shown.get("goals", [])
                if g["target_kind"] == "group" and g["target"] == group]
        changes: dict[str, Any] = {"settings": {"role": "target"}, "run_as": "root",
                                   "enabled": True}
        has = bool(mine and mine[0].get("protected"))
        if not has:
            try:
                backup = await self._extensions.show(account_id, backup_catalog.EXTENSION)
            except OutpostError:
                backup = {"goals": []}
            has = any(g["target_kind"] == "group" and g["target"] == group and g["protected"]
                      for g in backup.get("goals", []))
        if not has:  # neither: a new password (the hub's set_goal takes the backup one)
            changes["protected_settings"] = {"repository_password": secrets.token_urlsafe(32)}
        await self._extensions.set_goal(account_id, NAME, "group", group, changes)

    async def unprotect(self, account_id: str, machine: Any, delete_points: bool,
                        requested_by: str | None) -> dict[str, Any]:
        """End the protection: the machine's recovery goal goes (the extension uninstalls),
        and the target group's when no other protection names it. With ``delete_points``
        every point is forgotten: the hub deletes each point's snapshot file from the
        machine's repository (what ``restic forget`` does; it needs no password) and marks
        its catalog row forgotten. The data only they used is freed by the repository's next
        prune (a backup ``forget`` or a recovery ``prune``)."""
        p = await self._row(account_id, machine)
        await self._idle(account_id, machine)
        await self._remove(account_id, p, machine.name)
        forgotten = await self._forget_points(account_id, machine) if delete_points else 0
        return {"machine": machine.name, "removed": True, "points_forgotten": forgotten}

    async def _forget_points(self, account_id: str, machine: Any) -> int:
        s = backup_snapshots
        async with self._engine.connect() as conn:
            rows = (await conn.execute(sa.select(s.c.id, s.c.snapshot_id).where(
                s.c.machine_id == machine.id, s.c.kind == "recovery",
                s.c.forgotten_at.is_(None)))).all()
        repo = backupstore.Repository(self._store, self._store.root / account_id / machine.id)

        def delete(snapshot_id: str) -> None:
            try:
                repo.delete("snapshots", snapshot_id)
            except OutpostError:  # gone already (forgotten by hand)
                pass

        done = []
        for r in rows:
            if r.snapshot_id:
                await asyncio.to_thread(delete, r.snapshot_id)
                done.append(r.id)
        if done:
            async with self._engine.begin() as conn:
                await conn.execute(s.update().where(s.c.id.in_(done)).values(
                    forgotten_at=time.time(), forgotten_by="unprotect"))
        log.info("%d recovery points of %s forgotten", len(done), machine.name)
        return len(done)

    async def _remove(self, account_id: str, p: Any, machine_name: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(protections.delete().where(protections.c.id == p.id))
            others = await conn.scalar(sa.select(sa.func.count()).select_from(protections)
                                       .where(protections.c.account_id == account_id,
                                              protections.c.target_group == p.target_group))
        for kind, target in (("machine", machine_name),
                             *((("group", p.target_group),) if p.target_group and not others
                               else ())):
            try:
                await self._extensions.remove_goal(account_id, NAME, kind, target)
            except OutpostError as exc:
                if exc.reason != "ext_goal_not_found":
                    raise
        log.info("machine %s unprotected in account %s", machine_name, account_id)

    # --- reading -------------------------------------------------------------------------
    async def listing(self, account_id: str, machine: Any | None = None
                      ) -> list[dict[str, Any]]:
        return await views(self._engine, account_id, machine)

    async def show(self, account_id: str, machine: Any) -> dict[str, Any]:
        await self._row(account_id, machine)
        shown = await self.listing(account_id, machine)
        return shown[0]

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

    # --- failover and failback -----------------------------------------------------------
    async def _idle(self, account_id: str, machine: Any) -> None:
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
        if target_dir is not None and not target_dir.startswith("/"):
            raise _problem(f"the target directory must be absolute (not {target_dir})")
        await self._idle(account_id, machine)
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
        if target_dir is not None and not target_dir.startswith("/"):
            raise _problem(f"the target directory must be absolute (not {target_dir})")
        await self._idle(account_id, machine)
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
        """The periodic pass: points due, and the actions' next steps.
        Every replica may run it: each change is a conditional update."""
        await self._points()
        await self._actions()

    async def _points(self) -> None:
        now = time.time()
        t = protections
        async with self._engine.connect() as conn:
            due = (await conn.execute(sa.select(t).where(
                t.c.state == "Protecting", t.c.next_point_at <= now))).all()
        for p in due:
            try:
                await self._point(p, now)
            except OutpostError as exc:  # recorded, never raised: the next turn tries again
                await self._reason(p, f"{exc.code}: {exc.message}")

    async def _point(self, p: Any, now: float) -> None:
        t = protections
        async with self._engine.connect() as conn:
            op = (await conn.execute(sa.select(extension_operations.c.status).where(
                extension_operations.c.id == p.point_op_id))).first() \
                if p.point_op_id else None
            ext = (await conn.execute(sa.select(extension_states).where(
                extension_states.c.machine_id == p.machine_id,
                extension_states.c.name == NAME))).first()
            held = (await conn.execute(sa.select(extension_holds.c.name).where(
                extension_holds.c.machine_id == p.machine_id,
                extension_holds.c.name == NAME))).first() is not None
        async with self._engine.begin() as conn:  # this replica's turn, or none
            claimed = (await conn.execute(t.update().where(
                t.c.id == p.id, t.c.state == "Protecting",
                t.c.next_point_at == p.next_point_at).values(
                    next_point_at=now + float(p.interval_seconds)))).rowcount
        if not claimed:
            return
        if op is not None and op.status in ("Queued", "Waiting", "Running"):
            return  # the last one has not ended: the next waits for it (health says why)
        if not held and (ext is None or ext.state != "Ready"):
            await self._reason(p, "waiting for the recovery extension to be Ready: "
                               + (_extension_note(ext) or "it has not reported yet"))
            return
        machine = await machines.by_id(self._engine, p.machine_id)
        if machine is None:
            return
        every = int(p.app_consistent_every)
        count = int(p.points_asked) + 1
        consistency = "application" if every and count % every == 0 else "crash"
        asked = await self._ops.ask(p.account_id, machine, NAME, "point",
                                    {"consistency": consistency}, f"protection {machine.name}")
        values: dict[str, Any] = {"point_op_id": asked["id"], "points_asked": count,
                                  "reason": None}
        if p.retention and (p.last_prune_at is None
                            or now - p.last_prune_at >= self._prune_every(p.retention)):
            try:
                await self._ops.ask(p.account_id, machine, NAME, "prune",
                                    {"keep_within": p.retention}, f"protection {machine.name}")
                values["last_prune_at"] = now
            except OutpostError as exc:
                values["reason"] = f"prune: {exc.code}: {exc.message}"
        async with self._engine.begin() as conn:
            await conn.execute(t.update().where(t.c.id == p.id, t.c.state == "Protecting")
                               .values(**values))

    @staticmethod
    def _prune_every(retention: str) -> float:
        keep = durations.seconds(retention) or PRUNE_EVERY
        return max(MIN_PRUNE_EVERY, min(PRUNE_EVERY, keep / 2))

    async def _reason(self, p: Any, reason: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(protections.update().where(protections.c.id == p.id).values(
                reason=reason[:2000]))

    async def _actions(self) -> None:
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
