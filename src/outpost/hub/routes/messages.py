"""Upstream messages: agents post them, operators read them; direct calls of a module's
method go down to its machine as work items (hub/messages.py, docs/messages.md)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from outpost.protocol import errors as catalog
from outpost.protocol.errors import OutpostError
from outpost.protocol.modules import UpstreamAck, UpstreamBatch
from outpost.protocol.work import MODULE_CALL, ModuleCallPayload, ModuleCallResult

from .. import machines
from ..messages import LIMIT_MAX, counters
from ..openapi import ok
from .agents import SIGNED
from .deps import HubDep, Op, agent_body, errors

router = APIRouter()

# How long past the call's own timeout the hub waits for the agent's answer: the agent
# answers a module that did not reply at timeout_seconds, and its answer needs a moment.
CALL_GRACE = 2.0


class MessageView(BaseModel):
    id: int = Field(description="The hub's id: the order messages arrived in (a cursor).")
    machine: str
    seq: int
    module: str
    output: str
    properties: dict[str, Any]
    content_type: str | None
    message_id: str | None
    correlation_id: str | None
    body: str = Field(description="The body, base64.")
    created_at: float = Field(description="When the module sent it (the machine's clock).")
    received_at: float


class MachineCounters(BaseModel):
    accepted_through: int = Field(description="The highest seq the hub holds (-1: none).")
    dropped_expired: int = Field(description="Messages the agent dropped when their "
                                 "time-to-live passed before the hub could take them.")


class MessagesPage(BaseModel):
    messages: list[MessageView]
    cursor: int = Field(description="Pass as ``after`` to read the messages after these.")
    counters: MachineCounters | None = Field(default=None, description=(
        "With ``machine``: that machine's counters."))


class ModuleCall(BaseModel):
    """The body of ``POST /v1/machines/M/modules/A/methods/NAME``."""

    model_config = ConfigDict(extra="forbid")

    payload: Any = None
    timeout_seconds: float = Field(default=30.0, gt=0, le=300)


class ModuleCallAnswer(BaseModel):
    status: int
    payload: Any = None


@router.post("/v1/agent/messages", **SIGNED)
async def upstream(hub: HubDep,
                   sent: Annotated[tuple[Any, UpstreamBatch],
                                   Depends(agent_body(UpstreamBatch))]) -> dict[str, Any]:
    """Store a batch of upstream messages, each (machine, seq) once: a batch sent again
    after a lost answer is not doubled. Answered with the highest seq the hub holds."""
    row, batch = sent
    through = await hub.messages.accept(row, batch)
    return UpstreamAck(accepted_through=through).model_dump()


@router.get("/v1/messages", tags=["operator"], response_model=None, responses=ok(MessagesPage))
async def message_list(
        principal: Op, hub: HubDep,
        machine: Annotated[str | None, Query(max_length=64)] = None,
        module: Annotated[str | None, Query(max_length=128)] = None,
        after: Annotated[int | None, Query(ge=0, le=2**63 - 1, description=(
            "Messages after this id, oldest first; without it the newest, newest first."))
        ] = None,
        limit: Annotated[int, Query(ge=1, le=LIMIT_MAX)] = 100,
        wait: Annotated[float, Query(ge=0, le=60, description=(
            "With after: seconds to wait for a message when there is none yet."))] = 0.0,
) -> dict[str, Any]:
    machine_id = None
    if machine is not None:
        machine_id = (await machines.find(hub.engine, principal.account_id, machine)).id
    found = await hub.messages.read(principal.account_id, machine_id=machine_id,
                                    module=module, after=after, limit=limit,
                                    wait=min(wait, hub.config.poll_timeout))
    cursor = max([after or 0, *(m["id"] for m in found)])
    answer: dict[str, Any] = {"messages": found, "cursor": cursor}
    if machine_id is not None:
        answer["counters"] = await counters(hub.engine, machine_id)
    return answer


def _passed_through(error: dict[str, Any], module: str, method: str,
                     machine: str) -> OutpostError:
    """The agent's error as the operator's answer: its own code when the catalog knows it."""
    entry = catalog.CATALOG.get(str(error.get("code", "")))
    message = str(error.get("message") or "no message")
    found = error.get("details")
    details: dict[str, Any] = found if isinstance(found, dict) else {}
    if entry is not None:
        return OutpostError(entry.name, message, fix=error.get("fix") or None,
                            **{**details, "machine": machine})
    return OutpostError("module_call_failed", f"The call of {method} on module {module} of "
                        f"machine {machine} failed: {message}.", module=module,
                        method=method, machine=machine, agent_error=error)


@router.post("/v1/machines/{name}/modules/{module}/methods/{method}", tags=["operator"],
             response_model=None, responses=ok(ModuleCallAnswer) | errors(504))
async def module_call(principal: Op, hub: HubDep, name: str,
                      module: Annotated[str, Path(max_length=64)],
                      method: Annotated[str, Path(max_length=128)],
                      call: ModuleCall) -> dict[str, Any]:
    """Call a module's method on one machine and wait for its reply: a work item to the
    machine's agent, which hands it to the module through its local message hub."""
    payload = ModuleCallPayload(module=module, method=method, payload=call.payload,
                                timeout_seconds=call.timeout_seconds)
    row = await machines.find(hub.engine, principal.account_id, name)
    item_id = await hub.dispatcher.submit(row.account_id, MODULE_CALL, payload.model_dump(),
                                          machine_id=row.id)
    done = await hub.dispatcher.wait_done(item_id, call.timeout_seconds + CALL_GRACE)
    if done is None:
        await hub.dispatcher.withdraw(item_id)
        raise OutpostError(
            "module_call_timeout", f"Module {module} on machine {row.name} did not answer "
            f"the call of {method} within {call.timeout_seconds:g} s.", module=module,
            method=method, machine=row.name, timeout_seconds=call.timeout_seconds)
    result = done["result"] or {}
    if isinstance(result.get("error"), dict):
        raise _passed_through(result["error"], module, method, row.name)
    try:
        answer = ModuleCallResult.model_validate(result)
    except ValidationError:
        raise _passed_through({"message": "the agent's answer is not a module call result"},
                              module, method, row.name) from None
    return ModuleCallAnswer(status=answer.status, payload=answer.payload).model_dump()
