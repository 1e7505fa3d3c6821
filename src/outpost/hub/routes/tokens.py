"""The operator API's tokens: create (shown once), list, revoke."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import Field

from outpost.protocol import models as m
from outpost.protocol.models import Wire

from .. import accounts
from ..openapi import ok
from .deps import HubDep, Op

router = APIRouter()


class TokenCreate(Wire):
    name: str = Field(min_length=1, max_length=64, description=(
        "1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit; unique "
        "in the account."))
    admin: bool = Field(default=False, description="An admin token; only an admin token "
                        "may create one.")


@router.post("/v1/tokens", tags=["tokens"], status_code=201, response_model=None,
             responses=ok(m.TokenCreated, 201))
async def token_create(principal: Op, hub: HubDep, body: TokenCreate) -> dict[str, Any]:
    """A new API token of the caller's account; the token is in this answer only."""
    return await accounts.create_token(hub.engine, principal, body.name, body.admin)


@router.get("/v1/tokens", tags=["tokens"], response_model=None,
            responses=ok(list[m.TokenView]))
async def token_list(principal: Op, hub: HubDep) -> list[dict[str, Any]]:
    """The tokens of the caller's account, without their secrets."""
    return await accounts.list_tokens(hub.engine, principal)


@router.delete("/v1/tokens/{id_or_name}", tags=["tokens"], response_model=None,
               responses=ok(m.TokenRevoked))
async def token_revoke(principal: Op, hub: HubDep, id_or_name: str) -> dict[str, Any]:
    """Revoke a token of the caller's account (by id or name): refused on every hub
    replica within a second. The last admin token, and an account's last token, stay."""
    return await accounts.revoke_token(hub.engine, principal, id_or_name)
