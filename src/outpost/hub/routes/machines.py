"""Machines as operators see them: the list, heartbeats, one machine, removal and ping."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query

from outpost.protocol import durations
from outpost.protocol import models as m
from outpost.protocol.errors import OutpostError

from .. import machines
from ..openapi import ok
from .deps import HubDep, Op, errors

router = APIRouter()


@router.get("/v1/machines", tags=["operator"], response_model=None,
            responses=ok(list[m.MachineView]))
async def machine_list(principal: Op, hub: HubDep) -> list[dict[str, Any]]:
    return await machines.listing(hub.engine, principal.account_id)


@router.get("/v1/heartbeats", tags=["operator"], response_model=None,
            responses=ok(list[m.MachineHeartbeat]))
async def machine_heartbeats(principal: Op, hub: HubDep) -> list[dict[str, Any]]:
    return await machines.heartbeats(hub.engine, principal.account_id)


@router.get("/v1/machines/{name}", tags=["operator"], response_model=None,
            responses=ok(m.MachineView))
async def machine_show(principal: Op, hub: HubDep, name: str) -> dict[str, Any]:
    row = await machines.find(hub.engine, principal.account_id, name)
    return {**machines.view(row, time.time()),
            "deployment": await hub.deployments.machine_summary(row)}


@router.delete("/v1/machines/{name}", tags=["operator"], response_model=None,
               responses=ok(m.MachineRemoved))
async def machine_remove(principal: Op, hub: HubDep, name: str) -> dict[str, Any]:
    row = await machines.find(hub.engine, principal.account_id, name)
    await machines.deregister(hub.engine, row.id)
    return {"name": row.name, "removed": True}


@router.post("/v1/machines/{name}/ping", tags=["operator"], response_model=None,
             responses=ok(m.PingResult) | errors(504))
async def machine_ping(principal: Op, hub: HubDep, name: str,
                       timeout: Annotated[str, Query(
                           max_length=64, description="A duration: 10, 10s, 1m; at "
                           "most 2 minutes.")] = "10"
                       ) -> dict[str, Any]:
    """Send a work item to one machine and wait until its agent answers it."""
    wait = durations.parse(timeout, "timeout", positive=True, maximum=120)
    row = await machines.find(hub.engine, principal.account_id, name)
    started = time.time()
    item_id = await hub.dispatcher.submit(row.account_id, "ping", {"sent_at": started},
                                          machine_id=row.id)
    done = await hub.dispatcher.wait_done(item_id, wait)
    if done is None:
        await hub.dispatcher.withdraw(item_id)
        raise OutpostError("ping_timeout",
                           f"Machine '{row.name}' did not answer the ping within "
                           f"{wait:g} s.", machine=row.name)
    return {"machine": row.name, "round_trip_ms": round((done["done_at"] - started) * 1e3, 2),
            "agent_received_at": done["result"].get("received_at")}
