"""Groups: the list and each group's settings (who runbooks run as, limits)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import Field

from outpost.protocol import models as m
from outpost.protocol.models import Wire

from .. import groups
from ..openapi import ok
from .deps import HubDep, Op

router = APIRouter()


class GroupSettings(Wire):
    """Only the settings given are changed."""

    run_as: str | None = Field(default=None, max_length=64,
                               description="The user a root agent runs the group's runbooks "
                                           "as ('root' included); null for the agent's job "
                                           "users (or its own user when it is not root).")
    memory_mb: int | None = Field(default=None, ge=0, le=2**22, description=(
        "Each job's memory limit in MiB; 0 or null: the agent's default (job_memory_mb)."))
    cpus: float | None = Field(default=None, ge=0, le=1024, description=(
        "Each job's CPU limit in CPUs; 0 or null: the agent's default (job_cpus)."))
    max_processes: int | None = Field(default=None, ge=0, le=2**22, description=(
        "Each job's process limit; 0 or null: the agent's default (job_processes)."))


@router.get("/v1/groups", tags=["groups"], response_model=None,
            responses=ok(list[m.GroupListed]))
async def group_list(principal: Op, hub: HubDep) -> list[dict[str, Any]]:
    """The account's groups: those with machines and those with settings."""
    return await groups.listing(hub.engine, principal.account_id)


@router.put("/v1/groups/{name}", tags=["groups"], response_model=None,
            responses=ok(m.GroupView))
async def group_set(principal: Op, hub: HubDep, name: str,
                    body: GroupSettings) -> dict[str, Any]:
    return await groups.configure(hub.engine, principal.account_id, name,
                                  body.model_dump(include=body.model_fields_set))
