"""The agent's work kinds: a registry of handlers, one per kind of work item.

The daemon hands every work item it is given (in the answer to a long-poll, or to a report
that claimed a freed slot) to ``Registry.handle``, which parses it with the payload model
its kind was registered with (protocol/work.py) and calls the kind's handler with the typed
item and a ``Context``: the daemon's facilities a handler may use. A handler returns the
result to answer the item with (``POST /v1/agent/work/{id}/done``), or None when the item
is answered some other way (a job attempt, by its reports).

Built in: ``job`` (start the claimed attempt), ``ping`` (answer at once),
``job_control`` (stop, suspend or resume a running attempt) and ``ext_op`` (an extension
operation, extensions/ops.py). Their payload models, and pydantic with them, are imported
when the first work item arrives, not by an idle agent (protocol/answers.py says why).
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

from outpost.protocol import kinds
from outpost.protocol.errors import OutpostError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from outpost.protocol import work as wire
    from outpost.protocol.models import Wire

    from .runner import JobRun
    from .state import StateDir

log = logging.getLogger("outpost.agent.work")

Call = Callable[..., Awaitable[Any]]
Result = Union["BaseModel", dict[str, Any], None]
Run = Callable[["wire.WorkItem", "Context"], Awaitable[Result]]
Refuse = Callable[[dict[str, Any], OutpostError, "Context"], Awaitable[None]]


@dataclass
class Context:
    """What a handler may use of the daemon."""

    call: Call  # a signed request to the hub: call(method, path, payload)
    jobs: Mapping[str, JobRun]  # the attempts running now, by job id
    state: StateDir
    # Keep a short task that must not be lost (its failure is logged).
    spawn: Callable[[Awaitable[Any], str], None]
    start_job: Callable[[wire.JobClaim], None]
    note_failure: Callable[[OutpostError], None] = lambda exc: None
    # Start the extensions' reconciler and operations if they do not run yet (the daemon
    # starts them only on a machine that has extensions: daemon.py).
    start_extensions: Callable[[], None] = lambda: None


# A payload model, or where to find it ("module:Name"), imported when the first item of its
# kind arrives: the built-in kinds' models are pydantic's, which an idle agent does not load.
Payload = Union[type["Wire"], str]


@dataclass(frozen=True)
class Handler:
    kind: str
    run: Run
    payload: Payload
    # How to answer an item of this kind that does not parse; by default an error result
    # on the work item.
    refuse: Refuse | None = None

    def model(self) -> type[Wire]:
        if not isinstance(self.payload, str):
            return self.payload
        module, _, name = self.payload.partition(":")
        found: type[Wire] = getattr(importlib.import_module(module), name)
        return found


class Registry:
    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._warned: set[str] = set()

    def register(self, kind: str, handler: Run, *, payload: Payload,
                 refuse: Refuse | None = None) -> None:
        """Handle work items of ``kind`` with ``handler``, their payload parsed with
        ``payload`` (a model, or ``"module:Name"`` to import it at the first item). A kind
        is registered once."""
        if kind in self._handlers:
            raise ValueError(f"a handler for work of kind '{kind}' is already registered")
        self._handlers[kind] = Handler(kind, handler, payload, refuse)

    def kinds(self) -> list[str]:
        return sorted(self._handlers)

    async def handle(self, raw: dict[str, Any], ctx: Context) -> None:
        """Take one work item; never raises for what the hub sent."""
        from pydantic import BaseModel

        from outpost.protocol import work as wire

        kind = str(raw.get("kind"))
        handler = self._handlers.get(kind)
        try:
            if handler is None:
                raise OutpostError("work_kind_unknown", f"This agent does not handle work of "
                                   f"kind '{kind}'.", kind=kind, item=str(raw.get("id")))
            item = wire.parse_item(raw, handler.model())
        except OutpostError as exc:
            self._warn_once(kind, exc)
            if handler is not None and handler.refuse is not None:
                await handler.refuse(raw, exc, ctx)
            else:
                await answer(ctx, str(raw.get("id")), wire.error_result(exc))
            return
        try:
            result = await handler.run(item, ctx)
        except Exception as exc:  # a handler's bug must not cost the other items
            log.exception("the handler of work of kind '%s' failed on item %s", kind, item.id)
            failed = OutpostError(
                "work_handler_failed", f"The agent's handler for work of kind '{kind}' "
                f"failed: {type(exc).__name__}: {exc}.", kind=kind, item=item.id)
            await answer(ctx, item.id, wire.error_result(failed))
            return
        if result is not None:
            if isinstance(result, BaseModel):
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
async def _ping(item: wire.WorkItem, ctx: Context) -> Result:
    from outpost.protocol import work as wire

    return wire.PingResult(received_at=time.time())


async def _job_control(item: wire.WorkItem, ctx: Context) -> Result:
    from outpost.protocol import work as wire

    asked: wire.JobControlPayload = item.payload
    run = ctx.jobs.get(asked.job_id)
    if run is None or run.attempt != asked.attempt:
        return wire.JobControlResult(applied=False, why="the agent does not run that attempt")
    log.info("job %s: %s requested", run.id, asked.action)
    ctx.spawn(run.control(asked.action), f"control-{run.id}")
    return wire.JobControlResult(applied=True)


async def _job(item: wire.WorkItem, ctx: Context) -> Result:
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


async def _ext_op(item: wire.WorkItem, ctx: Context) -> Result:
    """An extension operation (extensions/ops.py), on a machine whose extensions may not
    have started yet: one that has none answers as it would with them started (E9088)."""
    ctx.start_extensions()
    from .extensions import ops

    return await ops.take_item(item, ctx)


_MODELS = "outpost.protocol.work"
registry = Registry()
register = registry.register
register(kinds.JOB, _job, payload=f"{_MODELS}:JobClaim", refuse=_refuse_job)
register(kinds.PING, _ping, payload=f"{_MODELS}:PingPayload")
register(kinds.JOB_CONTROL, _job_control, payload=f"{_MODELS}:JobControlPayload")
register(kinds.EXT_OP, _ext_op, payload=f"{_MODELS}:ExtOpPayload")
