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

**Actions** (failover, test failover, failback) are hub/failover.py's; this module's pass
runs theirs too.
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
from outpost.protocol.errors import OutpostError

from . import backup_catalog, backupstore, machines, runbooks
from .config import random_id
from .db import (backup_snapshots, extension_holds, extension_operations, extension_states,
                 protections, tokens)
from .db import machines as machine_rows
from .extension_ops import ExtensionOps
from .extensions import Extensions
from .failover import Failovers, protection_row

log = logging.getLogger("outpost.hub.recovery")

NAME = "recovery"
MIN_INTERVAL = 5.0
RECHECK = 1.0  # seconds before a point that could not be asked yet is looked at again
FAILED_RETRY = 10.0  # seconds after a failed point before the next one
DEFAULT_RPO = 300.0
PRUNE_EVERY = 3600.0  # at most this long between prunes (half the retention when shorter)
MIN_PRUNE_EVERY = 60.0


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
    """Protections and the point pass (the actions: ``failovers``); one per hub process."""

    def __init__(self, engine: AsyncEngine, extensions: Extensions, ext_ops: ExtensionOps,
                 store: backupstore.Store) -> None:
        self._engine = engine
        self._store = store
        self.failovers = Failovers(engine, ext_ops)
        # (SQLite's two-argument min() is PostgreSQL's least())
        self._sqlite = engine.dialect.name == "sqlite"
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
        return await protection_row(self._engine, account_id, machine)

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
        await self.failovers.idle(account_id, machine)
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

    # --- the pass ------------------------------------------------------------------------
    async def tick(self) -> None:
        """The periodic pass: points due, and the actions' next steps (failover.py).
        Every replica may run it: each change is a conditional update."""
        await self._points()
        await self.failovers.tick()

    async def _points(self) -> None:
        now = time.time()
        t, o = protections, extension_operations
        async with self._engine.connect() as conn:
            due = (await conn.execute(sa.select(t).where(
                t.c.state == "Protecting", t.c.next_point_at <= now))).all()
            # A point that failed is tried again after FAILED_RETRY (or the interval, if
            # shorter), not a whole interval later: the RPO is what matters.
            least = sa.func.min if self._sqlite else sa.func.least
            failed = (await conn.execute(sa.select(t).join(o, o.c.id == t.c.point_op_id).where(
                t.c.state == "Protecting", t.c.next_point_at > now, o.c.status == "Failed",
                o.c.ended_at + least(t.c.interval_seconds, FAILED_RETRY) <= now,
                # not claimed since it failed (a refused retry waits for its turn)
                t.c.next_point_at - t.c.interval_seconds < o.c.ended_at))).all()
            due = [*due, *failed]
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
        busy = op is not None and op.status in ("Queued", "Waiting", "Running")
        ready = held or (ext is not None and ext.state == "Ready")
        # Not yet (the last point has not ended, the extension is not Ready): look again in
        # RECHECK seconds, so the point starts as soon as it can rather than a whole
        # interval later.
        later = now + (float(p.interval_seconds) if ready and not busy else RECHECK)
        async with self._engine.begin() as conn:  # this replica's turn, or none
            claimed = (await conn.execute(t.update().where(
                t.c.id == p.id, t.c.state == "Protecting",
                t.c.next_point_at == p.next_point_at).values(next_point_at=later))).rowcount
        if not claimed or busy:
            return  # (while one runs, health says why the newest point is old)
        if not ready:
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
