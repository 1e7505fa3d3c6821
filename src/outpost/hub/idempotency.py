"""Requests that create work, made safe to send again (the ``Idempotency-Key`` header).

An operator's ``job start`` whose answer is lost (the network cut after the hub committed,
the hub restarted, its database away for a moment) cannot tell whether the job was queued.
Sent again without a key it would queue a second job. With a key, the hub stores the key
with what the request created, in the same transaction; the same key sent again by the same
account for the same route and body is answered with what was created then (header
``Idempotent-Replayed: true``), and nothing is created twice. The same key with another body
or route is refused (E3014), since the caller's two requests disagree. Keys are kept for
``TTL`` seconds, then pruned. Two requests with one key at the same moment: the second
meets the first's row at its commit (the primary key) and is answered like a repeat.

The CLI sends a new key with every ``job start`` and sends the request again, with the same
key, while the hub is away (cli/client.py), so a job start rides out a hub restart or a
database outage and still queues one job.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from outpost.protocol.errors import OutpostError

from .db import idempotency_keys

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
TTL = 24 * 3600.0  # seconds a key is kept
MAX_LENGTH = 255


@dataclass(frozen=True)
class Key:
    account_id: str
    key: str
    route: str
    fingerprint: str  # SHA-256 of the request's body, canonical JSON


@dataclass(frozen=True)
class Earlier:
    """What a key's first request created: ``kind`` (job, jobs, fanout) and the ids."""

    kind: str
    ids: list[str]


class Raced(Exception):
    """Another request with the same key committed first."""

    def __init__(self, key: Key) -> None:
        super().__init__(key.key)
        self.key = key


def key(account_id: str, header: str | None, route: str, body: Any) -> Key | None:
    """The request's key, or None without the header (E3015 for one that is not a key)."""
    if header is None:
        return None
    if not 1 <= len(header) <= MAX_LENGTH or not header.isascii() or not header.isprintable():
        raise OutpostError("idempotency_key_invalid",
                           f"The {HEADER} header must be 1 to {MAX_LENGTH} printable ASCII "
                           f"characters; it has {len(header)} characters.",
                           header=HEADER)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return Key(account_id, header, route, hashlib.sha256(canonical.encode()).hexdigest())


def _answer(row: Any, asked: Key) -> Earlier:
    if row.route != asked.route or row.fingerprint != asked.fingerprint:
        raise OutpostError(
            "idempotency_key_reused",
            f"The {HEADER} '{asked.key}' was used {_ago(row.created_at)} for another "
            f"request ({row.route}, another body); a key names one request.",
            header=HEADER, route=row.route)
    return Earlier(row.kind, list(row.ids))


def _ago(at: float) -> str:
    seconds = max(time.time() - at, 0.0)
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


async def earlier(engine: AsyncEngine, asked: Key | None) -> Earlier | None:
    """What this key created before, or None for a key not seen (E3014 when it was used for
    another request)."""
    if asked is None:
        return None
    t = idempotency_keys
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(t).where(
            t.c.account_id == asked.account_id, t.c.key == asked.key,
            t.c.created_at > time.time() - TTL))).first()
    return None if row is None else _answer(row, asked)


async def record(conn: AsyncConnection, asked: Key | None, kind: str,
                 ids: Sequence[str]) -> None:
    """Store the key with what its request creates, in the creating transaction (``Raced``
    when another request with this key committed first: the caller's transaction must end
    without effect, and the caller answers as for a repeat)."""
    if asked is None:
        return
    t = idempotency_keys
    # A key past its time is free again: its row goes first (it is pruned later otherwise).
    await conn.execute(sa.delete(t).where(
        t.c.account_id == asked.account_id, t.c.key == asked.key,
        t.c.created_at <= time.time() - TTL))
    try:
        await conn.execute(t.insert().values(
            account_id=asked.account_id, key=asked.key, route=asked.route,
            fingerprint=asked.fingerprint, kind=kind, ids=list(ids), created_at=time.time()))
    except sa.exc.IntegrityError as exc:
        raise Raced(asked) from exc


async def after_race(engine: AsyncEngine, raced: Raced) -> Earlier:
    """The earlier request's creation, once ``record`` found its row."""
    found = await earlier(engine, raced.key)
    if found is None:  # its row expired in between: nothing to answer with
        raise OutpostError("idempotency_key_reused", f"The {HEADER} '{raced.key.key}' was "
                           "used by another request at the same moment; send it again.",
                           header=HEADER, route=raced.key.route)
    return found


async def prune(engine: AsyncEngine) -> int:
    """Keys older than ``TTL``."""
    async with engine.begin() as conn:
        result = await conn.execute(sa.delete(idempotency_keys).where(
            idempotency_keys.c.created_at < time.time() - TTL))
    return int(result.rowcount or 0)
