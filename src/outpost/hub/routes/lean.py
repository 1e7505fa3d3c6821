"""The agents' two most frequent requests, served without the web framework's per-request
work.

A fleet's idle agents make one request each poll cycle: ``POST /v1/agent/poll`` (carrying
the heartbeat), or ``POST /v1/agent/heartbeat`` where polls cannot carry it. At 10,000
agents that is several hundred a second, and the framework's layers (routing through every
router, dependency resolution, parameter models, the answer's encoder) cost about as much
CPU as the work itself. ``edge.Edge`` hands these two paths here once it has read and
checked the body; the rest of the API goes through the framework as before.

The answers are the same: the same code runs (``agents.poll_answer``,
``agents.heartbeat_answer``), query parameters are checked by a model with the same
constraints as the routes' declarations (so a bad one is refused with the same 422 and
problems), the query is checked before the signature, as the routes do, and every error is
answered by the app's own exception handlers. The routes stay declared in ``agents.py``,
which is what the OpenAPI schema documents.

The table also holds, under ``("*", "/v1/backup/")``, restic's REST protocol (every method
and path under that prefix, ``routes/restic.py``): a backup or a restore is hundreds to
thousands of requests, and its handler streams their bodies itself.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from ..edge import BACKUP_PATH
from .agents import heartbeat_answer, poll_answer
from .deps import hub_of, signed_machine
from .restic import PROTOCOL

Lean = Callable[[Scope, Receive, Send], Awaitable[None]]


class PollQuery(BaseModel):
    """``POST /v1/agent/poll``'s query, as its route declares it."""

    model_config = ConfigDict(extra="ignore")

    wait: float = Field(25.0, ge=0, le=300)
    capacity: int = Field(0, ge=0, le=256)
    extensions_etag: str | None = Field(None, max_length=128)
    deployment_etag: str | None = Field(None, max_length=128)


def _query(scope: Scope) -> PollQuery:
    raw: bytes = scope.get("query_string", b"")
    # The last value of a repeated name counts, as for the framework's scalar parameters.
    values = dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True)) if raw else {}
    try:
        return PollQuery.model_validate(values)
    except ValidationError as exc:
        raise RequestValidationError([
            {**e, "loc": ("query", *e["loc"])} for e in exc.errors(include_url=False)
        ]) from exc


def _encode(answer: dict[str, Any]) -> bytes:
    # As the framework's JSONResponse encodes; a value json cannot (none is expected) goes
    # through the framework's encoder.
    return json.dumps(answer, ensure_ascii=False, allow_nan=False, indent=None,
                      separators=(",", ":"), default=jsonable_encoder).encode()


async def _answer(request: Request, send: Send,
                  work: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    try:
        body = _encode(await work())
    except Exception as exc:  # noqa: BLE001 - answered by the app's own handler for it
        handler = _handler(request, exc)
        if handler is None:
            raise
        response = await handler(request, exc)
        await response(request.scope, request.receive, send)
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _handler(request: Request, exc: Exception) -> Any:
    handlers: dict[Any, Any] = request.app.exception_handlers
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None


async def poll(scope: Scope, receive: Receive, send: Send) -> None:
    request = Request(scope, receive)

    async def work() -> dict[str, Any]:
        query = _query(scope)
        signed = await signed_machine(request)
        return await poll_answer(request, hub_of(request), signed, query.wait,
                                 query.capacity, query.extensions_etag,
                                 query.deployment_etag)

    await _answer(request, send, work)


async def heartbeat(scope: Scope, receive: Receive, send: Send) -> None:
    request = Request(scope, receive)

    async def work() -> dict[str, Any]:
        return await heartbeat_answer(hub_of(request), await signed_machine(request))

    await _answer(request, send, work)


ROUTES: dict[tuple[str, str], Lean] = {
    ("POST", "/v1/agent/poll"): poll,
    ("POST", "/v1/agent/heartbeat"): heartbeat,
    # restic's REST protocol, every method and path under it (routes/restic.py).
    ("*", BACKUP_PATH): PROTOCOL,
}
