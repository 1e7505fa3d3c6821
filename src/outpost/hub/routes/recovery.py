"""Disaster recovery (hub/recovery.py, docs/recovery.md): a machine's protection, the
protections of the account with their health, failover, test failover and failback, and the
actions they start. Another account's machine (or action) is not found (404, E3002/E9126).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import Field

from outpost.protocol import durations
from outpost.protocol.models import View, Wire

from .. import machines
from ..openapi import ok
from .deps import HubDep, Op

router = APIRouter()
TAGS: list[Any] = ["recovery"]


class ProtectAsked(Wire):
    paths: list[str] = Field(min_length=1, max_length=100, description="The absolute paths "
                             "each recovery point holds.")
    exclude: list[str] = Field(default_factory=list, max_length=100, description="restic "
                               "exclude patterns.")
    rpo: str | float = Field(default=300.0, description="The recovery point objective: the "
                             "newest point may be at most this old (a duration: 5m, 30s).")
    interval: str | float | None = Field(default=None, description="Seconds between points "
                                         "(a duration); default half the RPO, at least 5 s.")
    app_consistent_every: int = Field(default=0, ge=0, le=100000, description="Every Nth "
                                      "point is application-consistent (the pre-script runs "
                                      "first); 0: never.")
    pre_script: str | None = Field(default=None, max_length=128, description="A runbook "
                                   "whose script runs (sh -c) before an application-"
                                   "consistent point.")
    post_failover_runbook: str | None = Field(default=None, max_length=128, description="A "
                                              "runbook run as a job on the target after a "
                                              "failover's restore.")
    target_group: str | None = Field(default=None, max_length=64, description="The group "
                                     "whose machines points may be recovered onto (the "
                                     "extension is set there with role target).")
    retention: str | None = Field(default=None, max_length=32, description="Keep points "
                                  "this long (a restic duration: 24h, 7d); older ones are "
                                  "pruned now and then. Default: keep all.")
    repair: bool = Field(default=False, description="Uninstall the extension from the "
                         "machine so that the next point installs it again; the points "
                         "stay.")


class Protection(View):
    id: str
    machine: str
    machine_id: str
    health: str = Field(description="Protecting, Behind, Paused, FailedOver or Failed.")
    message: str = Field(description="'RPO 5m, last point 12m ago: behind because ...'")
    state: str = Field(description="Protecting, or FailedOver (no points are taken).")
    paths: list[str]
    exclude: list[str]
    rpo_seconds: float
    interval_seconds: float
    app_consistent_every: int
    pre_script_runbook: str | None
    post_failover_runbook: str | None
    target_group: str | None
    retention: str | None
    active_machine: str | None = Field(description="The machine failed over to.")
    active_machine_id: str | None
    last_point: str | None
    last_point_at: float | None
    last_point_age_seconds: float | None
    points: int = Field(description="Points kept (not pruned).")
    points_bytes_added: int = Field(description="The bytes the points kept added to the "
                                    "repository.")
    next_point_at: float | None
    point_op_id: str | None
    point_op_status: str | None
    reason: str | None = Field(description="Why the last point could not be asked.")
    extension_state: str | None
    extension_step: str | None
    extension_message: str | None
    created_by: str | None
    created_at: float
    updated_by: str | None
    updated_at: float


class Protected(Protection):
    extension_version: str | None
    repository_password: str | None = Field(description="A new repository password, shown "
                                            "this once; null when an existing one is kept.")
    repaired: bool


class Unprotected(View):
    machine: str
    removed: bool
    points_forgotten: int = Field(description="With delete_points: the points forgotten.")


class FailoverAsked(Wire):
    to: str = Field(max_length=64, description="The target machine (name or id).")
    point: str = Field(default="latest", max_length=64, description="latest, or a point's "
                       "id or a unique start of it.")
    test: bool = Field(default=False, description="A drill: restore into a scratch "
                       "directory on the target; the source's protection goes on.")
    target_dir: str | None = Field(default=None, max_length=4096, description="Restore under "
                                   "this absolute directory (default: / for a failover, a "
                                   "scratch directory for a test).")


class FailbackAsked(Wire):
    target_dir: str | None = Field(default=None, max_length=4096, description="Restore under "
                                   "this absolute directory on the source (default: /).")


class Action(View):
    id: str
    kind: str = Field(description="failover, test or failback.")
    machine: str
    machine_id: str
    target: str
    target_machine_id: str
    point: str | None
    target_dir: str | None
    status: str = Field(description="Queued, Restoring, RunningRunbook, Succeeded or Failed.")
    step: str = Field(description="point, recover or runbook.")
    op_id: str | None = Field(description="The extension operation the step waits on.")
    job_id: str | None = Field(description="The post-failover runbook's job.")
    code: str | None
    message: str
    output: list[str]
    attempts: int
    requested_by: str | None
    created_at: float
    updated_at: float
    ended_at: float | None


@router.post("/v1/machines/{machine}/protection", tags=TAGS, response_model=None,
             responses=ok(Protected))
async def protect(principal: Op, hub: HubDep, machine: str, body: ProtectAsked
                  ) -> dict[str, Any]:
    """Protect a machine (or change its protection): the recovery extension on it with role
    source, on the target group with role target, and recovery points at the interval."""
    row = await machines.find(hub.engine, principal.account_id, machine)
    rpo = durations.parse(body.rpo, "rpo", positive=True)
    interval = durations.parse(body.interval, "interval", positive=True) \
        if body.interval is not None else None
    return await hub.recovery.protect(
        principal.account_id, row, paths=body.paths, exclude=body.exclude, rpo=rpo,
        interval=interval, app_consistent_every=body.app_consistent_every,
        pre_script=body.pre_script, post_failover_runbook=body.post_failover_runbook,
        target_group=body.target_group, retention=body.retention, repair=body.repair,
        requested_by=principal.token_id or None)


@router.get("/v1/machines/{machine}/protection", tags=TAGS, response_model=None,
            responses=ok(Protection))
async def protection_show(principal: Op, hub: HubDep, machine: str) -> dict[str, Any]:
    """One machine's protection and its health (E9121 when it has none)."""
    row = await machines.find(hub.engine, principal.account_id, machine)
    return await hub.recovery.show(principal.account_id, row)


@router.delete("/v1/machines/{machine}/protection", tags=TAGS, response_model=None,
               responses=ok(Unprotected))
async def unprotect(principal: Op, hub: HubDep, machine: str,
                    delete_points: Annotated[bool, Query(description="Forget every point "
                                                         "of the machine too.")]
                    = False) -> dict[str, Any]:
    """End a machine's protection: the recovery extension is uninstalled from it."""
    row = await machines.find(hub.engine, principal.account_id, machine)
    return await hub.recovery.unprotect(principal.account_id, row, delete_points,
                                        principal.token_id or None)


@router.get("/v1/protections", tags=TAGS, response_model=None,
            responses=ok(list[Protection]))
async def protection_list(principal: Op, hub: HubDep) -> list[dict[str, Any]]:
    """Every protection of the account with its health."""
    return await hub.recovery.listing(principal.account_id)


@router.post("/v1/machines/{machine}/failover", tags=TAGS, status_code=201,
             response_model=None, responses=ok(Action, 201, "The failover action."))
async def failover(principal: Op, hub: HubDep, machine: str, body: FailoverAsked
                   ) -> dict[str, Any]:
    """Recover a point of the machine on another machine (its target group's), then run the
    post-failover runbook there; ``test``: into a scratch directory, the source's protection
    untouched. A target whose agent is silent is refused at once (E9080, 151099)."""
    row = await machines.find(hub.engine, principal.account_id, machine)
    target = await machines.find(hub.engine, principal.account_id, body.to)
    return await hub.recovery.failover(principal.account_id, row, target, body.point,
                                       body.test, body.target_dir, principal.token_id or None)


@router.post("/v1/machines/{machine}/failback", tags=TAGS, status_code=201,
             response_model=None, responses=ok(Action, 201, "The failback action."))
async def failback(principal: Op, hub: HubDep, machine: str, body: FailbackAsked
                   ) -> dict[str, Any]:
    """Bring a failed-over machine's data back from the machine it failed over to, then
    protect it again (E9122 when it is not failed over)."""
    row = await machines.find(hub.engine, principal.account_id, machine)
    return await hub.recovery.failback(principal.account_id, row, body.target_dir,
                                       principal.token_id or None)


@router.get("/v1/recovery-actions", tags=TAGS, response_model=None,
            responses=ok(list[Action]))
async def action_list(principal: Op, hub: HubDep,
                      machine: Annotated[str | None, Query(max_length=64)] = None
                      ) -> list[dict[str, Any]]:
    """The newest 200 recovery actions, of one machine with ``machine``."""
    row = await machines.find(hub.engine, principal.account_id, machine) if machine else None
    return await hub.recovery.list_actions(principal.account_id, row)


@router.get("/v1/recovery-actions/{action_id}", tags=TAGS, response_model=None,
            responses=ok(Action))
async def action_show(principal: Op, hub: HubDep, action_id: str) -> dict[str, Any]:
    """One recovery action: status, step, the operation or job it waits on, output."""
    return await hub.recovery.action(principal.account_id, action_id)
