"""Runbooks: publishing versions, the list, one version, removal."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from pydantic import Field

from outpost.protocol import models as m
from outpost.protocol.models import INT32_MAX, Wire

from .. import runbooks
from ..openapi import ok
from .deps import HubDep, Op

router = APIRouter()


class RunbookPublish(Wire):
    name: str = Field(min_length=1, max_length=128)
    content: str
    type: str | None = None
    filename: str = ""
    description: str = ""
    params: list[str] = Field(default_factory=list,
                              description="NAME:TYPE[=DEFAULT]; TYPE string, int, bool or json")
    log_verbose: bool = False
    log_progress: bool = False


@router.post("/v1/runbooks", tags=["runbooks"], status_code=201, response_model=None,
             responses=ok(m.RunbookPublished, 201, "A new version was stored.")
             | ok(m.RunbookPublished, 200, "The same as the latest version: nothing was "
                  "stored (\"unchanged\": true)."))
async def runbook_publish(principal: Op, hub: HubDep, body: RunbookPublish,
                          response: Response) -> dict[str, Any]:
    """Store a new version of a runbook (201). The same content, type, description,
    parameters and switches as the latest version store nothing: 200 with that version
    and ``"unchanged": true``."""
    stored = await runbooks.publish(
        hub.engine, principal.account_id, body.name, body.content, kind=body.type,
        filename=body.filename, description=body.description, param_specs=body.params,
        log_verbose=body.log_verbose, log_progress=body.log_progress)
    if stored["unchanged"]:
        response.status_code = 200
    return stored


@router.get("/v1/runbooks", tags=["runbooks"], response_model=None,
            responses=ok(list[m.RunbookListed]))
async def runbook_list(principal: Op, hub: HubDep) -> list[dict[str, Any]]:
    return await runbooks.listing(hub.engine, principal.account_id)


@router.delete("/v1/runbooks/{name}", tags=["runbooks"], response_model=None,
               responses=ok(m.RunbookRemoved))
async def runbook_remove(principal: Op, hub: HubDep, name: str) -> dict[str, Any]:
    """Remove every version of a runbook; refused (409, E8041) while a schedule, a
    webhook or an unfinished job uses it. Jobs it ran keep their history."""
    return await runbooks.remove(hub.engine, principal.account_id, name)


@router.get("/v1/runbooks/{name}", tags=["runbooks"], response_model=None,
            responses=ok(m.RunbookVersion))
async def runbook_show(principal: Op, hub: HubDep, name: str,
                       version: Annotated[int | None, Query(ge=1, le=INT32_MAX)] = None
                       ) -> dict[str, Any]:
    return await runbooks.get(hub.engine, principal.account_id, name, version)
