"""Extension operations: asked by operators, started and ended by the machine's agent
(hub/extension_ops.py)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response
from pydantic import Field

from outpost.protocol.models import View, Wire
from outpost.protocol.work import ExtOpEnd, ExtOpProgress

from .. import machines
from ..openapi import ok
from .agents import SIGNED
from .deps import HubDep, Op, agent_body

router = APIRouter()
TAGS: list[Any] = ["extensions"]


class OperationAsked(Wire):
    params: dict[str, Any] = Field(default_factory=dict, description="The operation's own "
                                   "parameters (public: never a secret), on its command's "
                                   "standard input beside the extension's settings.")


class Operation(View):
    id: str
    machine: str
    machine_id: str
    extension: str
    version: str | None
    operation: str
    params: dict[str, Any]
    status: str = Field(description="Queued, Waiting, Running, Succeeded or Failed.")
    code: str | None
    message: str
    attempt: int
    max_attempts: int
    next_try_at: float | None
    requested_by: str | None
    created_at: float
    started_at: float | None
    ended_at: float | None
    output: str
    result: dict[str, Any] | None
    start_deadline: float | None
    expected_end: float | None
    waited_seconds: float | None = Field(description="How long the agent held it back for "
                                         "the machine's load before starting it (EX-7).")
    wait_reason: str | None = Field(description="The last reason the agent gave for holding "
                                    "it back (\"waiting: CPU 94 % over 90 % for 2 min\").")
    not_before: float | None = Field(description="Not started before this time (a "
                                     "schedule's offset for the machine); null: at once.")
    schedule_id: str | None = Field(description="The schedule that asked it, if one did.")


class Uninstalling(View):
    name: str
    machine: str
    machine_id: str
    uninstalling: bool


@router.post("/v1/machines/{machine}/extensions/{name}/operations/{operation}", tags=TAGS,
             status_code=201, response_model=None, responses=ok(Operation, 201, "Asked."))
async def operation_ask(principal: Op, hub: HubDep, machine: str, name: str, operation: str,
                        body: OperationAsked) -> dict[str, Any]:
    """Ask extension NAME on one machine to run OPERATION. Refused at once when the machine's
    agent is unresponsive (E9080, 151099) or stopped (E9081), too old for the extension
    (E9082, 151095), or a previous operation of it there runs past its expected time
    (E9083, 150066)."""
    row = await machines.find(hub.engine, principal.account_id, machine)
    return await hub.ext_ops.ask(principal.account_id, row, name, operation, body.params,
                                 principal.token_id or None)


@router.get("/v1/extension-operations", tags=TAGS, response_model=None,
            responses=ok(list[Operation]))
async def operation_list(principal: Op, hub: HubDep,
                         machine: Annotated[str | None, Query(max_length=64)] = None,
                         extension: Annotated[str | None, Query(max_length=64)] = None,
                         ) -> list[dict[str, Any]]:
    """The account's extension operations, newest first (at most 200)."""
    row = await machines.find(hub.engine, principal.account_id, machine) if machine else None
    return await hub.ext_ops.listing(principal.account_id, row, extension)


@router.get("/v1/extension-operations/{op_id}", tags=TAGS, response_model=None,
            responses=ok(Operation))
async def operation_show(principal: Op, hub: HubDep, op_id: str) -> dict[str, Any]:
    """One extension operation: its state, attempts, output tail and result."""
    return await hub.ext_ops.show(principal.account_id, op_id)


@router.post("/v1/machines/{machine}/extensions/{name}/uninstall", tags=TAGS,
             response_model=None, responses=ok(Uninstalling))
async def extension_uninstall(principal: Op, hub: HubDep, machine: str,
                              name: str) -> dict[str, Any]:
    """Uninstall extension NAME from one machine, whatever its state there; its goal stays
    for the other machines. The next operation asked of it there installs it again."""
    row = await machines.find(hub.engine, principal.account_id, machine)
    return await hub.ext_ops.hold(principal.account_id, row, name)


@router.post("/v1/agent/ext-ops/{op_id}/progress", **SIGNED, status_code=204,
             response_class=Response)
async def agent_op_progress(op_id: str, hub: HubDep, sent: Annotated[
        tuple[Any, ExtOpProgress], Depends(agent_body(ExtOpProgress))]) -> Response:
    """The agent took the operation (started), waits to start it (waiting, and why), or
    runs it."""
    row, body = sent
    await hub.ext_ops.progress(row, op_id, body)
    return Response(status_code=204)


@router.post("/v1/agent/ext-ops/{op_id}/end", **SIGNED, status_code=204,
             response_class=Response)
async def agent_op_end(op_id: str, hub: HubDep, sent: Annotated[
        tuple[Any, ExtOpEnd], Depends(agent_body(ExtOpEnd))]) -> Response:
    """How the operation ended; a transient failure is tried again with backoff."""
    row, body = sent
    await hub.ext_ops.end(row, op_id, body)
    return Response(status_code=204)
