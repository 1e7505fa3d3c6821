"""The backup store's API: restic's REST backend protocol under ``/v1/backup/{machine_id}/``
(each machine's repository, opened by its backup token), and the operator's route that
issues that token.

The protocol is served by ``Protocol``, a plain ASGI app, not by the web framework's routes:
a restore or a backup is hundreds to thousands of requests, and the framework's per-request
work (matching the path against every router, dependencies, its streaming response) cost
about as much CPU as the bytes themselves (docs/backup.md, "Performance"). ``edge.Edge``
hands it every request under ``/v1/backup/`` (``routes/lean.py``); the framework's router
holds it too, as one route, for an app built without the lean table.

Its answers are restic's (docs/backup.md, "The protocol as the hub serves it"); its
refusals are the hub's error bodies with catalog codes (E9060-E9069, E9114), answered by the
app's own exception handlers, as the framework's routes were. The token is checked before a
byte of a body is read. These paths stay out of ``/openapi.json``: they carry restic's
binary files, not the JSON API the schema describes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter
from pydantic import Field
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from outpost.protocol.errors import OutpostError
from outpost.protocol.models import View, Wire

from .. import backupstore
from ..backupstore import Credential, Repository
from ..edge import DRAIN_MAX
from ..openapi import ok
from ..state import Hub
from .deps import HubDep, Op

router = APIRouter()

PREFIX = "/v1/backup/"
V1 = "application/vnd.x.restic.rest.v1"
V2 = "application/vnd.x.restic.rest.v2"
BINARY = b"application/octet-stream"
FILE_METHODS = ("HEAD", "GET", "POST", "DELETE")
# The values the framework read as true for a bool query parameter (?create=true).
TRUE = ("1", "true", "on", "yes", "t", "y")


class BackupTokenRequest(Wire):
    quota_bytes: int | None = Field(default=None, ge=0, description=(
        "The bytes this machine's repository may hold (0: unlimited); left out, the hub's "
        "backup_quota_bytes applies."))


class BackupTokenIssued(View):
    machine: str
    machine_id: str
    token: str = Field(description="The backup token (obk_...); shown this once (the hub "
                       "keeps only its SHA-256). It replaces the machine's previous one.")
    repository: str = Field(description="The repository's path on the hub, for restic's "
                            "REST protocol (through outpost-restic-bridge).")
    quota_bytes: int | None
    created_at: float


@router.post("/v1/machines/{name}/backup-token", tags=["backup"], status_code=201,
             response_model=None, responses=ok(BackupTokenIssued, 201))
async def backup_token(principal: Op, hub: HubDep, name: str,
                       body: BackupTokenRequest | None = None) -> dict[str, Any]:
    """Issue (or rotate) the backup token of one machine of the caller's account: it opens
    that machine's restic repository on the hub and nothing else."""
    quota = body.quota_bytes if body is not None else None
    return await backupstore.issue_token(hub.engine, principal.account_id, name, quota)


# --- restic's REST protocol ---------------------------------------------------------------
class _NotAllowed(OutpostError):
    def __init__(self, method: str, path: str, allowed: tuple[str, ...]) -> None:
        self.allow = ", ".join(allowed)
        super().__init__("method_not_allowed", f"{method} is not allowed on {path}; it takes "
                         f"{self.allow}.", fix=f"Send {self.allow} instead.", allowed=self.allow)


class _Gone(Exception):
    """The client hung up before its body was whole."""


def shape(path: str) -> tuple[str, str, str, tuple[str, ...]] | None:
    """(machine id, type, name, methods) of a path under /v1/backup/: type "" is the
    repository itself, name "" a listing of a type (or ``config``); None for a path of
    another shape. Types and names are checked once the caller is known (E9062)."""
    machine_id, slash, rest = path[len(PREFIX):].partition("/")
    if not machine_id or not slash:
        return None
    if not rest:
        return machine_id, "", "", ("POST",)
    if rest == "config":
        return machine_id, "config", "", FILE_METHODS
    kind, slash, name = rest.partition("/")
    if not kind or not slash or "/" in name:
        return None
    return machine_id, kind, name, FILE_METHODS if name else ("HEAD", "GET")


def _quota(hub: Hub, credential: Credential) -> int:
    if credential.quota_bytes is not None:
        return credential.quota_bytes
    return hub.config.backup_quota_bytes


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    """A request's body as the server hands it over (as large as it has read meanwhile)."""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _Gone
        chunk: bytes = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _answer(send: Send, status: int, body: bytes = b"",
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class Protocol:
    """restic's REST protocol, as a plain ASGI app (the module's docstring)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.serve(scope, receive, sending)
        except _Gone:
            return  # nobody left to answer; nothing was kept
        except Exception as exc:
            if started:
                raise  # the answer is under way: the server ends the connection
            await _refuse(scope, receive, send, exc)

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        hub: Hub = scope["app"].state.hub
        method: str = scope["method"]
        found = shape(scope["path"])
        if found is None:
            raise OutpostError("not_found", "No such API path.",
                               fix="See /openapi.json for the paths this hub serves.")
        machine_id, kind, name, methods = found
        if method not in methods:
            raise _NotAllowed(method, scope["path"], methods)
        headers = _headers(scope)
        credential = await backupstore.authorize(hub.engine, headers.get("authorization"),
                                                 machine_id)
        repository = hub.backups.repository(credential)
        if not kind:
            await _create(scope, send, machine_id, repository, credential)
        elif not name and kind != "config":
            await _listing(send, kind, repository, headers.get("accept", ""))
        else:
            await self.file(scope, receive, send, hub, headers, repository, credential,
                            kind, name)

    async def file(self, scope: Scope, receive: Receive, send: Send, hub: Hub,
                   headers: dict[str, str], repository: Repository, credential: Credential,
                   kind: str, name: str) -> None:
        if kind != "config":
            backupstore.check_name(kind, name)
        method = scope["method"]
        credential.check_write(method, kind)
        if method == "POST":
            declared_text = headers.get("content-length", "")
            declared = int(declared_text) if declared_text.isdigit() else None
            await repository.save(kind, name, _body(receive), declared,
                                  _quota(hub, credential))
            await _answer(send, 200)
        elif method == "DELETE":
            repository.delete(kind, name)
            await _answer(send, 200)
        elif method == "HEAD":
            size = repository.size(kind, name)
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-length", str(size).encode()), (b"content-type", BINARY)]})
            await send({"type": "http.response.body", "body": b""})
        else:
            await _get(receive, send, repository, kind, name, headers.get("range", ""))


def _headers(scope: Scope) -> dict[str, str]:
    wanted = (b"authorization", b"range", b"content-length", b"accept")
    return {key.decode(): value.decode("latin-1") for key, value in scope["headers"]
            if key in wanted}


async def _create(scope: Scope, send: Send, machine_id: str, repository: Repository,
                  credential: Credential) -> None:
    """``POST /?create=true``: the repository's directories (kept when they exist)."""
    credential.check_write("POST", "")
    query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
    if query.get("create", "").lower() not in TRUE:
        raise backupstore.invalid_path(f"/v1/backup/{machine_id}/ without ?create=true")
    repository.create()
    await _answer(send, 200)


async def _listing(send: Send, kind: str, repository: Repository, accept: str) -> None:
    """The files of one type: names (protocol v1) or names and sizes (v2)."""
    backupstore.check_type(kind)
    found = await asyncio.to_thread(repository.listing, kind)  # a data/ listing reads 256 dirs
    if V2 in accept:
        body, media = json.dumps(found), V2
    else:
        body, media = json.dumps([f["name"] for f in found]), V1
    await _answer(send, 200, body.encode(), [(b"content-type", media.encode())])


async def _get(receive: Receive, send: Send, repository: Repository, kind: str, name: str,
               wanted: str) -> None:
    reading = await repository.read(kind, name, wanted)
    headers = [(b"content-length", str(reading.length).encode()), (b"content-type", BINARY),
               (b"accept-ranges", b"bytes")]
    if reading.ranged:
        end = reading.start + reading.length - 1
        headers.append((b"content-range",
                        f"bytes {reading.start}-{end}/{reading.size}".encode()))
    status = 206 if reading.ranged else 200
    if reading.fh is None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": reading.data or b""})
        return
    pieces = repository.pieces(reading.fh, reading.start, reading.length)
    # The server drops what is sent after the client left, without a word: a watcher stops
    # the reading then instead of reading the rest of the file for nobody.
    left = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] == "http.request":
            pass
        left.set()

    watcher = asyncio.create_task(watch(), name="backup-get-watch")
    try:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        async for piece in pieces:
            if left.is_set():
                return
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await pieces.aclose()  # closes the file if the loop stopped early


async def _refuse(scope: Scope, receive: Receive, send: Send, exc: Exception) -> None:
    """The answer of the app's own handler for ``exc`` (as the framework's routes had)."""
    request = Request(scope, receive)
    handlers: dict[Any, Any] = scope["app"].exception_handlers
    handler = next((handlers[cls] for cls in type(exc).__mro__ if cls in handlers), None)
    if handler is None:
        raise exc
    response = await handler(request, exc)
    if isinstance(exc, _NotAllowed):
        response.headers["Allow"] = exc.allow
    declared = _headers(scope).get("content-length", "")
    if scope["method"] == "POST" and declared.isdigit() and int(declared) > DRAIN_MAX:
        # The server would read and throw away the rest of the body: close instead.
        response.headers["Connection"] = "close"
    await response(scope, receive, send)


PROTOCOL = Protocol()
# For an app without edge.Edge's lean table: the framework's router serves it as one route.
# (Starlette serves an endpoint that is not a function as an ASGI app, which this is.)
router.add_route(PREFIX + "{rest:path}", PROTOCOL,  # type: ignore[arg-type]
                 methods=list(FILE_METHODS), include_in_schema=False)
