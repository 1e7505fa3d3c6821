"""A job on every machine of a group (``job start --all``; hub/fanout.py).

The parent is a job: 'job show', 'job list' and 'job stop' reach it through the jobs' own
routes. Only its start is a route of its own.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from pydantic import Field

from outpost.protocol import models as m

from .. import fanout, idempotency, jobs
from ..openapi import ok
from .deps import HubDep, IdempotencyKey, Op
from .jobs import JobStart, replay

router = APIRouter()


class FanoutStart(JobStart):
    timeout: float | str | None = Field(
        default=None, description="Each child's timeout: seconds, or a duration such as "
        "90s, 5m, 10min or 1h30m; at most 7 days.")
    max_concurrency: int | str | None = Field(
        default=None, description="Children on machines at once: N (1 or more) or P% of "
        "the group's machines (1% to 100%, at least 1). Default: all at once.")
    max_errors: int | str | None = Field(
        default=None, description="Failed children that may pass: N (0 or more) or P% of "
        "the children; at the next failure no further child is started. Default: no "
        "limit.")


@router.post("/v1/fanouts", tags=["jobs"], status_code=201, response_model=None,
             responses=ok(m.FanoutStarted, 201))
async def fanout_start(principal: Op, hub: HubDep, body: FanoutStart, response: Response,
                       idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    """Run a runbook on every machine of a group: one child job per machine, at most
    ``max_concurrency`` at a time, no further child started once more than ``max_errors``
    have failed. The answer is the parent job; 'GET /v1/jobs/{id}' shows it with its
    children."""
    key = idempotency.key(principal.account_id, idempotency_key, "POST /v1/fanouts",
                          body.model_dump(mode="json"))
    try:
        before = await idempotency.earlier(hub.engine, key)
        if before is None:
            values = await jobs.prepare(hub.engine, principal.account_id, body.runbook,
                                        body.group, body.params, body.version, body.timeout)
            return await fanout.start(hub.engine, principal.account_id, values,
                                      body.max_concurrency, body.max_errors, key=key)
    except idempotency.Raced as raced:
        before = await idempotency.after_race(hub.engine, raced)
    return await replay(hub, principal.account_id, before, response)
