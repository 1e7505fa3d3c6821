"""Jobs: starting one or a batch, stop/suspend/resume, the list, one job and its output."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from pydantic import Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from outpost.protocol import models as m
from outpost.protocol.errors import OutpostError
from outpost.protocol.models import INT32_MAX, INT64_MAX, JobBatch, Wire

from .. import accounts, groups, idempotency, jobs
from ..openapi import ok
from ..state import Hub
from .deps import HubDep, IdempotencyKey, Op

router = APIRouter()


class JobStart(Wire):
    runbook: str = Field(min_length=1, max_length=128)
    group: str = Field(min_length=1, max_length=64)
    params: dict[str, Any] = Field(default_factory=dict)
    version: int | None = Field(default=None, ge=1, le=INT32_MAX)
    timeout: float | str | None = Field(
        default=None, description="Seconds, or a duration such as 90s, 5m, 10min or 1h30m; "
        "at most 7 days.")


@router.post("/v1/jobs", tags=["jobs"], status_code=201, response_model=None,
             responses=ok(m.JobStarted, 201))
async def job_start(principal: Op, hub: HubDep, body: JobStart, response: Response,
                    idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    """Queue a job; parameters are checked first, so a bad one queues nothing. With an
    Idempotency-Key, sending it again queues nothing more."""
    key = idempotency.key(principal.account_id, idempotency_key, "POST /v1/jobs",
                          body.model_dump(mode="json"))
    try:
        before = await idempotency.earlier(hub.engine, key)
        if before is None:
            job = await jobs.start(hub.engine, principal.account_id, body.runbook,
                                   body.group, body.params, body.version, body.timeout,
                                   key=key)
    except idempotency.Raced as raced:
        before = await idempotency.after_race(hub.engine, raced)
    if before is not None:
        return await replay(hub, principal.account_id, before, response)
    warnings = await groups.unknown_group_warnings(hub.engine, principal.account_id,
                                                   [body.group])
    return {**job, "warnings": warnings}


@router.post("/v1/jobs/batch", tags=["jobs"], status_code=201, response_model=None,
             responses=ok(m.JobBatchResult, 201))
async def job_start_batch(principal: Op, hub: HubDep, body: JobBatch, response: Response,
                          idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    """Queue 1 to 1000 jobs, all or none: every entry is checked as ``POST /v1/jobs``
    checks one before anything is stored, and the first bad one refuses the batch."""
    def entries() -> Iterator[dict[str, Any]]:
        # Read as start_many goes, so the first bad entry is named whatever is wrong.
        for index, entry in enumerate(body.jobs):
            try:
                start = JobStart.model_validate(entry)
            except ValidationError as exc:
                problems = [{"field": ".".join(str(p) for p in e.get("loc", ())) or "?",
                             "problem": e["msg"]} for e in exc.errors()]
                raise OutpostError(
                    "invalid_request", f"jobs[{index}]: The request is not valid: "
                    f"{problems[0]['field']}: {problems[0]['problem']}.",
                    index=index, problems=problems) from exc
            yield start.model_dump()

    key = idempotency.key(principal.account_id, idempotency_key, "POST /v1/jobs/batch",
                          body.model_dump(mode="json"))
    try:
        before = await idempotency.earlier(hub.engine, key)
        if before is None:
            views = await jobs.start_many(hub.engine, principal.account_id, entries(), key=key)
    except idempotency.Raced as raced:
        before = await idempotency.after_race(hub.engine, raced)
    if before is not None:
        return await replay(hub, principal.account_id, before, response)
    named = list(dict.fromkeys(view["group_name"] for view in views))
    warnings = await groups.unknown_group_warnings(hub.engine, principal.account_id, named)
    return {"jobs": views, "warnings": warnings}


async def replay(hub: Hub, account_id: str, before: idempotency.Earlier,
                 response: Response) -> dict[str, Any]:
    """The answer to a request sent again with its key: what the first one created, as it
    is now (a job, a batch's jobs, or a job on every machine of a group)."""
    response.headers[idempotency.REPLAYED] = "true"
    views = [await jobs.get(hub.engine, account_id, job_id) for job_id in before.ids]
    if before.kind == "jobs":
        return {"jobs": views, "warnings": []}
    return {**views[0], "warnings": []}


async def _control(hub: Hub, principal: accounts.Principal, job_id: str,
                   action: str) -> dict[str, Any]:
    """Stop, suspend or resume a job; a machine that holds it is told at once."""
    job_id = await jobs.resolve(hub.engine, principal.account_id, job_id)
    job, machine_id = await jobs.control(hub.engine, principal.account_id, job_id, action)
    if machine_id is not None:
        await hub.dispatcher.submit(principal.account_id, "job_control",
                                    {"job_id": job_id, "attempt": job["attempt"],
                                     "action": action}, machine_id=machine_id)
    return job


# A route per action rather than /{action}: POST /v1/jobs/ID/output must answer 405
# (that path takes GET), not 422 for an unknown action.
@router.post("/v1/jobs/{job_id}/stop", tags=["jobs"], response_model=None,
             responses=ok(m.JobDetail))
async def job_stop(principal: Op, hub: HubDep, job_id: str) -> dict[str, Any]:
    """Stop a job: its process group is ended on the machine that runs it."""
    return await _control(hub, principal, job_id, "stop")


@router.post("/v1/jobs/{job_id}/suspend", tags=["jobs"], response_model=None,
             responses=ok(m.JobDetail))
async def job_suspend(principal: Op, hub: HubDep, job_id: str) -> dict[str, Any]:
    """Suspend a job: its process group is paused where it runs, or it waits queued."""
    return await _control(hub, principal, job_id, "suspend")


@router.post("/v1/jobs/{job_id}/resume", tags=["jobs"], response_model=None,
             responses=ok(m.JobDetail))
async def job_resume(principal: Op, hub: HubDep, job_id: str) -> dict[str, Any]:
    """Resume a suspended job."""
    return await _control(hub, principal, job_id, "resume")


@router.get("/v1/jobs", tags=["jobs"], response_model=None, responses=ok(list[m.JobView]))
async def job_list(principal: Op, hub: HubDep, status: str | None = None,
                   limit: Annotated[int, Query(ge=1, le=10000)] = 200
                   ) -> list[dict[str, Any]]:
    """The newest jobs first."""
    return await jobs.listing(hub.engine, principal.account_id, status, limit)


@router.get("/v1/jobs/{job_id}", tags=["jobs"], response_model=None, responses=ok(m.JobDetail))
async def job_show(principal: Op, hub: HubDep, job_id: str) -> dict[str, Any]:
    if job_id == "batch":  # POST /v1/jobs/batch's path: another method answers 405
        raise StarletteHTTPException(405)
    job_id = await jobs.resolve(hub.engine, principal.account_id, job_id)
    return await jobs.get(hub.engine, principal.account_id, job_id)


@router.get("/v1/jobs/{job_id}/output", tags=["jobs"], response_model=None,
            responses=ok(list[m.RecordView]))
async def job_output(principal: Op, hub: HubDep, job_id: str,
                     after: Annotated[int, Query(ge=-1, le=INT64_MAX)] = -1,
                     stream: Annotated[list[str] | None, Query()] = None,
                     limit: Annotated[int, Query(ge=1, le=50000)] = 10000
                     ) -> list[dict[str, Any]]:
    """A page of the job's output records after sequence ``after``, in order."""
    job_id = await jobs.resolve(hub.engine, principal.account_id, job_id)
    return await jobs.records(hub.engine, principal.account_id, job_id, after, stream, limit)
