"""Runbooks: each publish stores a new version; jobs name a runbook and optionally a version."""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from outpost.protocol import names, params
from outpost.protocol.errors import OutpostError

from .config import random_id
from .db import jobs, runbooks, schedules, webhooks

TYPES = ("bash", "sh", "python", "pwsh")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_BYTES = 1024 * 1024
_EXTENSIONS = {".sh": "sh", ".bash": "bash", ".py": "python", ".ps1": "pwsh"}
_SHEBANGS = (("pwsh", "pwsh"), ("powershell", "pwsh"), ("python", "python"),
             ("bash", "bash"), ("/sh", "sh"), (" sh", "sh"))


def guess_type(filename: str, content: str) -> str:
    """The runbook type from the shebang, else the file's extension."""
    first = content.split("\n", 1)[0]
    if first.startswith("#!"):
        for needle, kind in _SHEBANGS:
            if needle in first:
                return kind
    for ext, kind in _EXTENSIONS.items():
        if filename.lower().endswith(ext):
            return kind
    raise OutpostError("runbook_type_unknown",
                       f"Cannot tell the type of '{filename}': no known extension or shebang.",
                       filename=filename)


async def publish(engine: AsyncEngine, account_id: str, name: str, content: str, *,
                  kind: str | None, filename: str, description: str, param_specs: list[str],
                  log_verbose: bool, log_progress: bool) -> dict[str, Any]:
    if not NAME_RE.match(name):
        raise OutpostError("invalid_request", f"Invalid runbook name '{name}'.",
                           fix="Use 1 to 128 letters, digits, '.', '_' or '-'.")
    if len(content.encode()) > MAX_BYTES:
        raise OutpostError("runbook_too_large", size=len(content.encode()), limit=MAX_BYTES)
    if kind is not None and kind not in TYPES:
        raise OutpostError("invalid_request", f"Unknown runbook type '{kind}'.",
                           fix=f"Use one of {', '.join(TYPES)}.")
    kind = kind or guess_type(filename or name, content)
    declared = params.parse_specs(param_specs)
    wanted = {"type": kind, "content": content, "description": description,
              "params": declared, "log_verbose": log_verbose, "log_progress": log_progress}
    for _attempt in range(5):  # two publishers racing for the next version number
        try:
            async with engine.begin() as conn:
                last = (await conn.execute(_LATEST, {"b_account": account_id,
                                                     "b_name": name})).first()
                if last is not None and all(
                        getattr(last, key) == value for key, value in wanted.items()):
                    return {**_view(last, content=True), "unchanged": True}
                # Numbers go on past every version a job ran, removed ones included, so a
                # job's "name version N" always means one content (and the claim's cache of
                # runbook versions, keyed so, is never stale).
                latest = max(
                    last.version if last is not None else 0,
                    await conn.scalar(sa.select(sa.func.max(jobs.c.runbook_version)).where(
                        jobs.c.account_id == account_id, jobs.c.runbook_name == name)) or 0)
                version = latest + 1
                await conn.execute(runbooks.insert().values(
                    id=random_id(), account_id=account_id, name=name, version=version,
                    type=kind, content=content,
                    sha256=hashlib.sha256(content.encode()).hexdigest(),
                    description=description, params=declared, log_verbose=log_verbose,
                    log_progress=log_progress, created_at=time.time()))
            return {**await get(engine, account_id, name, version), "unchanged": False}
        except IntegrityError:
            continue
    raise OutpostError("conflict", f"Could not store a new version of '{name}'; try again.")


def _view(row: Any, content: bool) -> dict[str, Any]:
    data = {"name": row.name, "version": row.version, "type": row.type,
            "description": row.description, "params": row.params, "sha256": row.sha256,
            "log_verbose": row.log_verbose, "log_progress": row.log_progress,
            "created_at": row.created_at}
    if content:
        data["content"] = row.content
    return data


# Built once with bound parameters (every job start reads its runbook): building a statement
# and its cache key cost more than SQLite takes to run it.
_OF_NAME = sa.select(runbooks).where(runbooks.c.account_id == sa.bindparam("b_account"),
                                     runbooks.c.name == sa.bindparam("b_name"))
_VERSION = _OF_NAME.where(runbooks.c.version == sa.bindparam("b_version"))
_LATEST = _OF_NAME.order_by(runbooks.c.version.desc()).limit(1)


async def get(engine: AsyncEngine, account_id: str, name: str,
              version: int | None = None) -> dict[str, Any]:
    """One version (the latest when none is given) with its content."""
    query, bound = ((_VERSION, {"b_version": version}) if version is not None
                    else (_LATEST, {}))
    async with engine.connect() as conn:
        row = (await conn.execute(query, {"b_account": account_id, "b_name": name,
                                          **bound})).first()
    if row is None:
        which = f" version {version}" if version is not None else ""
        hint = "See 'outpost runbook list'."
        if version is None:
            near = await _nearest(engine, account_id, name)
            hint = f"Did you mean '{near}'? {hint}" if near else hint
        raise OutpostError("not_found", f"No runbook '{name}'{which} in this account.",
                           fix=hint, runbook=name)
    return _view(row, content=True)


async def _nearest(engine: AsyncEngine, account_id: str, name: str) -> str | None:
    async with engine.connect() as conn:
        known: list[str] = list((await conn.execute(
            sa.select(runbooks.c.name).distinct().where(
                runbooks.c.account_id == account_id))).scalars().all())
    return names.nearest(name, known)


async def listing(engine: AsyncEngine, account_id: str) -> list[dict[str, Any]]:
    """The latest version of each runbook, with how many versions it has."""
    latest = (sa.select(runbooks.c.name, sa.func.max(runbooks.c.version).label("latest"),
                        sa.func.count().label("versions"))
              .where(runbooks.c.account_id == account_id)
              .group_by(runbooks.c.name).subquery())
    query = (sa.select(runbooks, latest.c.versions)
             .join(latest, sa.and_(runbooks.c.name == latest.c.name,
                                   runbooks.c.version == latest.c.latest))
             .where(runbooks.c.account_id == account_id).order_by(runbooks.c.name))
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [{**_view(row, content=False), "versions": row.versions} for row in rows]


_UNFINISHED = ("Completed", "Failed", "Stopped")


async def remove(engine: AsyncEngine, account_id: str, name: str) -> dict[str, Any]:
    """Remove every version of a runbook. Refused (E8041, naming them) while a schedule or a
    webhook starts it or a job of it has not ended; the jobs it ran keep their history
    (they name the runbook and version, and their output is their own)."""
    async with engine.begin() as conn:
        count = await conn.scalar(sa.select(sa.func.count()).select_from(runbooks).where(
            runbooks.c.account_id == account_id, runbooks.c.name == name))
        users: list[str] = []
        for table, what in ((schedules, "schedule"), (webhooks, "webhook")):
            found: list[str] = list((await conn.execute(sa.select(table.c.name).where(
                table.c.account_id == account_id, table.c.runbook_name == name)
                .order_by(table.c.name))).scalars().all())
            users += [f"{what} '{n}'" for n in found]
        active: list[str] = list((await conn.execute(sa.select(jobs.c.id).where(
            jobs.c.account_id == account_id, jobs.c.runbook_name == name,
            jobs.c.status.not_in(_UNFINISHED)).limit(5))).scalars().all())
        users += [f"job {job_id}" for job_id in active]
        if count and users:
            raise OutpostError(
                "runbook_in_use", f"Runbook '{name}' is used by {', '.join(users)}; it was "
                "not removed.",
                fix="Remove those schedules and webhooks (and stop or wait for those jobs) "
                    "first, then remove the runbook.", runbook=name, used_by=users)
        if count:
            await conn.execute(runbooks.delete().where(runbooks.c.account_id == account_id,
                                                       runbooks.c.name == name))
    if not count:
        await get(engine, account_id, name)  # not found, with its did-you-mean
    return {"name": name, "removed": True, "versions": count}

