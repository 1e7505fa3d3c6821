"""Who is calling: an agent registering (account HMAC), an agent (machine Ed25519
signature with timestamp and nonce), or an operator (bearer API token)."""

from __future__ import annotations

import time
import weakref
from datetime import datetime, timezone
from collections.abc import MutableMapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from outpost import __version__
from outpost.protocol import signing, versions
from outpost.protocol.errors import OutpostError

from . import accounts, backupstore, machines, webhooks
from .batching import Batch, Batcher
from .db import nonces
from .vault import Vault


def raw_path(scope: MutableMapping[str, Any]) -> str:
    path: str = scope.get("raw_path", scope["path"].encode()).decode()
    query: bytes = scope.get("query_string", b"")
    return path + ("?" + query.decode() if query else "")


def check_version(agent_version: str | None, minimum: str) -> None:
    """HW-5: an older agent is told plainly which version it needs."""
    if not agent_version:
        return
    try:
        old = versions.older_than(agent_version, minimum)
    except ValueError:
        old = True
    if old:
        raise OutpostError(
            "agent_outdated",
            f"The agent is out of date (The specified class does not exist): this hub needs "
            f"agent version {minimum} or newer, and this machine runs {agent_version}.",
            fix=f"Upgrade the agent on this machine to {minimum} or newer "
                f"(the hub runs {__version__}), then restart it.",
            agent_version=agent_version, min_agent_version=minimum,
        )


def _stamp_time(stamp: str) -> datetime:
    try:
        return signing.parse_time(stamp)
    except (ValueError, TypeError):
        return datetime.fromtimestamp(0, timezone.utc)


async def registration(
    engine: AsyncEngine, vault: Vault, headers: Any, method: str, path: str, body: bytes
) -> str:
    """The account id of a correctly signed registration; 403 with a reason otherwise."""
    account_id: str = headers.get(signing.H_ACCOUNT, "")
    stamp = headers.get(signing.H_DATE, "")
    nonce = headers.get(signing.H_NONCE, "")
    signature = headers.get(signing.H_SIGNATURE, "")
    keys = await accounts.signing_keys(engine, vault, account_id) if account_id else None
    if keys is None:
        raise OutpostError("unknown_account", account_id=account_id)
    if not signing.verify_account(keys, signature, method, path, stamp, body, nonce):
        raise OutpostError("bad_signature", account_id=account_id)
    now = datetime.now(timezone.utc)
    client = _stamp_time(stamp)
    skew = (client - now).total_seconds()
    if abs(skew) > signing.MAX_SKEW_SECONDS:
        raise OutpostError(
            "clock_skew",
            fix=f"The machine's clock reads {signing.format_time(client)} and the hub's "
                f"{signing.format_time(now)} ({abs(skew):.0f} s apart; at most "
                f"{signing.MAX_SKEW_SECONDS} s is allowed). Synchronise the machine's clock "
                f"with NTP and register again.",
            client_time=signing.format_time(client), hub_time=signing.format_time(now),
            skew_seconds=round(skew, 3),
        )
    if not nonce:
        raise OutpostError(
            "replayed_request", f"The registration carries no nonce ({signing.H_NONCE}): "
            "the hub refuses registrations it could not tell from a replay.",
            fix=f"Upgrade the agent on this machine to {__version__} or newer, which signs "
                "a nonce with every registration, and register again.",
            account_id=account_id)
    # The nonce store's key is the signer: a machine id, or here the account id (both
    # random UUIDs, so an account's nonces and a machine's never meet).
    await _first_seen(engine, account_id, nonce, account_id=account_id)
    return account_id


class _Replayed(Exception):
    """A nonce its signer used before (the batch's outcome for that row)."""


class NonceWriter(Batcher[tuple[str, str]]):
    """Nonces stored in batches: one transaction for the requests of a ``window``. A
    batch that meets a nonce already stored stores its rows one by one to find which."""

    async def write(self, batch: Batch[tuple[str, str]]) -> None:
        rows = list(batch.rows.values())
        try:
            async with self.engine.begin() as conn:
                await conn.execute(_NEW_NONCE, rows)
            return
        except IntegrityError:
            if len(rows) == 1:
                batch.outcome[next(iter(batch.rows))] = _Replayed()
                return
        for key, row in batch.rows.items():
            try:
                async with self.engine.begin() as conn:
                    await conn.execute(_NEW_NONCE, row)
            except IntegrityError:
                batch.outcome[key] = _Replayed()


# A heartbeat or a long-poll may wait this long for other requests' nonces to share its
# transaction (what every other request stores at once, with whatever joined it so far).
NONCE_WINDOW = 0.05
_nonce_writers: weakref.WeakKeyDictionary[AsyncEngine, NonceWriter] = (
    weakref.WeakKeyDictionary())


def nonce_writer(engine: AsyncEngine) -> NonceWriter:
    found = _nonce_writers.get(engine)
    if found is None:
        found = _nonce_writers[engine] = NonceWriter(engine, NONCE_WINDOW)
    return found


async def _first_seen(engine: AsyncEngine, signer: str, nonce: str, *, wait: bool = False,
                      **details: str) -> None:
    """Store the nonce; E1009 if this signer sent it before (within twice the window).
    ``wait``: the request may wait for others to share the write (NONCE_WINDOW)."""
    if len(nonce) > 64:
        raise OutpostError("replayed_request", fix="Send a fresh nonce of at most 64 characters.")
    writer = nonce_writer(engine)
    key = (signer, nonce)
    if writer.pending(key):
        raise OutpostError("replayed_request", **details)
    try:
        await writer.add(key, {"machine_id": signer, "nonce": nonce, "seen_at": time.time()},
                         now=not wait)
    except _Replayed as exc:  # (an outage, say, is raised as it is: E3007, not a replay)
        raise OutpostError("replayed_request", **details) from exc


async def machine(
    engine: AsyncEngine, headers: Any, method: str, path: str, body: bytes,
    *, batched: bool = False
) -> Any:
    """The machine row of a correctly signed, fresh, first-seen agent request.
    ``batched``: its nonce may wait for others' (a heartbeat's, a long-poll's)."""
    machine_id = headers.get(signing.H_MACHINE, "")
    stamp = headers.get(signing.H_DATE, "")
    nonce = headers.get(signing.H_NONCE, "")
    signature = headers.get(signing.H_SIGNATURE, "")
    row = await machines.by_id(engine, machine_id, cached=True) if machine_id else None
    if row is None or not signing.verify_machine(
        signing.unb64(row.public_key), signature, method, path, stamp, nonce, body
    ):
        raise OutpostError("machine_unknown", machine_id=machine_id)
    now = datetime.now(timezone.utc)
    skew = (_stamp_time(stamp) - now).total_seconds()
    if abs(skew) > signing.MAX_SKEW_SECONDS:
        raise OutpostError("stale_request", skew_seconds=round(skew, 3),
                           hub_time=signing.format_time(now))
    if not nonce:
        raise OutpostError("replayed_request", fix="Send a fresh nonce of at most 64 characters.")
    await _first_seen(engine, row.id, nonce, wait=batched, machine_id=row.id)
    return row


_NEW_NONCE = nonces.insert()


async def prune_nonces(engine: AsyncEngine) -> int:
    """Nonces older than twice the window can no longer pass the timestamp check."""
    cutoff = time.time() - 2 * signing.MAX_SKEW_SECONDS
    async with engine.begin() as conn:
        result = await conn.execute(sa.delete(nonces).where(nonces.c.seen_at < cutoff))
    return int(result.rowcount or 0)


def caller_checks(engine: AsyncEngine, vault: Vault) -> dict[str, Any]:
    """For the edge: that a request's caller exists, from its headers alone, so an unknown
    caller is refused before its body is read (the signature, which needs the body, is
    checked by the route)."""

    async def operator_exists(_scope: Any, headers: Any) -> None:
        await operator(engine, headers.get("authorization"))

    async def machine_exists(_scope: Any, headers: Any) -> None:
        machine_id = headers.get(signing.H_MACHINE, "")
        if not machine_id or await machines.by_id(engine, machine_id, cached=True) is None:
            raise OutpostError("machine_unknown", machine_id=machine_id)

    async def account_exists(_scope: Any, headers: Any) -> None:
        account_id = headers.get(signing.H_ACCOUNT, "")
        if not account_id or await accounts.signing_keys(engine, vault, account_id) is None:
            raise OutpostError("unknown_account", account_id=account_id)

    async def webhook_exists(scope: Any, _headers: Any) -> None:
        await webhooks.find(engine, scope["path"][len(webhooks.PATH):])

    async def backup_allowed(scope: Any, headers: Any) -> None:
        # /v1/backup/{machine_id}/...: the token opens that machine's repository.
        machine_id = scope["path"][len("/v1/backup/"):].split("/", 1)[0]
        await backupstore.authorize(engine, headers.get("authorization"), machine_id)

    return {"operator": operator_exists, "machine": machine_exists,
            "account": account_exists, "webhook": webhook_exists, "backup": backup_allowed}


async def operator(engine: AsyncEngine, authorization: str | None) -> accounts.Principal:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise OutpostError("unauthorized")
    principal = await accounts.principal_for(engine, token.strip())
    if principal is None:
        raise OutpostError("unauthorized")
    return principal
