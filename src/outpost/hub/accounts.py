"""Accounts, their two registration keys, and the API tokens scoped to them."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from outpost.protocol.errors import OutpostError
from outpost.protocol.signing import unb64

from . import notify
from .config import random_id
from .db import accounts, tokens
from .vault import Vault, new_account_key, new_token, token_hash

KEY_CONTEXT = "account-key"


@dataclass(frozen=True)
class Principal:
    """Who is calling the operator API: an account, and whether the token is the admin's."""

    account_id: str
    admin: bool
    token_id: str = ""


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


# --- API tokens ---------------------------------------------------------------------------
# A token is shown once, when made; the hub keeps its SHA-256 only. Revoking deletes the row
# and tells every replica to forget it (notify.invalidate, "token"), within one second.
TOKEN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _token_view(row: Any) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "admin": bool(row.admin),
            "created_at": row.created_at}


async def create_token(engine: AsyncEngine, principal: Principal, name: str,
                       admin: bool = False) -> dict[str, Any]:
    """A new API token of the caller's account; the secret is returned this once."""
    if not TOKEN_NAME_RE.match(name):
        raise OutpostError("token_name_invalid", name=name)
    if admin and not principal.admin:
        raise OutpostError("token_admin_forbidden")
    token, now, token_id = new_token(), time.time(), random_id()
    async with engine.begin() as conn:
        taken = await conn.scalar(sa.select(tokens.c.id).where(
            tokens.c.account_id == principal.account_id, tokens.c.name == name))
        if taken:
            raise OutpostError("token_name_taken", name=name)
        await conn.execute(tokens.insert().values(
            id=token_id, account_id=principal.account_id, hash=token_hash(token), name=name,
            admin=admin, created_at=now))
    return {"id": token_id, "name": name, "admin": admin, "created_at": now, "token": token}


async def list_tokens(engine: AsyncEngine, principal: Principal) -> list[dict[str, Any]]:
    """The caller's account's tokens (never their secrets, which the hub does not keep)."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(tokens.c.id, tokens.c.name, tokens.c.admin, tokens.c.created_at)
            .where(tokens.c.account_id == principal.account_id)
            .order_by(tokens.c.created_at, tokens.c.name))
        return [_token_view(row) for row in rows]


async def revoke_token(engine: AsyncEngine, principal: Principal,
                       id_or_name: str) -> dict[str, Any]:
    """Revoke a token of the caller's account, found by id or name. Refused when it is the
    last admin token, or the account's last token (nobody could make another)."""
    async with engine.begin() as conn:
        mine = tokens.c.account_id == principal.account_id
        row = (await conn.execute(sa.select(tokens).where(
            mine, tokens.c.id == id_or_name))).first()
        if row is None:
            row = (await conn.execute(sa.select(tokens).where(
                mine, tokens.c.name == id_or_name))).first()
        if row is None:
            raise OutpostError("not_found", f"No token named '{id_or_name}' in this account.",
                               fix="See 'outpost token list' for the tokens of this account.")
        others = sa.select(sa.func.count()).select_from(tokens).where(
            mine, tokens.c.id != row.id)
        if row.admin and not await conn.scalar(others.where(tokens.c.admin.is_(True))):
            raise OutpostError("token_last_admin", name=row.name)
        if not await conn.scalar(others):
            raise OutpostError("token_last", name=row.name)
        await conn.execute(tokens.delete().where(tokens.c.id == row.id))
        await notify.invalidate(conn, "token", row.id)
    return {**_token_view(row), "revoked": True}


# A valid token's principal is kept for PRINCIPAL_SECONDS, so an operator's request costs
# no read of the tokens table. Revoking a token tells every replica to forget its entry
# (forget_token, through the notifier); the time limit bounds what a lost notification
# costs. Unknown tokens are not kept: a caller cannot fill this with guesses.
PRINCIPAL_SECONDS = 30.0
_principals: dict[str, tuple[float, Principal]] = {}
# Counts forgets: a principal read while one happened is not kept (it may be the row the
# revocation deleted, read just before its commit).
_forgets = 0


def forget_token(token_id: str) -> None:
    """Drop a token's cached principal (``notify.ALL``: every one)."""
    global _forgets
    _forgets += 1
    if token_id == notify.ALL:
        _principals.clear()
        return
    for digest, (_at, principal) in list(_principals.items()):
        if principal.token_id == token_id:
            del _principals[digest]


def follow(notifier: notify.Notifier) -> None:
    """Forget revoked tokens when any replica revokes them."""
    notifier.on_invalidate("token", forget_token)


async def principal_for(engine: AsyncEngine, token: str) -> Principal | None:
    digest = token_hash(token)
    now = time.monotonic()
    hit = _principals.get(digest)
    if hit is not None and now - hit[0] < PRINCIPAL_SECONDS:
        return hit[1]
    forgets = _forgets
    async with engine.connect() as conn:
        row = (await conn.execute(
            sa.select(tokens.c.id, tokens.c.account_id, tokens.c.admin).where(
                tokens.c.hash == digest))).first()
    if row is None:
        return None
    if len(_principals) > 1000:
        _principals.clear()
    principal = Principal(row.account_id, bool(row.admin), row.id)
    if forgets == _forgets:
        _principals[digest] = (now, principal)
    return principal
