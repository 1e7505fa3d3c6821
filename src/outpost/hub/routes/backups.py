"""The backup catalog as operators read it: the snapshots of the account or of one machine,
and one snapshot (hub/backup_catalog.py). Another account's machine is not found (404)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import Field

from outpost.protocol.models import View

from .. import backup_catalog, machines
from ..openapi import ok
from .deps import HubDep, Op

router = APIRouter()
TAGS: list[Any] = ["backups"]
Forgotten = Annotated[bool, Query(description="Include the snapshots a forget operation "
                                              "removed.")]


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


@router.get("/v1/backups", tags=TAGS, response_model=None, responses=ok(list[Snapshot]))
async def backup_list(principal: Op, hub: HubDep,
                      machine: Annotated[str | None, Query(max_length=64)] = None,
                      forgotten: Forgotten = False) -> list[dict[str, Any]]:
    """The account's snapshots, newest first; of one machine with ``machine``."""
    row = await machines.find(hub.engine, principal.account_id, machine) if machine else None
    return await backup_catalog.listing(hub.engine, principal.account_id, row, forgotten)


@router.get("/v1/machines/{machine}/backups", tags=TAGS, response_model=None,
            responses=ok(list[Snapshot]))
async def machine_backup_list(principal: Op, hub: HubDep, machine: str,
                              forgotten: Forgotten = False) -> list[dict[str, Any]]:
    """One machine's snapshots, newest first."""
    row = await machines.find(hub.engine, principal.account_id, machine)
    return await backup_catalog.listing(hub.engine, principal.account_id, row, forgotten)


@router.get("/v1/machines/{machine}/backups/{snapshot}", tags=TAGS, response_model=None,
            responses=ok(Snapshot))
async def machine_backup_show(principal: Op, hub: HubDep, machine: str,
                              snapshot: str) -> dict[str, Any]:
    """One snapshot of a machine: by its full or short id, a unique start of it (4
    characters or more; E9111 when several match), or ``latest``."""
    row = await machines.find(hub.engine, principal.account_id, machine)
    return await backup_catalog.show(hub.engine, principal.account_id, row, snapshot)
