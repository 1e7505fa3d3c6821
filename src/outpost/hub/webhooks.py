"""Webhooks: a secret address whose POST starts a runbook job with the request body.

The secret in the address (32 random bytes, URL-safe) is the only credential, so it is shown
once, when the webhook is made, and the hub keeps only its SHA-256, like API tokens. The
body (UTF-8 text, at most ``MAX_BODY`` bytes) becomes the runbook parameter ``body``, which
the runbook must declare as ``string`` (the text as sent) or ``json`` (parsed). An unknown,
removed or expired webhook answers 404 (E6006), the same for each, so the answer tells a
caller nothing about which addresses exist.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from outpost.protocol.errors import OutpostError

from . import jobs, runbooks
from .config import random_id
from .db import webhooks
from .runbooks import NAME_RE

log = logging.getLogger("outpost.hub.webhooks")

BODY_PARAM = "body"
BODY_TYPES = ("string", "json")
MAX_BODY = 64 * 1024
PATH = "/v1/hooks/"


def secret_hash(secret: str) -> str:
    # The secret carries 256 random bits, so a plain SHA-256 cannot be brute-forced.
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_expiry(text: str | None, now: float) -> float | None:
    """An ISO 8601 date or date and time (UTC without a zone) in the future, or E6004."""
    if text is None or not text.strip():
        return None
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise OutpostError("expiry_invalid", f"Expiry '{text[:64]}' is not an ISO 8601 date.",
                           expires=text[:64]) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    if moment.timestamp() <= now:
        raise OutpostError("expiry_invalid", f"Expiry '{text[:64]}' is already past.",
                           expires=text[:64])
    return moment.timestamp()


def _placeholder(kind: str) -> str:
    return "null" if kind == "json" else ""


async def create(engine: AsyncEngine, account_id: str, name: str, runbook: str, group: str,
                 given: dict[str, Any], expires: str | None, base_url: str) -> dict[str, Any]:
    """Store a webhook and return it with its address; the secret is never shown again."""
    if not NAME_RE.match(name):
        raise OutpostError("invalid_request", f"Invalid webhook name '{name[:128]}'.",
                           fix="Use 1 to 128 letters, digits, '.', '_' or '-'.")
    if BODY_PARAM in given:
        raise OutpostError("param_invalid", f"Parameter '{BODY_PARAM}' is the request body of "
                           "each call; it cannot be fixed when the webhook is made.",
                           fix=f"Leave --param {BODY_PARAM} out.", parameter=BODY_PARAM)
    now = time.time()
    expires_at = parse_expiry(expires, now)
    book = await runbooks.get(engine, account_id, runbook)
    spec = next((p for p in book["params"] if p["name"] == BODY_PARAM), None)
    if spec is None or spec["type"] not in BODY_TYPES:
        raise OutpostError("webhook_param_missing",
                           f"Runbook '{runbook}' does not declare the parameter "
                           f"'{BODY_PARAM}' as string or json.", runbook=runbook)
    # Everything else a job needs (group, the other parameters) is checked as for a job.
    # The parameters given are stored typed, as a schedule's are ("5" for an int is 5).
    job = await jobs.prepare(engine, account_id, runbook, group,
                             {**given, BODY_PARAM: _placeholder(spec["type"])})
    given = {key: job["params"][key] for key in given}
    secret = secrets.token_urlsafe(32)
    try:
        async with engine.begin() as conn:
            await conn.execute(webhooks.insert().values(
                id=random_id(), account_id=account_id, name=name, runbook_name=runbook,
                group_name=group, params=given, secret_hash=secret_hash(secret),
                expires_at=expires_at, created_at=now))
    except IntegrityError as exc:
        raise OutpostError("conflict", f"A webhook named '{name}' already exists.",
                           fix="Choose another name, or remove it first with "
                               f"'outpost webhook remove {name}'.") from exc
    log.info("webhook %s created in account %s", name, account_id)
    view = await get(engine, account_id, name)
    view["url"] = base_url.rstrip("/") + PATH + secret
    return view


def _view(row: Any, now: float) -> dict[str, Any]:
    return {"name": row.name, "runbook_name": row.runbook_name, "group_name": row.group_name,
            "params": row.params, "expires_at": row.expires_at,
            "expired": row.expires_at is not None and row.expires_at <= now,
            "created_at": row.created_at, "last_used_at": row.last_used_at,
            "last_job_id": row.last_job_id}


async def _row(engine: AsyncEngine, account_id: str, name: str) -> Any:
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(webhooks).where(
            webhooks.c.account_id == account_id, webhooks.c.name == name))).first()
    if row is None:
        raise OutpostError("not_found", f"No webhook '{name}' in this account.",
                           fix="See 'outpost webhook list'.")
    return row


async def get(engine: AsyncEngine, account_id: str, name: str) -> dict[str, Any]:
    return _view(await _row(engine, account_id, name), time.time())


async def listing(engine: AsyncEngine, account_id: str) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(webhooks).where(
            webhooks.c.account_id == account_id).order_by(webhooks.c.name))).all()
    now = time.time()
    return [_view(row, now) for row in rows]


async def remove(engine: AsyncEngine, account_id: str, name: str) -> None:
    row = await _row(engine, account_id, name)
    async with engine.begin() as conn:
        await conn.execute(webhooks.delete().where(webhooks.c.id == row.id))
    log.info("webhook %s removed from account %s", name, account_id)


async def find(engine: AsyncEngine, secret: str) -> Any:
    """The live webhook whose secret this is; E6006 for unknown, removed or expired ones."""
    row = None
    if 0 < len(secret) <= 128:
        async with engine.connect() as conn:
            row = (await conn.execute(sa.select(webhooks).where(
                webhooks.c.secret_hash == secret_hash(secret)))).first()
    if row is None or (row.expires_at is not None and row.expires_at <= time.time()):
        raise OutpostError("webhook_not_found")
    return row


def decode_body(body: bytes) -> str:
    if len(body) > MAX_BODY:
        raise OutpostError("webhook_body_too_large", size=len(body), limit=MAX_BODY)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OutpostError("invalid_request", "The request body is not UTF-8 text.",
                           fix="Send the body as UTF-8 text (JSON, form data, plain "
                               "text).") from exc
    if "\x00" in text:
        raise OutpostError("invalid_request", "The request body contains the NUL character, "
                           "which cannot be passed to a runbook.",
                           fix="Send text without NUL characters.")
    return text


async def start(engine: AsyncEngine, row: Any, text: str) -> dict[str, Any]:
    """Queue the webhook's job with ``text`` as the parameter ``body``."""
    try:
        job = await jobs.prepare(engine, row.account_id, row.runbook_name, row.group_name,
                                 {**row.params, BODY_PARAM: text})
    except OutpostError as exc:
        if exc.details.get("parameter") == BODY_PARAM:
            # The conversion error quotes the whole body; the caller has it already.
            raise OutpostError("param_invalid", f"The request body is not a valid "
                               f"{exc.details.get('expected', 'value')} for the runbook's "
                               f"parameter '{BODY_PARAM}'.", fix="Send a body the runbook "
                               "accepts (for a json parameter, valid JSON).",
                               parameter=BODY_PARAM) from exc
        raise
    async with engine.begin() as conn:
        await jobs.insert(conn, job)
        await conn.execute(webhooks.update().where(webhooks.c.id == row.id).values(
            last_used_at=time.time(), last_job_id=job["id"]))
    log.info("webhook %s (account %s) started job %s", row.name, row.account_id, job["id"])
    return {"job_id": job["id"], "status": job["status"]}
