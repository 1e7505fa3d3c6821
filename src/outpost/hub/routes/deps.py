"""What every router depends on: the hub, the operator's token, the agent's signature, and
the error answers the schema declares.

Each caller is checked by one dependency here (``auth.py`` does the checking): ``Op`` for an
operator's bearer token, ``Job`` for a running job's token, ``Machine`` for a request signed
with a machine key (its route also declares ``dependencies=[openapi.MACHINE_SIGNED]`` for the
schema), and ``agent_body(Model)`` for a signed request whose body is ``Model``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, NamedTuple, TypeVar

from fastapi import Depends, Header, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from outpost.protocol.models import ErrorBody

from .. import accounts, auth, job_identity, openapi
from ..state import Hub

_STATUS_TEXT = {
    400: "The body is not JSON (E3003).",
    401: "No valid token, machine signature or job token; a replayed request (E3001, E1008, "
         "E1009, E1010, E5002).",
    403: "Not allowed to this caller, or a refused registration (E3004, E1001-E1003).",
    404: "No such object in the caller's account, or no such path (E3002, E6006).",
    409: "Conflicts with what exists or with the job's state (E3009, E4009, E1004).",
    413: "The body is larger than the route takes (E3011, E4005, E5005, E6007).",
    422: "A field is missing, of the wrong type or out of range; the message names it "
         "(E3003 and the other 4xx codes of errors.md).",
    426: "The agent is older than the hub's min_agent_version (E1007).",
    500: "The hub failed while handling the request; details.request_id is in its log "
         "(E3006).",
    503: "The hub's database cannot be reached (E3007).",
    504: "The machine did not answer in time (E3010).",
}
COMMON_ERRORS = (400, 401, 403, 404, 409, 413, 422, 500, 503)


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error answers: every one is an ErrorBody."""
    return {status: {"model": ErrorBody, "description": _STATUS_TEXT[status]}
            for status in statuses}


def hub_of(request: Request) -> Hub:
    found: Hub = request.app.state.hub
    return found


async def _hub(request: Request) -> Hub:
    # async: a plain function would be run in a worker thread, on every request.
    return hub_of(request)


HubDep = Annotated[Hub, Depends(_hub)]


async def operator(request: Request, _scheme: openapi.OperatorScheme = None
                   ) -> accounts.Principal:
    """The account (and admin flag) of the bearer token; 401 otherwise."""
    return await auth.operator(hub_of(request).engine, request.headers.get("authorization"))


async def job(request: Request, _scheme: openapi.JobScheme = None
              ) -> job_identity.JobIdentity:
    """The running job a job token (``ojt_...``) speaks for; 401 otherwise."""
    hub = hub_of(request)
    return await job_identity.verify(hub.engine, hub.vault, request.headers.get("authorization"))


# Module-level, as FastAPI resolves these annotations from the module's names.
Op = Annotated[accounts.Principal, Depends(operator)]
Job = Annotated[job_identity.JobIdentity, Depends(job)]


class Signed(NamedTuple):
    """A request signed with a machine key: the machine's row and the raw body."""

    machine: Any
    body: bytes


# Requests that wait anyway (a heartbeat's answer, a long-poll) store their nonces in
# batches (auth.NONCE_WINDOW); the others store theirs at once.
BATCHED_NONCES = frozenset({"/v1/agent/heartbeat", "/v1/agent/poll"})


async def signed_machine(request: Request) -> Signed:
    """The machine whose key signed the request (method, raw path, body), and an agent not
    older than the hub's ``min_agent_version``."""
    hub = hub_of(request)
    body = await request.body()
    row = await auth.machine(hub.engine, request.headers, request.method,
                             auth.raw_path(request.scope), body,
                             batched=request.scope["path"] in BATCHED_NONCES)
    auth.check_version(request.headers.get("x-outpost-agent-version"),
                       hub.config.min_agent_version)
    return Signed(row, body)


# A dependency runs before the route's query parameters are checked: a route that takes
# any calls signed_machine itself, so that a bad parameter is named before the signature.
Machine = Annotated[Signed, Depends(signed_machine)]

M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], body: bytes) -> M:
    """``body`` as ``model``; a bad one answers 422 as a bad declared body does."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc


def agent_body(model: type[M]) -> Callable[[Request], Awaitable[tuple[Any, M]]]:
    """A dependency: the signing machine's row and the body read as ``model`` (checked after
    the signature, so an unsigned request is refused before its body is looked at). The
    body stays out of the schema, as agents' messages are ``protocol`` models."""

    async def dependency(request: Request) -> tuple[Any, M]:
        signed = await signed_machine(request)
        return signed.machine, parse(model, signed.body or b"{}")

    return dependency


# A request that creates work may carry a key, so that sending it again is safe
# (hub/idempotency.py).
IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", description="A key of your choosing (1 to 255 printable ASCII "
    "characters, a UUID say) that names this request: sent again with the same key and "
    "body within 24 hours, the request is answered with what it created the first time "
    "(header Idempotent-Replayed: true) and creates nothing more; the same key with "
    "another body is refused (E3014).")]
