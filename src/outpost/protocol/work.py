"""Work items: what the hub hands an agent in the answer to a long-poll (or to a report that
claimed a freed slot), their payloads, and the results the agent answers them with.

The hub stores and sends plain dicts of these shapes (``dispatcher.submit``,
``jobs.claim``); ``parse_item`` reads an item with these models. The agent reads the
``job``, ``ping``, ``job_control`` and ``module_call`` items with readers.py instead and
``ext_op`` with extreaders.py (held to these models by tests/unit/test_agent_imports.py and
tests/unit/test_extreaders.py, without pydantic's memory), before a handler (agent/work.py)
sees it. Each kind has a payload model and, for items the
agent answers on ``POST /v1/agent/work/{id}/done``, a result model:

- ``ping``: ``{sent_at}`` -> ``{received_at}``
- ``job_control``: ``{job_id, attempt, action}`` -> ``{applied, why}``
- ``job``: a claimed job attempt (``JobClaim``); answered by the attempt's reports, not
  on the work item.
- ``ext_op``: an extension operation (``ExtOpPayload``) -> ``{accepted}``; its progress and
  end travel on their own routes (``ExtOpProgress``, ``ExtOpEnd``).

An item of a kind the agent does not know, or whose payload does not parse, is answered
with ``{"error": ErrorBody}`` (E8150, E8151) rather than dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError

from .base import ErrorBody, Wire
from .errors import OutpostError
from .kinds import EXT_OP as EXT_OP
from .kinds import JOB as JOB
from .kinds import JOB_CONTROL as JOB_CONTROL
from .kinds import MODULE_CALL as MODULE_CALL
from .kinds import PING as PING
from .readers import INT32_MAX, INT64_MAX


class PingPayload(Wire):
    sent_at: float = Field(description="When the hub sent the ping, seconds since the epoch.")


class PingResult(Wire):
    received_at: float = Field(description="When the agent took the ping.")


ControlAction = Literal["stop", "suspend", "resume"]


class JobControlPayload(Wire):
    job_id: str
    attempt: int = Field(ge=1, le=INT32_MAX)
    action: ControlAction


class JobControlResult(Wire):
    applied: bool
    why: str | None = None


class JobLimits(Wire):
    """The group's limits for its jobs; a None is the agent's own default."""

    memory_mb: int | None = Field(default=None, ge=0, le=INT64_MAX)
    cpus: float | None = Field(default=None, ge=0)
    processes: int | None = Field(default=None, ge=0, le=INT64_MAX)


class JobClaim(Wire):
    """One job attempt claimed for this machine: what the agent needs to run it."""

    job_id: str
    attempt: int = Field(default=1, ge=1, le=INT32_MAX)
    runbook: str
    version: int
    type: str
    content: str
    params: dict[str, Any] = Field(default_factory=dict)
    timeout: float | None = None
    log_verbose: bool = False
    log_progress: bool = False
    run_as: str | None = None
    limits: JobLimits | None = None
    seq_base: int = Field(default=0, ge=0, le=INT64_MAX)
    job_token: str | None = Field(default=None, description="The attempt's own token, for "
                                  "the runbook's calls to the hub (job_identity.py).")

    def as_job(self) -> dict[str, Any]:
        """The claim as the runner takes it (a dict, as the sandbox and helper files read
        it)."""
        return self.model_dump()


class ExtOpPayload(Wire):
    """An operation asked of an installed extension (for backup: snapshot, restore).

    The agent answers at once that it took the item (``POST /v1/agent/ext-ops/{op_id}/
    progress`` with state ``started`` or ``waiting`` and why), reports progress the same way,
    and ends it with ``POST /v1/agent/ext-ops/{op_id}/end`` (an ``ExtOpEnd``). The work item
    itself is answered with ``{"accepted": true}`` once the agent holds the operation.
    """

    op_id: str
    extension: str = Field(max_length=64)
    version: str | None = Field(default=None, max_length=64, description="The version the "
                                "hub expects installed; None: whichever is Ready.")
    operation: str = Field(max_length=64)
    attempt: int = Field(default=1, ge=1, le=INT32_MAX)
    params: dict[str, Any] = Field(default_factory=dict, description="The operation's own "
                                   "parameters (public), on the command's standard input "
                                   "with the extension's settings.")
    deadline: float | None = Field(default=None, description="When the operation must have "
                                   "ended, seconds since the epoch (the manifest's timeout "
                                   "from its start, or the hub's).")


ExtOpState = Literal["started", "waiting", "running"]


class ExtOpProgress(Wire):
    attempt: int = Field(ge=1, le=INT32_MAX)
    state: ExtOpState
    message: str = Field(default="", max_length=4000, description="For 'waiting': why "
                         "(\"waiting: CPU 94 % over 90 % for 2 min\").")
    at: float = Field(ge=0)


class ExtOpEnd(Wire):
    attempt: int = Field(ge=1, le=INT32_MAX)
    status: Literal["succeeded", "failed"]
    code: str | None = Field(default=None, max_length=32, description="A catalog code or "
                             "the extension's own (its status file's code).")
    message: str = Field(default="", max_length=4000)
    transient: bool = Field(default=False, description="The failure may pass (the hub's "
                            "store or the network): the hub retries with backoff (EX-12).")
    output: str = Field(default="", max_length=64 * 1024, description="The tail of the "
                        "operation's output.")
    result: dict[str, Any] = Field(default_factory=dict, description="What the operation "
                                   "returned (for a snapshot: id, size, files, duration, "
                                   "waited).")
    at: float = Field(ge=0)


class ModuleCallPayload(Wire):
    """A direct call of a module's method (``POST /v1/machines/M/modules/A/methods/NAME``):
    the agent hands it to the module through the local message hub and answers the work item
    with a ``ModuleCallResult`` once the module replies, or with an error when it is not
    connected or does not reply before ``timeout_seconds``."""

    module: str = Field(max_length=64)
    method: str = Field(max_length=128)
    payload: Any = None
    timeout_seconds: float = Field(default=30.0, gt=0, le=300)


class ModuleCallResult(Wire):
    status: int = Field(description="The module's own status (200 for success, as HTTP).")
    payload: Any = None


class WorkError(Wire):
    """The result of an item the agent could not take."""

    error: ErrorBody


PAYLOADS: dict[str, type[Wire]] = {
    JOB: JobClaim, PING: PingPayload, JOB_CONTROL: JobControlPayload, EXT_OP: ExtOpPayload,
    MODULE_CALL: ModuleCallPayload,
}


class RawItem(Wire):
    """A work item before its payload is parsed: its kind says what the payload is."""

    id: str
    kind: str = Field(max_length=64)
    payload: dict[str, Any] = Field(default_factory=dict)
    created_at: float | None = None


class WorkItem(Wire):
    """A work item whose payload parsed with the model of its kind (``PAYLOADS``, or the
    model a handler registered with)."""

    id: str
    kind: str
    payload: Any
    created_at: float | None = None


class PollAnswer(Wire):
    """The answer to ``POST /v1/agent/poll``; ``items`` stay raw here so that one
    malformed item is answered with an error and the others are still taken."""

    items: list[dict[str, Any]] = Field(default_factory=list)
    heartbeat: dict[str, Any] | None = Field(
        default=None, description="The acknowledgement (HeartbeatAck) of the heartbeat the "
        "poll carried; absent when it carried none, or from a hub that does not take one.")
    heartbeat_error: dict[str, Any] | None = Field(
        default=None, description="Why the heartbeat the poll carried was not recorded (its "
        "code and message); the agent sends it again on its own.")
    # The machine's extensions etag now, when the poll sent the one its agent holds: the
    # poll ends early, without items, when a change of the machine's own goal makes them
    # differ (docs/extensions.md, "How agents learn their goals").
    extensions_etag: str | None = None
    # Likewise the machine's deployment etag, when the poll sent the one its agent holds.
    deployment_etag: str | None = None


def parse_item(raw: dict[str, Any], model: type[Wire] | None = None) -> WorkItem:
    """A work item as the hub sent it, its payload parsed with ``model`` (by default the
    kind's model in ``PAYLOADS``). Raises OutpostError ``work_kind_unknown`` (no model for
    the kind) or ``work_payload_invalid``."""
    try:
        item = RawItem.model_validate(raw)
    except ValidationError as exc:
        raise _invalid(str(raw.get("id")), str(raw.get("kind")), exc) from None
    model = model or PAYLOADS.get(item.kind)
    if model is None:
        raise OutpostError("work_kind_unknown", f"This agent does not handle work of kind "
                           f"'{item.kind}'.", kind=item.kind, item=item.id)
    try:
        payload = model.model_validate(item.payload)
    except ValidationError as exc:
        raise _invalid(item.id, item.kind, exc) from None
    return WorkItem(id=item.id, kind=item.kind, payload=payload, created_at=item.created_at)


def error_result(exc: OutpostError) -> dict[str, Any]:
    """The result that answers an item the agent could not take."""
    return WorkError(error=ErrorBody.model_validate(exc.to_body())).model_dump()


def _invalid(item: str, kind: str, exc: ValidationError) -> OutpostError:
    shown = [f"{'.'.join(str(part) for part in error.get('loc', ())) or 'item'}: "
             f"{error.get('msg', 'invalid')}" for error in exc.errors()[:3]]
    more = f" (and {exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
    problem = "; ".join(shown) + more
    return OutpostError("work_payload_invalid", f"The work item {item} of kind '{kind}' is "
                        f"malformed: {problem}.", item=item, kind=kind, problem=problem)
