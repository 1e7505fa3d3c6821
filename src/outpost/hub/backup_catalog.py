"""The backup catalog: what the hub knows of each machine's restic snapshots without opening
the repository (it cannot: the password is the machine's).

A row is written when an operation ``snapshot`` of extension ``backup`` ends Succeeded, in the
transaction that records the end (``ExtensionOps.ended``), from the operation's result (restic's
ids and time, files, bytes, duration, consistency) and its record (how long it waited for the
machine's load, and why). A ``point`` of extension ``recovery`` is recorded the same way with
kind ``recovery`` (hub/recovery.py). A ``forget`` (backup) or ``prune`` (recovery) operation
that succeeds marks the rows of the snapshots its result lists as removed; they stay in the
catalog, forgotten.

A snapshot is named by its id, full or short, or by any start of it of at least
``PREFIX_MIN`` characters (as git names commits), or ``latest``.

``restore`` asks the extension's restore operation for a catalogued snapshot, on its own
machine or on another machine of the account (``source_machine_id`` in its parameters: the
restoring machine then asks for a read-only grant, backupstore.issue_grant).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from outpost.protocol.errors import OutpostError

from .config import random_id
from .extension_ops import ExtensionOps
from .extensions import Extensions
from .db import backup_snapshots
from .db import machines as machine_rows

EXTENSION = "backup"
RECOVERY = "recovery"  # the recovery extension's points share the catalog (kind recovery)
# The extensions whose goals hold a machine's repository password: one repository per
# machine, whichever of them created it (docs/recovery.md).
REPOSITORY_EXTENSIONS = (EXTENSION, RECOVERY)
KINDS = ("backup", "recovery")
PREFIX_MIN = 4
_HEX = re.compile(r"^[0-9a-f]{1,64}$")
_CANDIDATES = 5


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


async def on_end(conn: AsyncConnection, op: Any, values: dict[str, Any]) -> None:
    """``ExtensionOps.ended`` listener: a backup snapshot or a recovery point into the
    catalog, what a forget (or a recovery prune) removed out."""
    if op.extension not in REPOSITORY_EXTENSIONS or values.get("status") != "Succeeded":
        return
    result = values.get("result") or {}
    if (op.extension, op.operation) == (EXTENSION, "snapshot"):
        await _record(conn, op, values, result, "backup")
    elif (op.extension, op.operation) == (RECOVERY, "point"):
        await _record(conn, op, values, result, "recovery")
    elif (op.extension, op.operation) in ((EXTENSION, "forget"), (RECOVERY, "prune")):
        removed = [r for r in result.get("removed") or [] if isinstance(r, str) and r]
        if removed:
            t = backup_snapshots
            await conn.execute(t.update().where(
                t.c.machine_id == op.machine_id, t.c.forgotten_at.is_(None),
                sa.or_(t.c.snapshot_id.in_(removed), t.c.short_id.in_(removed))).values(
                    forgotten_at=values.get("ended_at") or time.time(), forgotten_by=op.id))


async def _record(conn: AsyncConnection, op: Any, values: dict[str, Any],
                  result: dict[str, Any], kind: str) -> None:
    full = result.get("snapshot_id")
    short = result.get("snapshot")
    if not isinstance(short, str) or not _HEX.match(short):
        return  # an extension that reported no id: nothing a later command could name
    full = full if isinstance(full, str) and _HEX.match(full) else None
    paths = result.get("paths")
    t = backup_snapshots
    known = (await conn.execute(sa.select(t.c.id).where(
        t.c.machine_id == op.machine_id, t.c.short_id == short[:16]))).first()
    if known is not None:
        return
    await conn.execute(t.insert().values(
        id=random_id(), account_id=op.account_id, machine_id=op.machine_id,
        short_id=short[:16], snapshot_id=full, op_id=op.id,
        paths=[p for p in paths if isinstance(p, str)] if isinstance(paths, list) else [],
        files=_int(result.get("files")), bytes_added=_int(result.get("bytes_added")),
        total_bytes=_int(result.get("total_bytes")),
        duration_seconds=_float(result.get("duration_seconds")),
        consistency=str(result.get("consistency") or "")[:16] or None,
        waited_seconds=op.waited_seconds, wait_reason=op.wait_reason,
        taken_at=_float(result.get("time")), created_at=values.get("ended_at") or time.time(),
        forgotten_at=None, forgotten_by=None, kind=kind))


def view(row: Any, machine: str) -> dict[str, Any]:
    return {
        "id": row.snapshot_id or row.short_id, "short_id": row.short_id,
        "snapshot_id": row.snapshot_id, "machine": machine, "machine_id": row.machine_id,
        "op_id": row.op_id, "paths": row.paths or [], "files": row.files,
        "bytes_added": row.bytes_added, "total_bytes": row.total_bytes,
        "duration_seconds": row.duration_seconds, "consistency": row.consistency,
        "waited_seconds": row.waited_seconds, "wait_reason": row.wait_reason,
        "taken_at": row.taken_at, "created_at": row.created_at,
        "forgotten_at": row.forgotten_at, "forgotten_by": row.forgotten_by,
        "kind": row.kind,
    }


def pick(rows: Sequence[Any], ref: str, machine: str) -> Any:
    """The row ``ref`` names among one machine's ``rows`` (newest first): ``latest`` (the
    newest not forgotten), a full or short id, or a unique start of one (E9110, E9111)."""
    text = ref.strip().lower()
    if text == "latest":
        live = [r for r in rows if r.forgotten_at is None]
        if not live:
            raise OutpostError("backup_snapshot_not_found", f"No snapshot 'latest' of machine "
                               f"{machine}: the catalog holds none that is not forgotten.",
                               snapshot=ref, machine=machine)
        return live[0]
    if not _HEX.match(text) or len(text) < PREFIX_MIN:
        raise OutpostError("backup_snapshot_not_found", f"No snapshot '{ref}' of machine "
                           f"{machine}" + ("" if _HEX.match(text) else
                                           " (an id is hexadecimal)") + ".",
                           fix=f"Give 'latest', a snapshot's id or at least {PREFIX_MIN} of "
                               f"its first characters ('outpost backup list {machine}').",
                           snapshot=ref, machine=machine)
    exact = [r for r in rows if text in (r.snapshot_id, r.short_id)]
    found = exact or [r for r in rows if (r.snapshot_id or r.short_id).startswith(text)
                      or r.short_id.startswith(text)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise OutpostError("backup_snapshot_not_found", f"No snapshot '{ref}' of machine "
                           f"{machine}.", snapshot=ref, machine=machine)
    shown = ", ".join(r.short_id for r in found[:_CANDIDATES])
    more = " and more" if len(found) > _CANDIDATES else ""
    raise OutpostError("backup_snapshot_ambiguous", f"The snapshot id prefix '{ref}' matches "
                       f"several snapshots of machine {machine}: {shown}{more}.",
                       fix="Give more characters of the id.", snapshot=ref, machine=machine,
                       candidates=[r.snapshot_id or r.short_id for r in found[:_CANDIDATES]])


async def listing(engine: AsyncEngine, account_id: str, machine: Any | None = None,
                  forgotten: bool = False, limit: int = 1000,
                  kind: str | None = "backup") -> list[dict[str, Any]]:
    """The account's snapshots (or one machine's), newest first; forgotten ones too with
    ``forgotten``; of one ``kind`` (backup, recovery) or, with None, of both."""
    t = backup_snapshots
    query = sa.select(t, machine_rows.c.name.label("machine_name")).join(
        machine_rows, machine_rows.c.id == t.c.machine_id).where(t.c.account_id == account_id)
    if machine is not None:
        query = query.where(t.c.machine_id == machine.id)
    if not forgotten:
        query = query.where(t.c.forgotten_at.is_(None))
    if kind is not None:
        query = query.where(t.c.kind == kind)
    query = query.order_by(t.c.created_at.desc(), t.c.id).limit(limit)
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [view(r, r.machine_name) for r in rows]


async def show(engine: AsyncEngine, account_id: str, machine: Any, ref: str,
               kind: str | None = None) -> dict[str, Any]:
    """One snapshot of ``machine`` (forgotten ones included, marked so); ``latest`` and
    prefixes among those of ``kind`` when given (``latest`` alone: the newest backup)."""
    if kind is None and ref.strip().lower() == "latest":
        kind = "backup"
    t = backup_snapshots
    query = sa.select(t).where(t.c.account_id == account_id, t.c.machine_id == machine.id)
    if kind is not None:
        query = query.where(t.c.kind == kind)
    async with engine.connect() as conn:
        rows = (await conn.execute(query.order_by(t.c.created_at.desc(), t.c.id))).all()
    return view(pick(rows, ref, machine.name), machine.name)


async def restore(engine: AsyncEngine, ops: ExtensionOps, account_id: str, source: Any,
                  ref: str, to: Any | None, target: str | None, include: list[str],
                  requested_by: str | None) -> dict[str, Any]:
    """Ask for the restore of snapshot ``ref`` of machine ``source`` on ``to`` (another
    machine of the account) or on ``source`` itself; the operation as asked."""
    shown = await show(engine, account_id, source, ref, "backup")
    if shown["forgotten_at"] is not None:
        raise OutpostError("backup_snapshot_forgotten", f"Snapshot {shown['short_id']} of "
                           f"machine {source.name} was forgotten (operation "
                           f"{shown['forgotten_by']}).", snapshot=shown["short_id"],
                           machine=source.name)
    params: dict[str, Any] = {"snapshot": shown["id"]}
    if target is not None:
        params["target"] = target
    if include:
        params["include"] = include
    where = source
    if to is not None and to.id != source.id:
        params |= {"source_machine_id": source.id, "source_machine": source.name}
        where = to
    return await ops.ask(account_id, where, EXTENSION, "restore", params, requested_by)


async def password_for(extensions: Extensions, machine: Any) -> str | None:
    """The repository password the goals that apply to ``machine`` hold (opened from the
    vault): its backup goal's, else its recovery goal's; None when neither has one. The two
    extensions share the machine's one repository, so they share its password."""
    goals = await extensions.cache.get(machine.account_id)
    applying = {r.goal.name: r for r in goals.resolve(machine, held=True)}
    for name in REPOSITORY_EXTENSIONS:
        found = applying.get(name)
        sealed = found.goal.protected if found is not None else None
        if found is None or sealed is None:
            continue
        goal = found.goal
        plain = extensions._open(machine.account_id, goal.name, goal.kind, goal.target,
                                 sealed)
        value = json.loads(plain).get("repository_password")
        if isinstance(value, str) and value:
            return value
    return None
