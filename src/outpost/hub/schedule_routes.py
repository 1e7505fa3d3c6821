"""Routes for schedules and webhooks, and the scheduler loop they wake.

Kept apart from ``app.py``: ``add_routes`` is called once by ``create_app`` and returns the
scheduler, whose loop the application's lifespan supervises.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Request
from pydantic import Field

from outpost.protocol.errors import OutpostError
from outpost.protocol import models as m
from outpost.protocol.models import Wire

from . import accounts, auth, openapi, schedules, webhooks
from .openapi import ok
from .schedules import Scheduler

if TYPE_CHECKING:
    from .app import Hub


class ScheduleCreate(Wire):
    name: str = Field(min_length=1, max_length=128)
    runbook: str = Field(min_length=1, max_length=128)
    group: str = Field(min_length=1, max_length=64)
    cron: str = Field(max_length=256, description="5 fields, or 6 with seconds first, or "
                      "a keyword such as @daily")
    timezone: str = Field(default="UTC", max_length=256, description="An IANA time zone")
    spread: str | float = Field(default=0, description="A duration such as 10m or 1h30m "
                                "(or seconds); each run starts at a stable offset within it")
    params: dict[str, Any] = Field(default_factory=dict)


class WebhookCreate(Wire):
    name: str = Field(min_length=1, max_length=128)
    runbook: str = Field(min_length=1, max_length=128)
    group: str = Field(min_length=1, max_length=64)
    params: dict[str, Any] = Field(default_factory=dict)
    expires: str | None = Field(default=None, max_length=64,
                                description="ISO 8601 date or date and time; UTC without a "
                                "zone")


async def _operator(request: Request, _scheme: openapi.OperatorScheme = None
                    ) -> accounts.Principal:
    """The account of the bearer token (the same check as every operator route)."""
    return await auth.operator(request.app.state.hub.engine,
                               request.headers.get("authorization"))


# Module-level, as FastAPI resolves these annotations from the module's names.
Op = Annotated[accounts.Principal, Depends(_operator)]


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused once it passes ``limit`` bytes (never read whole first)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise OutpostError("webhook_body_too_large", size=int(declared), limit=limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise OutpostError("webhook_body_too_large", limit=limit)
    return bytes(body)


def add_routes(app: FastAPI, hub: Hub) -> Scheduler:
    scheduler = Scheduler(hub.engine, hub.dispatcher)

    # --- schedules ----------------------------------------------------------------------
    @app.post("/v1/schedules", tags=["schedules"], status_code=201, response_model=None,
              responses=ok(m.ScheduleDetail, 201))
    async def schedule_create(principal: Op, body: ScheduleCreate) -> dict[str, Any]:
        """Start a runbook on a group at the times of a cron expression."""
        made = await schedules.create(
            hub.engine, principal.account_id, body.name, body.runbook, body.group, body.cron,
            body.timezone, body.spread, body.params)
        scheduler.wake()
        return made

    @app.get("/v1/schedules", tags=["schedules"], response_model=None,
             responses=ok(list[m.ScheduleView]))
    async def schedule_list(principal: Op) -> list[dict[str, Any]]:
        return await schedules.listing(hub.engine, principal.account_id)

    @app.get("/v1/schedules/{name}", tags=["schedules"], response_model=None,
             responses=ok(m.ScheduleDetail))
    async def schedule_show(principal: Op, name: str) -> dict[str, Any]:
        """A schedule with its newest runs."""
        return await schedules.get(hub.engine, principal.account_id, name)

    @app.delete("/v1/schedules/{name}", tags=["schedules"], response_model=None,
                responses=ok(m.Removed))
    async def schedule_remove(principal: Op, name: str) -> dict[str, Any]:
        await schedules.remove(hub.engine, principal.account_id, name)
        return {"name": name, "removed": True}

    @app.post("/v1/schedules/{name}/enable", tags=["schedules"], response_model=None,
              responses=ok(m.ScheduleDetail))
    async def schedule_enable(principal: Op, name: str) -> dict[str, Any]:
        """Enable from now on; runs that fell due while disabled are not started."""
        found = await schedules.set_enabled(hub.engine, principal.account_id, name, True)
        scheduler.wake()
        return found

    @app.post("/v1/schedules/{name}/disable", tags=["schedules"], response_model=None,
              responses=ok(m.ScheduleDetail))
    async def schedule_disable(principal: Op, name: str) -> dict[str, Any]:
        return await schedules.set_enabled(hub.engine, principal.account_id, name, False)

    # --- webhooks -----------------------------------------------------------------------
    @app.post("/v1/webhooks", tags=["webhooks"], status_code=201, response_model=None,
              responses=ok(m.WebhookCreated, 201))
    async def webhook_create(principal: Op, body: WebhookCreate) -> dict[str, Any]:
        """Make a webhook; its secret address is in ``url`` and is never shown again."""
        return await webhooks.create(hub.engine, principal.account_id, body.name, body.runbook,
                                     body.group, body.params, body.expires, hub.config.url)

    @app.get("/v1/webhooks", tags=["webhooks"], response_model=None,
             responses=ok(list[m.WebhookView]))
    async def webhook_list(principal: Op) -> list[dict[str, Any]]:
        return await webhooks.listing(hub.engine, principal.account_id)

    @app.delete("/v1/webhooks/{name}", tags=["webhooks"], response_model=None,
                responses=ok(m.Removed))
    async def webhook_remove(principal: Op, name: str) -> dict[str, Any]:
        await webhooks.remove(hub.engine, principal.account_id, name)
        return {"name": name, "removed": True}

    # ":path" so that any address under the prefix gets the webhook's own 404.
    @app.post(webhooks.PATH + "{secret:path}", tags=["webhooks"], status_code=202,
              response_model=None, responses=ok(m.WebhookCalled, 202))
    async def webhook_call(request: Request, secret: str) -> dict[str, Any]:
        """Start the webhook's job with the request body as its parameter ``body``.

        No token: the secret in the address is the credential. Unknown, removed and expired
        webhooks all answer 404 (E6006).
        """
        row = await webhooks.find(hub.engine, secret)
        text = webhooks.decode_body(await _read_body(request, webhooks.MAX_BODY))
        started = await webhooks.start(hub.engine, row, text)
        hub.dispatcher.wake(f"g:{row.account_id}:{row.group_name}")
        return started

    return scheduler
