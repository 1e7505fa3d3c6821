"""Extension operations on the machine: the ``ext_op`` work kind.

The hub hands an operation out as an ``ext_op`` work item (``ExtOpPayload``, read without
pydantic: protocol/extreaders.py). The agent answers the item ``{"accepted": true}`` at
once, and runs the operation in a task of its own: one operation at a time per extension
(the next waits behind it), only with the extension Ready at the version the hub expects
(else E9088). With the manifest's ``pressure: true`` and the machine over the agent's CPU or
memory threshold, it reports ``waiting`` and why, and starts when the load passes, or ends
failed at the operation's deadline (E9091, EX-7). It then reports ``started``, runs the
operation's Command with ``handler.run`` (the extension's user and control group, settings,
protected settings and ``params`` on stdin) and reports the end: the status file's code,
message and ``result``, and the tail of the command's output. A report the hub could not
take is sent again a few times; one whose failure is the network's is marked ``transient``
so that the hub tries the operation again.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from outpost.protocol.errors import OutpostError, entry
from outpost.protocol.extreaders import ExtOpPayload

from .. import work
from . import handler
from .outlog import REDACTED, ExtensionLog, log_dir, secret_values
from .reconcile import Reconciler, StepFailed, Transient, secrets_of

log = logging.getLogger("outpost.agent.extensions.ops")

PRESSURE_LOOK = 1.0  # seconds between looks at the machine's load while waiting
REPORT_TRIES = 5
OUTPUT_LINES = 200


class _Captured(ExtensionLog):
    """The extension's log, keeping the last lines of one command's output too."""

    def __init__(self, base: ExtensionLog) -> None:
        super().__init__(base.path, base.max_bytes, base.secrets)
        self.lines: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES)

    def write(self, handler_name: str, text: str) -> None:
        super().write(handler_name, text)
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        if not text.startswith("--- "):
            self.lines.append(text)


def _coded(key: str, text: str) -> tuple[str, str]:
    return entry(key).code, text


class Operations:
    """Runs the operations the hub hands this machine."""

    def __init__(self, reconciler: Reconciler, call: work.Call,
                 pressure: Callable[[], str | None] = lambda: None) -> None:
        self.reconciler = reconciler
        self.call = call
        self.pressure = pressure
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.running: dict[str, str] = {}  # op id -> extension, for status

    def take(self, asked: ExtOpPayload) -> None:
        task = asyncio.create_task(self._run(asked), name=f"ext-op-{asked.op_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    async def _report(self, op_id: str, what: str, body: dict[str, Any]) -> bool:
        """Send a report; False when the hub says the attempt is over (E9092)."""
        delay = 0.5
        for attempt in range(REPORT_TRIES):
            try:
                await self.call("POST", f"/v1/agent/ext-ops/{quote(op_id, safe='')}/{what}",
                                body)
                return True
            except OutpostError as exc:
                stale = exc.reason == "ext_op_stale_report"
                if stale or attempt == REPORT_TRIES - 1:
                    log.warning("operation %s: the hub did not take its %s: %s", op_id, what,
                                exc.message)
                    return not stale
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        return True

    async def _progress(self, asked: ExtOpPayload, state: str, message: str = "") -> bool:
        return await self._report(asked.op_id, "progress", {
            "attempt": asked.attempt, "state": state, "message": message, "at": time.time()})

    async def _end(self, asked: ExtOpPayload, ok: bool, code: str | None = None,
                   message: str = "", output: str = "", result: dict[str, Any] | None = None,
                   transient: bool = False) -> None:
        await self._report(asked.op_id, "end", {
            "attempt": asked.attempt, "status": "succeeded" if ok else "failed", "code": code,
            "message": message[:4000], "output": output[-64 * 1024:], "result": result or {},
            "transient": transient, "at": time.time()})

    async def _run(self, asked: ExtOpPayload) -> None:
        lock = self._locks.setdefault(asked.extension, asyncio.Lock())
        async with lock:
            self.running[asked.op_id] = asked.extension
            try:
                await self._one(asked)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must still end the operation
                log.exception("operation %s failed", asked.op_id)
                await self._end(asked, False, entry("ext_op_failed").code,
                                f"the agent failed running it: {type(exc).__name__}: {exc}")
            finally:
                self.running.pop(asked.op_id, None)

    async def wait_for_load(self, asked: ExtOpPayload) -> str | None:
        """While the machine is over its CPU or memory threshold, report ``waiting`` and
        why (again when the reason changes). Once it is not: what the operation's record
        should say of the wait ("" when there was none); None (the operation ended failed,
        E9091) when its deadline passes first (EX-7)."""
        why = self.pressure()
        first, began = why, time.monotonic()
        reported: str | None = None
        while why is not None:
            if asked.deadline is not None and time.time() >= asked.deadline:
                await self._end(asked, False, *_coded(
                    "ext_op_pressure", f"the operation did not start by its deadline: "
                    f"waiting: {why}"))
                return None
            if why != reported:
                await self._progress(asked, "waiting", f"waiting: {why}")
                reported = why
            await asyncio.sleep(PRESSURE_LOOK)
            why = self.pressure()
        if first is None:
            return ""
        return (f"started after waiting {time.monotonic() - began:.0f} s for the machine's "
                f"load to pass ({first})")

    async def _one(self, asked: ExtOpPayload) -> None:
        rec = self.reconciler.store.records.get(asked.extension)
        goal = self.reconciler.goals.get(asked.extension)
        name, operation = asked.extension, asked.operation
        if rec is None or rec.state != "Ready" or rec.version is None or (
                asked.version is not None and rec.version != asked.version):
            state = rec.state if rec is not None else "NotInstalled"
            have = f" at {rec.version}" if rec is not None and rec.version else ""
            want = f" (the hub expects {asked.version})" if asked.version else ""
            await self._end(asked, False, *_coded(
                "ext_op_not_ready", f"extension {name} is {state}{have} on this machine"
                f"{want}; the operation runs only once it is Ready"))
            return
        version = rec.version
        try:
            manifest = self.reconciler.manifest(name, version)
        except (OSError, ValueError) as exc:
            await self._end(asked, False, *_coded(
                "ext_op_not_ready", f"the files of {name} {version} are missing or damaged "
                f"({exc})"))
            return
        op = manifest.operations.get(operation)
        if op is None:
            await self._end(asked, False, *_coded(
                "ext_op_unknown_operation", f"extension {name} {version} has no operation "
                f"'{operation}'"))
            return
        waited = await self.wait_for_load(asked) if op.pressure else ""
        if waited is None:
            return
        if not await self._progress(asked, "started", waited):
            log.info("operation %s of %s: the hub ended this attempt (timed out or retried); "
                     "not run", asked.op_id, name)
            return
        rc = self.reconciler
        try:
            identity, _said = rc.runtime.identity(goal.run_as if goal else rec.run_as)
            rc.runtime.prepare(name, identity)
            settings = goal.settings if goal is not None else {}
            protected = rc._protected(goal, "enable")
        except StepFailed as exc:
            await self._end(asked, False, entry("ext_op_failed").code, exc.message)
            return
        except OutpostError as exc:
            await self._end(asked, False, exc.code, exc.message)
            return
        try:  # the machine's credentials the manifest asks for, on stdin only
            async with rc._credential_lock:
                credentials = await rc._credentials(rec, manifest, "enable", rec.state, version)
        except (StepFailed, Transient) as exc:
            code, message = _coded("ext_op_failed", str(exc))
            await self._end(asked, False, code, message, transient=True)
            return
        try:
            await self._run_command(asked, rec, manifest, op, version, identity, settings,
                                    protected, credentials, waited)
        finally:
            rc.release_credentials(manifest)

    async def _run_command(self, asked: ExtOpPayload, rec: Any, manifest: Any, op: Any,
                           version: str, identity: Any, settings: dict[str, Any],
                           protected: Any, credentials: dict[str, Any],
                           waited: str = "") -> None:
        rc = self.reconciler
        name, operation = asked.extension, asked.operation
        group = rc.runtime.group(name)
        output = _Captured(ExtensionLog(log_dir(rc.runtime.state_root) / f"{name}.log",
                                        rc.log_max_bytes,
                                        secret_values([protected or {},
                                                       secrets_of(credentials)])))
        spec = handler.Spec(
            name=name, version=version, handler=operation,
            seq=int(time.time() * 1000), command=op,
            package_dir=rc.runtime.package_dir(name, version),
            config_dir=rc.runtime.config_dir(name), status_dir=rc.runtime.status_dir(name),
            log_dir=rc.runtime.log_dir(name), data_dir=rc.runtime.data_dir(name),
            output=output, settings=settings,
            protected=protected, identity=identity, group=group,
            limits=rc.runtime.limits(manifest.limits) if group is not None else None,
            extra_env={"OUTPOST_EXT_OPERATION": operation, "OUTPOST_EXT_OP_ID": asked.op_id},
            params=asked.params, credentials=credentials)
        outcome = await handler.run(spec)
        tail = "\n".join(output.lines)
        result = outcome.status.result if outcome.status is not None else None
        if outcome.ok:
            said = f"{outcome.message} ({waited})" if outcome.message and waited else \
                outcome.message or waited
            await self._end(asked, True, None, said, tail, result)
            return
        if outcome.result == "timeout":
            code, message = _coded("ext_op_hung", outcome.message)
        elif outcome.status is not None and outcome.code:
            code, message = str(outcome.code), outcome.message
        else:
            code, message = _coded("ext_op_failed", outcome.message)
        transient = outcome.status is not None and outcome.status.transient
        await self._end(asked, False, code, message, tail, result, transient)


_attached: dict[int, Operations] = {}


def attach(state: Any, operations: Operations) -> None:
    """The daemon's operations runner, found by the work kind through its state dir."""
    _attached[id(state)] = operations


def detach(state: Any) -> None:
    _attached.pop(id(state), None)


async def take_item(item: work.Item, ctx: work.Context) -> work.Result:
    """The ``ext_op`` work kind (registered in work.py): hand the operation to the daemon's
    runner, which answers it on its own routes."""
    asked: ExtOpPayload = item.payload
    runner = _attached.get(id(ctx.state))
    if runner is None:
        return work.error_result(OutpostError(
            "ext_op_not_ready", "This agent runs no extensions (they did not start).",
            name=asked.extension))
    runner.take(asked)
    return {"accepted": True}

