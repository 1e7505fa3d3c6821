"""Webhooks: made and removed by operators, called by anyone who holds the secret address."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from outpost.protocol import models as m
from outpost.protocol.errors import OutpostError
from outpost.protocol.models import Wire

from .. import webhooks
from ..openapi import ok
from .deps import HubDep, Op

router = APIRouter()


class WebhookCreate(Wire):
    name: str = Field(min_length=1, max_length=128)
    runbook: str = Field(min_length=1, max_length=128)
    group: str = Field(min_length=1, max_length=64)
    params: dict[str, Any] = Field(default_factory=dict)
    expires: str | None = Field(default=None, max_length=64,
                                description="ISO 8601 date or date and time; UTC without a "
                                "zone")


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


@router.post("/v1/webhooks", tags=["webhooks"], status_code=201, response_model=None,
             responses=ok(m.WebhookCreated, 201))
async def webhook_create(principal: Op, hub: HubDep, body: WebhookCreate) -> dict[str, Any]:
    """Make a webhook; its secret address is in ``url`` and is never shown again."""
    return await webhooks.create(hub.engine, principal.account_id, body.name, body.runbook,
                                 body.group, body.params, body.expires, hub.config.url)


@router.get("/v1/webhooks", tags=["webhooks"], response_model=None,
            responses=ok(list[m.WebhookView]))
async def webhook_list(principal: Op, hub: HubDep) -> list[dict[str, Any]]:
    return await webhooks.listing(hub.engine, principal.account_id)


@router.delete("/v1/webhooks/{name}", tags=["webhooks"], response_model=None,
               responses=ok(m.Removed))
async def webhook_remove(principal: Op, hub: HubDep, name: str) -> dict[str, Any]:
    await webhooks.remove(hub.engine, principal.account_id, name)
    return {"name": name, "removed": True}


# ":path" so that any address under the prefix gets the webhook's own 404.
@router.post(webhooks.PATH + "{secret:path}", tags=["webhooks"], status_code=202,
             response_model=None, responses=ok(m.WebhookCalled, 202))
async def webhook_call(request: Request, hub: HubDep, secret: str) -> dict[str, Any]:
    """Start the webhook's job with the request body as its parameter ``body``.

    No token: the secret in the address is the credential. Unknown, removed and expired
    webhooks all answer 404 (E6006).
    """
    row = await webhooks.find(hub.engine, secret)
    text = webhooks.decode_body(await _read_body(request, webhooks.MAX_BODY))
    return await webhooks.start(hub.engine, row, text)
