"""The job identity: a token a running job uses to call the hub (HW-2).

A job token is ``ojt_<job id>.<mac>``, where the mac is an HMAC-SHA256, under a key derived
from the hub's master key, over the job id and the job's attempt number (which grows with
every claim and is never reused, unlike the count of failed activations that a resume
resets). Nothing is stored: the hub checks the mac and then the job's row, so the token is
valid only while that attempt is live on its machine, and it ends with the job. A new
attempt of the same job gets a new token. The token reaches the agent in the long-poll answer and
the runbook as a file in its helper directory, never in a URL, a log or an environment.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from outpost.protocol.errors import OutpostError

from .db import jobs
from .vault import Vault

PREFIX = "ojt_"
KEY_LABEL = "outpost job token v1"
# The runbook's process may be running in each of these; a job paused on its machine
# (Suspended) has no use for its token, and a resumed one gets it back.
LIVE_STATES = ("Activating", "Running", "Suspending", "Resuming", "Stopping")


@dataclass(frozen=True)
class JobIdentity:
    """Who a job token speaks for: one attempt of one job, in one account."""

    job_id: str
    account_id: str
    runbook: str
    machine_id: str | None
    attempt: int


def _mac(key: bytes, job_id: str, attempt: int) -> str:
    digest = hmac.new(key, f"{job_id}:{attempt}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


async def add_tokens(engine: AsyncEngine, vault: Vault, items: list[dict[str, Any]]) -> None:
    """Give each job in a long-poll answer the token of its current attempt."""
    claimed = [item["payload"] for item in items
               if item.get("kind") == "job" and isinstance(item.get("payload"), dict)]
    if not claimed:
        return
    # A claim names the attempt it made; only an item without one is looked up.
    attempts = {p["job_id"]: int(p["attempt"]) for p in claimed if p.get("attempt")}
    unknown = [p["job_id"] for p in claimed if p["job_id"] not in attempts]
    if unknown:
        async with engine.connect() as conn:
            rows = (await conn.execute(sa.select(jobs.c.id, jobs.c.attempt).where(
                jobs.c.id.in_(unknown)))).all()
        attempts.update({row.id: row.attempt for row in rows})
    key = vault.derive_key(KEY_LABEL)
    for payload in claimed:
        job_id = payload["job_id"]
        if job_id in attempts:
            payload["job_token"] = f"{PREFIX}{job_id}.{_mac(key, job_id, attempts[job_id])}"


async def verify(engine: AsyncEngine, vault: Vault, authorization: str | None) -> JobIdentity:
    """The job a bearer job token speaks for; E5002 unless that job is running now."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token.startswith(PREFIX) or "." not in token:
        raise OutpostError("job_token_invalid")
    job_id, _, mac = token[len(PREFIX):].partition(".")
    if len(job_id) > 36:
        raise OutpostError("job_token_invalid")
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(
            jobs.c.id, jobs.c.account_id, jobs.c.runbook_name, jobs.c.machine_id,
            jobs.c.status, jobs.c.attempt).where(jobs.c.id == job_id))).first()
    if row is None or not hmac.compare_digest(
            mac.encode(), _mac(vault.derive_key(KEY_LABEL), row.id, row.attempt).encode()):
        raise OutpostError("job_token_invalid")
    if row.status not in LIVE_STATES:
        raise OutpostError("job_token_invalid", f"The job token is no longer valid: job "
                           f"{row.id} is {row.status}.", job_id=row.id, status=row.status)
    return JobIdentity(row.id, row.account_id, row.runbook_name, row.machine_id, row.attempt)
