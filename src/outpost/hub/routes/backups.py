"""The backup catalog as operators read it: the snapshots of the account or of one machine,
and one snapshot (hub/backup_catalog.py); the restore of a snapshot, on its machine or on
another machine of the account. Another account's machine is not found (404).

``POST /v1/backup-grants`` is the restoring machine's: with its own backup token it gets a
read-only grant to the source machine's repository for the restore operation it runs (and
the source's repository password when its own goal holds another one). Like the restic
protocol's routes it is not in ``/openapi.json``: its caller is the extension, not an
operator (docs/backup.md, "Restoring on another machine").
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import Field

from outpost.protocol.models import View, Wire

from .. import backup_catalog, backupstore, machines
from ..openapi import ok
from .deps import HubDep, Op, errors
from .extension_ops import Operation

router = APIRouter()
TAGS: list[Any] = ["backups"]
Forgotten = Annotated[bool, Query(description="Include the snapshots a forget operation "
                                              "removed.")]
Kind = Annotated[Literal["backup", "recovery", "all"], Query(
    description="backup (the default): the backup extension's snapshots; recovery: the "
    "recovery extension's points (docs/recovery.md); all: both.")]


class Snapshot(View):
    id: str = Field(description="restic's full snapshot id (its short id when the extension "
                    "did not report the full one).")
    short_id: str
    snapshot_id: str | None
    machine: str
    machine_id: str
    op_id: str | None = Field(description="The snapshot operation that took it.")
    paths: list[str]
    files: int | None
    bytes_added: int | None = Field(description="New bytes the snapshot stored (after "
                                    "deduplication, before compression).")
    total_bytes: int | None = Field(description="The size of the files it holds.")
    duration_seconds: float | None
    consistency: str | None = Field(description="crash or application (docs/backup.md).")
    waited_seconds: float | None = Field(description="How long the agent held the snapshot "
                                         "back for the machine's load (EX-7).")
    wait_reason: str | None
    taken_at: float | None = Field(description="restic's time of the snapshot.")
    created_at: float
    forgotten_at: float | None
    forgotten_by: str | None = Field(description="The forget operation that removed it.")
    kind: str = Field(description="backup (a snapshot) or recovery (a recovery point).")


@router.get("/v1/backups", tags=TAGS, response_model=None, responses=ok(list[Snapshot]))
async def backup_list(principal: Op, hub: HubDep,
                      machine: Annotated[str | None, Query(max_length=64)] = None,
                      forgotten: Forgotten = False, kind: Kind = "backup"
                      ) -> list[dict[str, Any]]:
    """The account's snapshots, newest first; of one machine with ``machine``."""
    row = await machines.find(hub.engine, principal.account_id, machine) if machine else None
    return await backup_catalog.listing(hub.engine, principal.account_id, row, forgotten,
                                        kind=None if kind == "all" else kind)


@router.get("/v1/machines/{machine}/backups", tags=TAGS, response_model=None,
            responses=ok(list[Snapshot]))
async def machine_backup_list(principal: Op, hub: HubDep, machine: str,
                              forgotten: Forgotten = False, kind: Kind = "backup"
                              ) -> list[dict[str, Any]]:
    """One machine's snapshots, newest first."""
    row = await machines.find(hub.engine, principal.account_id, machine)
    return await backup_catalog.listing(hub.engine, principal.account_id, row, forgotten,
                                        kind=None if kind == "all" else kind)


@router.get("/v1/machines/{machine}/backups/{snapshot}", tags=TAGS, response_model=None,
            responses=ok(Snapshot))
async def machine_backup_show(principal: Op, hub: HubDep, machine: str,
                              snapshot: str) -> dict[str, Any]:
    """One snapshot of a machine: by its full or short id, a unique start of it (4
    characters or more; E9111 when several match), or ``latest``."""
    row = await machines.find(hub.engine, principal.account_id, machine)
    return await backup_catalog.show(hub.engine, principal.account_id, row, snapshot)


class RestoreAsked(Wire):
    to: str | None = Field(default=None, max_length=64, description="Restore on this other "
                           "machine of the account (its name or id); default: the snapshot's "
                           "own machine.")
    target: str | None = Field(default=None, max_length=4096, description="An absolute "
                               "directory to restore under; default: / (the files' places).")
    include: list[str] = Field(default_factory=list, max_length=100, description="restic "
                               "patterns: only what they match.")


@router.post("/v1/machines/{machine}/backups/{snapshot}/restore", tags=TAGS, status_code=201,
             response_model=None, responses=ok(Operation, 201, "The restore operation, as "
                                              "'GET /v1/extension-operations/{op_id}'."))
async def machine_backup_restore(principal: Op, hub: HubDep, machine: str, snapshot: str,
                                 body: RestoreAsked) -> dict[str, Any]:
    """Restore snapshot SNAPSHOT of a machine (the extension's restore operation), on that
    machine or, with ``to``, on another machine of the account, which reads the source's
    repository through a read-only grant for that one operation."""
    source = await machines.find(hub.engine, principal.account_id, machine)
    to = await machines.find(hub.engine, principal.account_id, body.to) if body.to else None
    return await backup_catalog.restore(hub.engine, hub.ext_ops, principal.account_id, source,
                                        snapshot, to, body.target, body.include,
                                        principal.token_id or None)


@router.post("/v1/backup-grants", include_in_schema=False, status_code=201,
             responses=errors(401, 403))
async def backup_grant(request: Request, hub: HubDep) -> dict[str, Any]:
    """For the machine whose backup token authorizes the request: a grant to the source of
    the restore it runs."""
    authorization = request.headers.get("authorization")
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip().startswith(backupstore.TOKEN_PREFIX):
        raise backupstore.refusal("backup_token_invalid", machine_id="(none)")
    holder = await backupstore.authorize_any(hub.engine, token.strip())
    granted = await backupstore.issue_grant(hub.engine, holder)
    mine = await machines.find(hub.engine, holder.account_id, holder.machine_id)
    source = await machines.find(hub.engine, holder.account_id, granted["machine_id"])
    theirs = await backup_catalog.password_for(hub.extensions, source)
    same = theirs is not None and theirs == await backup_catalog.password_for(
        hub.extensions, mine)
    return {**granted, "password": None if same else theirs}
