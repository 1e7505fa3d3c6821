"""Accounts and their keys, and ``whoami`` (the caller's own account)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import Field

from outpost.protocol import models as m
from outpost.protocol.errors import OutpostError
from outpost.protocol.models import Wire

from .. import accounts
from ..openapi import ok
from .deps import HubDep, Op

router = APIRouter()


class AccountCreate(Wire):
    name: str = Field(min_length=1, max_length=128)


@router.get("/v1/whoami", tags=["operator"], response_model=None, responses=ok(m.Whoami))
async def whoami(principal: Op) -> dict[str, Any]:
    return {"account_id": principal.account_id, "admin": principal.admin}


@router.get("/v1/accounts", tags=["operator"], response_model=None,
            responses=ok(list[m.AccountView]))
async def account_list(principal: Op, hub: HubDep) -> list[dict[str, Any]]:
    return await accounts.listing(hub.engine, principal)


@router.post("/v1/accounts", tags=["operator"], status_code=201, response_model=None,
             responses=ok(m.AccountCreated, 201))
async def account_create(principal: Op, hub: HubDep, body: AccountCreate) -> dict[str, str]:
    if not principal.admin:
        raise OutpostError("admin_required")
    return await accounts.create(hub.engine, hub.vault, body.name)


@router.get("/v1/accounts/{account_id}/keys", tags=["operator"], response_model=None,
            responses=ok(m.AccountKeys))
async def account_keys(principal: Op, hub: HubDep, account_id: str) -> dict[str, str]:
    return await accounts.keys(hub.engine, hub.vault, principal, account_id)


@router.post("/v1/accounts/{account_id}/keys/{which}/regenerate", tags=["operator"],
             response_model=None, responses=ok(m.AccountKeys))
async def account_regenerate(principal: Op, hub: HubDep, account_id: str,
                             which: str) -> dict[str, str]:
    return await accounts.regenerate(hub.engine, hub.vault, principal, account_id, which)
