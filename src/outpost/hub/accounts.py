"""Accounts, their two registration keys, and the API tokens scoped to them."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from outpost.protocol.errors import OutpostError
from outpost.protocol.signing import unb64

from .config import random_id
from .db import accounts, tokens
from .vault import Vault, new_account_key, new_token, token_hash

KEY_CONTEXT = "account-key"


@dataclass(frozen=True)
class Principal:
    """Who is calling the operator API: an account, and whether the token is the admin's."""

    account_id: str
    admin: bool


async def seed(engine: AsyncEngine, seed: dict[str, Any]) -> None:
    """Insert the first account and the admin token when the database lacks them."""
    async with engine.begin() as conn:
        found = await conn.scalar(
            sa.select(accounts.c.id).where(accounts.c.id == seed["account_id"])
        )
        if found:
            return
        await conn.execute(accounts.insert().values(
            id=seed["account_id"], name=seed["account_name"],
            primary_key=seed["primary_key"], secondary_key=seed["secondary_key"],
            created_at=seed["created_at"],
        ))
        await conn.execute(tokens.insert().values(
            id=random_id(), account_id=seed["account_id"], hash=seed["admin_token_hash"],
            name="admin", admin=True, created_at=seed["created_at"],
        ))


async def create(engine: AsyncEngine, vault: Vault, name: str) -> dict[str, str]:
    """A new account with fresh keys and an API token; the secrets are returned once."""
    account_id = random_id()
    primary, secondary, token = new_account_key(), new_account_key(), new_token()
    now = time.time()
    async with engine.begin() as conn:
        taken = await conn.scalar(sa.select(accounts.c.id).where(accounts.c.name == name))
        if taken:
            raise OutpostError("conflict", f"An account named '{name}' already exists.",
                               fix="Choose another name.")
        await conn.execute(accounts.insert().values(
            id=account_id, name=name,
            primary_key=vault.seal(primary.encode(), KEY_CONTEXT),
            secondary_key=vault.seal(secondary.encode(), KEY_CONTEXT),
            created_at=now,
        ))
        await conn.execute(tokens.insert().values(
            id=random_id(), account_id=account_id, hash=token_hash(token), name="default",
            admin=False, created_at=now,
        ))
    return {"id": account_id, "name": name, "primary_key": primary,
            "secondary_key": secondary, "token": token}


async def listing(engine: AsyncEngine, principal: Principal) -> list[dict[str, Any]]:
    query = sa.select(accounts.c.id, accounts.c.name, accounts.c.created_at).order_by(
        accounts.c.created_at)
    if not principal.admin:
        query = query.where(accounts.c.id == principal.account_id)
    async with engine.connect() as conn:
        return [dict(row._mapping) for row in await conn.execute(query)]


async def _row(engine: AsyncEngine, account_id: str) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(
            sa.select(accounts).where(accounts.c.id == account_id))).first()


def visible(principal: Principal, account_id: str) -> bool:
    return principal.admin or principal.account_id == account_id


async def keys(engine: AsyncEngine, vault: Vault, principal: Principal,
               account_id: str) -> dict[str, str]:
    row = await _row(engine, account_id) if visible(principal, account_id) else None
    if row is None:
        raise OutpostError("not_found", f"No account with id '{account_id}'.")
    return {
        "id": row.id, "name": row.name,
        "primary_key": vault.open(row.primary_key, KEY_CONTEXT).decode(),
        "secondary_key": vault.open(row.secondary_key, KEY_CONTEXT).decode(),
    }


async def regenerate(engine: AsyncEngine, vault: Vault, principal: Principal,
                     account_id: str, which: str) -> dict[str, str]:
    """Replace one key; the other stays valid, so agents re-key without downtime."""
    if which not in ("primary", "secondary"):
        raise OutpostError("invalid_request", f"Unknown key '{which}'.",
                           fix="Regenerate 'primary' or 'secondary'.")
    await keys(engine, vault, principal, account_id)  # existence and visibility
    column = accounts.c.primary_key if which == "primary" else accounts.c.secondary_key
    async with engine.begin() as conn:
        await conn.execute(accounts.update().where(accounts.c.id == account_id).values(
            {column: vault.seal(new_account_key().encode(), KEY_CONTEXT)}))
    return await keys(engine, vault, principal, account_id)


async def signing_keys(engine: AsyncEngine, vault: Vault, account_id: str) -> list[bytes] | None:
    """The raw bytes of both valid keys, or None when the account does not exist."""
    row = await _row(engine, account_id)
    if row is None:
        return None
    return [unb64(vault.open(sealed, KEY_CONTEXT).decode())
            for sealed in (row.primary_key, row.secondary_key)]


# A valid token's principal is kept for PRINCIPAL_SECONDS, so an operator's request costs
# no read of the tokens table. Tokens are never revoked today; whatever revokes one must
# clear its entry here (and accept that another hub keeps it for PRINCIPAL_SECONDS).
# Unknown tokens are not kept: a caller cannot fill this with guesses.
PRINCIPAL_SECONDS = 30.0
_principals: dict[str, tuple[float, Principal]] = {}


async def principal_for(engine: AsyncEngine, token: str) -> Principal | None:
    digest = token_hash(token)
    now = time.monotonic()
    hit = _principals.get(digest)
    if hit is not None and now - hit[0] < PRINCIPAL_SECONDS:
        return hit[1]
    async with engine.connect() as conn:
        row = (await conn.execute(
            sa.select(tokens.c.account_id, tokens.c.admin).where(
                tokens.c.hash == digest))).first()
    if row is None:
        return None
    if len(_principals) > 1000:
        _principals.clear()
    principal = Principal(row.account_id, bool(row.admin))
    _principals[digest] = (now, principal)
    return principal
