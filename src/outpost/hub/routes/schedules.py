"""Schedules: a runbook started on a group, or an extension's operation asked of its
machines, at the times of a cron expression.

Creating or enabling one wakes this process's scheduler (``hub.scheduler``), whose loop the
application's lifespan supervises.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import Field

from outpost.protocol import models as m
from outpost.protocol.models import Wire

from .. import schedules
from ..openapi import ok
from .deps import HubDep, Op

router = APIRouter()


class ScheduleCreate(Wire):
    name: str = Field(min_length=1, max_length=128)
    runbook: str | None = Field(default=None, min_length=1, max_length=128,
                                description="The runbook to start on one machine of the "
                                "group; or give extension and operation.")
    extension: str | None = Field(default=None, min_length=1, max_length=64,
                                  description="The extension whose operation is asked of "
                                  "every machine of the group (or of the machine).")
    operation: str | None = Field(default=None, min_length=1, max_length=64)
    group: str | None = Field(default=None, min_length=1, max_length=64)
    machine: str | None = Field(default=None, min_length=1, max_length=64,
                                description="One machine (name or id); extension "
                                "operations only.")
    cron: str = Field(max_length=256, description="5 fields, or 6 with seconds first, or "
                      "a keyword such as @daily")
    timezone: str = Field(default="UTC", max_length=256, description="An IANA time zone")
    spread: str | float = Field(default=0, description="A duration such as 10m or 1h30m "
                                "(or seconds); each run starts at a stable offset within "
                                "it, and each machine's operation at its own")
    params: dict[str, Any] = Field(default_factory=dict, description="The runbook's "
                                   "parameters, or the operation's (public values only)")


@router.post("/v1/schedules", tags=["schedules"], status_code=201, response_model=None,
             responses=ok(m.ScheduleDetail, 201))
async def schedule_create(principal: Op, hub: HubDep, body: ScheduleCreate) -> dict[str, Any]:
    """At the times of a cron expression, start a runbook on a group, or ask an extension's
    operation of every machine of a group (or of one machine), each machine at its own
    offset within the spread. Exactly one of runbook and extension (E8125), of group and
    machine (E8126)."""
    made = await schedules.create(
        hub.engine, principal.account_id, body.name, body.cron, body.timezone, body.spread,
        body.params, runbook=body.runbook, group=body.group, extension=body.extension,
        operation=body.operation, machine=body.machine)
    hub.scheduler.wake()
    return made


@router.get("/v1/schedules", tags=["schedules"], response_model=None,
            responses=ok(list[m.ScheduleView]))
async def schedule_list(principal: Op, hub: HubDep) -> list[dict[str, Any]]:
    return await schedules.listing(hub.engine, principal.account_id)


@router.get("/v1/schedules/{name}", tags=["schedules"], response_model=None,
            responses=ok(m.ScheduleDetail))
async def schedule_show(principal: Op, hub: HubDep, name: str) -> dict[str, Any]:
    """A schedule with its newest runs."""
    return await schedules.get(hub.engine, principal.account_id, name)


@router.delete("/v1/schedules/{name}", tags=["schedules"], response_model=None,
               responses=ok(m.Removed))
async def schedule_remove(principal: Op, hub: HubDep, name: str) -> dict[str, Any]:
    await schedules.remove(hub.engine, principal.account_id, name)
    return {"name": name, "removed": True}


@router.post("/v1/schedules/{name}/enable", tags=["schedules"], response_model=None,
             responses=ok(m.ScheduleDetail))
async def schedule_enable(principal: Op, hub: HubDep, name: str) -> dict[str, Any]:
    """Enable from now on; runs that fell due while disabled are not started."""
    found = await schedules.set_enabled(hub.engine, principal.account_id, name, True)
    hub.scheduler.wake()
    return found


@router.post("/v1/schedules/{name}/disable", tags=["schedules"], response_model=None,
             responses=ok(m.ScheduleDetail))
async def schedule_disable(principal: Op, hub: HubDep, name: str) -> dict[str, Any]:
    return await schedules.set_enabled(hub.engine, principal.account_id, name, False)
