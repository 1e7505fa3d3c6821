"""The agents' API: registration, heartbeats, the long-poll for work, and reports of jobs.

Every route but ``register`` (signed with the account key) is signed with the machine's
key and checked by ``deps.Machine`` or ``deps.agent_body``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from outpost.protocol.errors import OutpostError
from outpost.protocol.models import (Heartbeat, JobAttempt, JobReport, JobReports, PollRequest,
                                     StopNotice)
from outpost.protocol.models import RegisterRequest, WorkDone

from .. import auth, job_identity, jobs, machines, openapi
from ..state import Hub
from .deps import HubDep, Machine, Signed, agent_body, errors, parse, signed_machine

log = logging.getLogger("outpost.hub")
router = APIRouter()
# What every machine-signed route declares (tag, the 426 answer, the signature scheme).
SIGNED: dict[str, Any] = {"tags": ["agent"], "responses": errors(426),
                          "dependencies": [openapi.MACHINE_SIGNED]}


@router.post("/v1/agent/register", tags=["agent"], status_code=201, responses=errors(426),
             dependencies=[openapi.ACCOUNT_SIGNED])
async def register(request: Request, hub: HubDep) -> dict[str, Any]:
    body = await request.body()
    account_id = await auth.registration(hub.engine, hub.vault, request.headers,
                                         request.method, auth.raw_path(request.scope), body)
    req = parse(RegisterRequest, body)
    auth.check_version(req.facts.agent_version, hub.config.min_agent_version)
    result = await machines.register(hub.engine, account_id, req,
                                     hub.config.heartbeat_interval)
    hub.registrations.inc()
    log.info("registered machine %s (%s) in group %s", req.name, result["machine_id"],
             req.group)
    return result


@router.post("/v1/agent/deregister", **SIGNED)
async def deregister(signed: Machine, hub: HubDep) -> dict[str, Any]:
    await machines.deregister(hub.engine, signed.machine.id)
    return {"machine_id": signed.machine.id, "deregistered": True}


@router.get("/v1/agent/registration", **SIGNED)
async def registration(signed: Machine) -> dict[str, Any]:
    """This machine's registration as the hub holds it: an agent whose cached copy is
    corrupt fetches it again (HW-9)."""
    row = signed.machine
    return {"machine_id": row.id, "account_id": row.account_id, "name": row.name,
            "group": row.group_name, "labels": row.labels,
            "registered_at": row.registered_at}


async def _record_heartbeat(hub: Hub, row: Any, beat: Heartbeat) -> tuple[float, list[str]]:
    """A heartbeat recorded and the leases it lists renewed: the hub's time, and the jobs
    the agent should let go of."""
    now = await machines.record_heartbeat(hub.engine, row.id, beat)
    abandon = await jobs.renew(hub.engine, row, [(h.id, h.attempt) for h in beat.jobs])
    hub.heartbeats.inc()
    return now, abandon


async def _heartbeat_ack(hub: Hub, row: Any, abandon: list[str]) -> dict[str, Any]:
    return {"hub_time": time.time(), "min_agent_version": hub.config.min_agent_version,
            "machine_id": row.id, "abandon": abandon,
            # From the account's goals and deployments held in memory: no read per heartbeat.
            "extensions_etag": await hub.extensions.etag(row),
            "deployment_etag": await hub.deployments.etag(row)}


@router.post("/v1/agent/heartbeat", **SIGNED)
async def heartbeat(signed: Machine, hub: HubDep) -> dict[str, Any]:
    """A heartbeat on its own (served without the web framework too: ``lean.py``)."""
    return await heartbeat_answer(hub, signed)


async def heartbeat_answer(hub: Hub, signed: Signed) -> dict[str, Any]:
    row = signed.machine
    now, abandon = await _record_heartbeat(hub, row, parse(Heartbeat, signed.body))
    return {**await _heartbeat_ack(hub, row, abandon), "hub_time": now}


@router.post("/v1/agent/stopping", **SIGNED)
async def stopping(signed: Machine, hub: HubDep) -> dict[str, Any]:
    """The agent is stopping gracefully: the machine shows Stopped until its next
    heartbeat from another run of its agent (a machine that dies silently turns
    Unresponsive after missed ones). The body (``StopNotice``) names the run."""
    row = signed.machine
    notice = parse(StopNotice, signed.body) if signed.body.strip() else StopNotice()
    now = await machines.record_stop(hub.engine, row.id, notice.run)
    log.info("machine %s (%s) is stopping", row.name, row.id)
    return {"machine_id": row.id, "stopped_at": now}


@router.post("/v1/agent/poll", **SIGNED)
async def poll(request: Request, hub: HubDep,
               wait: Annotated[float, Query(ge=0, le=300)] = 25.0,
               capacity: Annotated[int, Query(ge=0, le=256)] = 0,
               extensions_etag: Annotated[str | None, Query(max_length=128)] = None,
               deployment_etag: Annotated[str | None, Query(max_length=128)] = None
               ) -> dict[str, Any]:
    """Hold until work for this machine appears.

    ``capacity`` is how many jobs the agent runs at once (0 while it takes none); the
    jobs the hub sees it holding count against it. The body may carry the agent's
    heartbeat (``PollRequest``): it is recorded as the poll arrives and acknowledged in the
    answer (``heartbeat``), so an idle agent needs one request per poll, not two.
    ``extensions_etag``, the etag of the goals the agent was last told of: the poll also
    ends, with no item and the new etag, when the machine's goals change (woken by a change
    of its own goal). ``deployment_etag`` likewise for the machine's deployment (woken by
    a deployment aimed at the machine itself).

    The hub serves this path without the web framework (``lean.py``); this route declares
    it in the OpenAPI schema and answers the same way.
    """
    signed = await signed_machine(request)  # after the query's check (see deps.Machine)
    return await poll_answer(request, hub, signed, wait, capacity, extensions_etag,
                             deployment_etag)


async def poll_answer(request: Request, hub: Hub, signed: Signed, wait: float,
                      capacity: int, extensions_etag: str | None,
                      deployment_etag: str | None = None) -> dict[str, Any]:
    """The long-poll of ``signed``'s machine, its parameters checked."""
    row = signed.machine
    beat = parse(PollRequest, signed.body).heartbeat if signed.body.strip() else None

    async def done() -> bool:
        if await request.is_disconnected():
            return True
        if deployment_etag is not None and \
                await hub.deployments.etag(row) != deployment_etag:
            return True
        return extensions_etag is not None and \
            await hub.extensions.etag(row) != extensions_etag

    # Recorded beside the poll, not before it: the claim does not wait for the heartbeats'
    # batch to commit.
    recording = asyncio.ensure_future(_record_heartbeat(hub, row, beat)) \
        if beat is not None else None
    try:
        with hub.job_metrics.long_polls.track_inprogress():
            items = await hub.dispatcher.poll(row, min(wait, hub.config.poll_timeout),
                                              capacity=capacity, gone=done)
        hub.job_metrics.claimed(items, time.time())
        await job_identity.add_tokens(hub.engine, hub.vault, items)
    except BaseException:
        if recording is not None:  # it ends on its own; its failure is the poll's too
            recording.add_done_callback(lambda done: done.cancelled() or done.exception())
        raise
    answer: dict[str, Any] = {"items": items}
    if extensions_etag is not None:
        answer["extensions_etag"] = await hub.extensions.etag(row)
    if deployment_etag is not None:
        answer["deployment_etag"] = await hub.deployments.etag(row)
    if recording is None:
        return answer
    try:
        _, abandon = await recording
    except OutpostError as exc:
        # The items are claimed: they are answered; the agent sends the heartbeat again
        # on its own.
        answer["heartbeat_error"] = {"code": exc.code, "message": exc.message}
        return answer
    answer["heartbeat"] = await _heartbeat_ack(hub, row, abandon)
    return answer


def _bound_records(hub: Hub, count: int) -> None:
    most = hub.config.body_limits.report_records
    if count > most:
        raise OutpostError(
            "body_too_large", f"The request carries {count} output records; the hub "
            f"takes at most {most} in one request.", fix="Send the records in several "
            "requests (the agent sends at most about 1 MiB at a time), or raise "
            "body_limits.report_records in the hub's hub.yaml.", records=count, limit=most)


@router.post("/v1/agent/jobs/{job_id}/report", **SIGNED)
async def job_report(job_id: str, hub: HubDep,
                     sent: Annotated[tuple[Any, JobReport], Depends(agent_body(JobReport))]
                     ) -> dict[str, Any]:
    """One attempt's news, in order: its process started, output records, its end."""
    row, body = sent
    _bound_records(hub, len(body.records))
    status = await jobs.report(
        hub.engine, row.id, job_id, body.attempt, started=body.started,
        records=body.records, end=body.end.model_dump() if body.end else None)
    hub.job_metrics.reported(1, len(body.records))
    return {"id": job_id, "status": status}


@router.post("/v1/agent/reports", **SIGNED)
async def job_reports(hub: HubDep,
                      sent: Annotated[tuple[Any, JobReports], Depends(agent_body(JobReports))]
                      ) -> dict[str, Any]:
    """Several attempts' reports in one transaction (each as ``/jobs/{id}/report``
    takes it), and in the answer the jobs claimed for the slots they freed: an agent
    that runs many short jobs needs neither a request per job nor a long-poll answer
    per freed slot."""
    row, body = sent
    _bound_records(hub, sum(len(r.records) for r in body.reports))
    # Not model_dump(): it would copy every record again.
    results, items = await jobs.report_many(hub.engine, row, [
        {"job_id": r.job_id, "attempt": r.attempt, "started": r.started,
         "records": r.records, "end": r.end.model_dump() if r.end else None}
        for r in body.reports], body.claim)
    taken = [r for r, res in zip(body.reports, results, strict=True) if "error" not in res]
    hub.job_metrics.reported(len(taken), sum(len(r.records) for r in taken))
    hub.job_metrics.claimed(items, time.time())
    await job_identity.add_tokens(hub.engine, hub.vault, items)
    return {"results": results, "items": items}


@router.post("/v1/agent/jobs/{job_id}/paused", **SIGNED)
async def job_paused(job_id: str, hub: HubDep,
                     sent: Annotated[tuple[Any, JobAttempt], Depends(agent_body(JobAttempt))]
                     ) -> dict[str, Any]:
    row, body = sent
    return {"id": job_id, "status": await jobs.paused(hub.engine, row.id, job_id,
                                                      body.attempt)}


@router.post("/v1/agent/work/{item_id}/done", **SIGNED)
async def work_done(item_id: str, hub: HubDep,
                    sent: Annotated[tuple[Any, WorkDone], Depends(agent_body(WorkDone))]
                    ) -> dict[str, Any]:
    row, done = sent
    if not await hub.dispatcher.complete(row.id, item_id, done.result):
        raise OutpostError("not_found", f"No work item '{item_id}' claimed by this machine.")
    return {"id": item_id, "done": True}
