"""The agent's work kinds: a registry of handlers, one per kind of work item.

The daemon hands every work item it is given (in the answer to a long-poll, or to a report
that claimed a freed slot) to ``Registry.handle``, which reads it with the reader or payload
model its kind was registered with (protocol/readers.py, protocol/work.py) and calls the
kind's handler with the typed item and a ``Context``: the daemon's facilities a handler may
use. A handler returns the result to answer the item with (``POST /v1/agent/work/{id}/
done``), or None when the item is answered some other way (a job attempt, by its reports).

Built in: ``job`` (start the claimed attempt), ``ping`` (answer at once),
``job_control`` (stop, suspend or resume a running attempt), ``ext_op`` (an extension
operation, extensions/ops.py) and ``module_call`` (a module's method, modules/msghub.py).
``job``, ``ping``, ``job_control`` and ``module_call`` read their payloads with
protocol/readers.py, without pydantic (which says why); ``ext_op`` with
protocol/extreaders.py, imported at its first item.
Extensions and modules add a kind with ``register(kind, handler, payload=Model)``, without
touching the daemon.

An item of a kind nothing is registered for, or whose payload does not parse, is answered
with an error result (E8150, E8151; logged once per kind) and never stops the daemon; a
job claim that does not parse is reported back as a failed attempt instead, since job
claims are not work items the hub waits on. A handler that raises is logged with its
traceback and its item answered with E8152; the items after it are still taken.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union
from urllib.parse import quote

from outpost.protocol import kinds, readers
from outpost.protocol.errors import OutpostError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from outpost.protocol.base import Wire

    from .runner import JobRun
    from .state import StateDir

log = logging.getLogger("outpost.agent.work")

Call = Callable[..., Awaitable[Any]]
Result = Union["BaseModel", dict[str, Any], None]
Refuse = Callable[[dict[str, Any], OutpostError, "Context"], Awaitable[None]]
# How a kind's payload is read: a reader (protocol/readers.py: ``JobClaim.read``), a pydantic
# model, or where to find either (``"module:Name"``, ``"module:Name.read"``), imported when
# the first item of its kind arrives. The built-in kinds use readers: pydantic is not loaded
# for them at all.
Payload = Union[Callable[[Any], Any], type["Wire"], str]


@dataclass
class Item:
    """A work item whose payload was read with its kind's reader or model."""

    id: str
    kind: str
    payload: Any
    created_at: float | None = None


Run = Callable[[Item, "Context"], Awaitable[Result]]


@dataclass
class Context:
    """What a handler may use of the daemon."""

    call: Call  # a signed request to the hub: call(method, path, payload)
    jobs: Mapping[str, JobRun]  # the attempts running now, by job id
    state: StateDir
    # Keep a short task that must not be lost (its failure is logged).
    spawn: Callable[[Awaitable[Any], str], None]
    start_job: Callable[[readers.JobClaim], None]
    note_failure: Callable[[OutpostError], None] = lambda exc: None
    # Start the extensions' reconciler and operations if they do not run yet (the daemon
    # starts them only on a machine that has extensions: daemon.py).
    start_extensions: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class Handler:
    kind: str
    run: Run
    payload: Payload
    # How to answer an item of this kind that does not parse; by default an error result
    # on the work item.
    refuse: Refuse | None = None

    def read(self, raw: dict[str, Any]) -> Item:
        """The item, its payload read; OutpostError ``work_payload_invalid`` if it does not
        fit."""
        try:
            found = readers.RawItem.read(raw)
        except readers.ReadError as exc:
            raise invalid(str(raw.get("id")), str(raw.get("kind")), exc.problems) from None
        payload: Any = self.payload
        if isinstance(payload, str):
            module, _, name = payload.partition(":")
            payload = importlib.import_module(module)
            for part in name.split("."):  # "module:Class.read": a reader
                payload = getattr(payload, part)
        validate = getattr(payload, "model_validate", None)
        try:
            if validate is None:  # a reader
                return Item(found.id, found.kind, payload(found.payload), found.created_at)
            from pydantic import ValidationError

            try:
                return Item(found.id, found.kind, validate(found.payload), found.created_at)
            except ValidationError as exc:
                raise readers.ReadError("payload", [
                    f"{'.'.join(str(part) for part in error.get('loc', ())) or 'item'}: "
                    f"{error.get('msg', 'invalid')}" for error in exc.errors()]) from None
        except readers.ReadError as exc:
            raise invalid(found.id, found.kind, exc.problems) from None


def invalid(item: str, kind: str, problems: list[str]) -> OutpostError:
    """E8151, naming the first three problems (as protocol/work.py's ``parse_item``)."""
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    problem = "; ".join(problems[:3]) + more
    return OutpostError("work_payload_invalid", f"The work item {item} of kind '{kind}' is "
                        f"malformed: {problem}.", item=item, kind=kind, problem=problem)


def error_result(exc: OutpostError) -> dict[str, Any]:
    """The result that answers an item the agent could not take (``work.WorkError``)."""
    return {"error": exc.to_body()}


class Registry:
    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._warned: set[str] = set()

    def register(self, kind: str, handler: Run, *, payload: Payload,
                 refuse: Refuse | None = None) -> None:
        """Handle work items of ``kind`` with ``handler``, their payload read with
        ``payload`` (see ``Payload``). A kind is registered once."""
        if kind in self._handlers:
            raise ValueError(f"a handler for work of kind '{kind}' is already registered")
        self._handlers[kind] = Handler(kind, handler, payload, refuse)

    def kinds(self) -> list[str]:
        return sorted(self._handlers)

    async def handle(self, raw: dict[str, Any], ctx: Context) -> None:
        """Take one work item; never raises for what the hub sent."""
        kind = str(raw.get("kind"))
        handler = self._handlers.get(kind)
        try:
            if handler is None:
                raise OutpostError("work_kind_unknown", f"This agent does not handle work of "
                                   f"kind '{kind}'.", kind=kind, item=str(raw.get("id")))
            item = handler.read(raw)
        except OutpostError as exc:
            self._warn_once(kind, exc)
            if handler is not None and handler.refuse is not None:
                await handler.refuse(raw, exc, ctx)
            else:
                await answer(ctx, str(raw.get("id")), error_result(exc))
            return
        try:
            result = await handler.run(item, ctx)
        except Exception as exc:  # a handler's bug must not cost the other items
            log.exception("the handler of work of kind '%s' failed on item %s", kind, item.id)
            failed = OutpostError(
                "work_handler_failed", f"The agent's handler for work of kind '{kind}' "
                f"failed: {type(exc).__name__}: {exc}.", kind=kind, item=item.id)
            await answer(ctx, item.id, error_result(failed))
            return
        if result is not None:
            if not isinstance(result, dict):  # a model
                result = result.model_dump(exclude_none=True)
            await answer(ctx, item.id, result)

    def _warn_once(self, kind: str, exc: OutpostError) -> None:
        if kind in self._warned:
            log.debug("%s %s", exc.code, exc.message)
            return
        self._warned.add(kind)
        log.error("%s %s Fix: %s (answered with an error; further items of this kind are "
                  "answered alike without this message)", exc.code, exc.message, exc.fix)


async def answer(ctx: Context, item_id: str, result: dict[str, Any]) -> None:
    """Send a work item's result to the hub; a failure is noted and logged, not raised (the
    hub's caller then times out, as it would for a lost item)."""
    try:
        await ctx.call("POST", f"/v1/agent/work/{quote(item_id, safe='')}/done",
                       {"result": result})
    except OutpostError as exc:
        ctx.note_failure(exc)
        log.warning("could not report work item %s: %s", item_id, exc.message)


# --- the built-in kinds -----------------------------------------------------------------
async def _ping(item: Item, ctx: Context) -> Result:
    return {"received_at": time.time()}  # work.PingResult


async def _job_control(item: Item, ctx: Context) -> Result:
    asked: readers.JobControlPayload = item.payload
    run = ctx.jobs.get(asked.job_id)
    if run is None or run.attempt != asked.attempt:  # work.JobControlResult
        return {"applied": False, "why": "the agent does not run that attempt"}
    log.info("job %s: %s requested", run.id, asked.action)
    ctx.spawn(run.control(asked.action), f"control-{run.id}")
    return {"applied": True}


async def _job(item: Item, ctx: Context) -> Result:
    ctx.start_job(item.payload)
    return None  # the attempt's reports answer it


async def _refuse_job(raw: dict[str, Any], exc: OutpostError, ctx: Context) -> None:
    """A job claim the agent cannot read fails its attempt (as the runbook's failure, not
    the machine's: another agent of this version could not read it either), rather than
    waiting out its lease."""
    found = raw.get("payload")
    payload: dict[str, Any] = found if isinstance(found, dict) else {}
    job_id = payload.get("job_id") if isinstance(payload.get("job_id"), str) else None
    if job_id is None:
        return  # nothing names the job: its lease ends it
    try:
        attempt = int(payload.get("attempt") or 1)
    except (TypeError, ValueError):
        attempt = 1
    end = {"exit_code": None, "signal": None, "cause": "exit", "reason": exc.message}
    ctx.spawn(ctx.call("POST", f"/v1/agent/jobs/{quote(job_id, safe='')}/report",
                       {"attempt": attempt, "started": False, "end": end, "records": []}),
              f"refuse-{job_id}")


async def _ext_op(item: Item, ctx: Context) -> Result:
    """An extension operation (extensions/ops.py), on a machine whose extensions may not
    have started yet: one that has none answers as it would with them started (E9088)."""
    ctx.start_extensions()
    from .extensions import ops

    return await ops.take_item(item, ctx)


async def _module_call(item: Item, ctx: Context) -> Result:
    """A direct call of a module's method, through the local message hub of the machine's
    modules (modules/msghub.py); a machine that runs none answers E9182."""
    from .modules import msghub

    result: Result = await msghub.take_call(item, ctx)
    return result


registry = Registry()
register = registry.register
register(kinds.JOB, _job, payload=readers.JobClaim.read, refuse=_refuse_job)
register(kinds.PING, _ping, payload=readers.PingPayload.read)
register(kinds.JOB_CONTROL, _job_control, payload=readers.JobControlPayload.read)
register(kinds.EXT_OP, _ext_op, payload="outpost.protocol.extreaders:ExtOpPayload.read")
register(kinds.MODULE_CALL, _module_call, payload=readers.ModuleCallPayload.read)
