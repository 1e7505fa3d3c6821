"""Running one command of an installed extension: a handler (install, enable, ...) now, an
operation (snapshot, restore) next. ``run(spec)`` starts the command in its own process
group, as the extension's user and inside its control group, with the settings on stdin,
waits for it within its timeout, and returns an ``Outcome`` read from its exit status and
its status file.

What the command sees: the package's directory as its working directory; an environment of
``PATH`` (a minimal one), the ``OUTPOST_EXT_*`` variables and ``OUTPOST_AGENT_PYTHON`` (the
agent's own interpreter, which has the ``outpost`` package) only (the agent's own
environment, its proxy settings and tokens included, never reaches it); on stdin one JSON
object ``{"settings": {...}, "protected": {...}}``, the protected settings decrypted in
memory only, and ``"credentials": {"backup": {...}}`` when the manifest asks for them.
It reports through ``$OUTPOST_EXT_STATUS_DIR/<seq>.status`` (``HandlerStatusFile``, read
without pydantic: protocol/extreaders.py): missing is ``transitioning``, malformed is an error
naming the file and why. A command that exits 0 while its status says ``transitioning`` (work
it left running) is waited for until its status file says how it ended or its timeout passes.

On timeout the whole process group is ended (SIGTERM, then SIGKILL) and what is left in the
extension's control group too; the outcome says the command hung for N s (EX-5).
Cancelling ``run`` (an uninstall of an extension whose install hangs) ends the group the
same way before the cancellation goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from outpost.protocol.extreaders import Command, HandlerStatusFile, read_lax

from .. import cgroups
from .. import procgroup
from ..procgroup import ProcessGroup
from .outlog import ExtensionLog

log = logging.getLogger("outpost.agent.extensions")

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STOP_GRACE = 3.0  # seconds between SIGTERM and SIGKILL for a command past its timeout
STATUS_POLL = 0.1  # seconds between looks at the status file of a command that went on
OUTPUT_DRAIN = 2.0  # seconds to read what is left in the output pipe after the group ends

# Output of processes that commands left running, read until they close it (close_all).
_lingering: set[asyncio.Task[None]] = set()
# The commands running now: pid -> what it is, for 'outpost agent status'.
running: dict[int, str] = {}

Result = Literal["success", "warning", "error", "transitioning", "timeout", "cancelled"]


@dataclass
class Spec:
    """One command to run for one extension."""

    name: str
    version: str
    handler: str  # install, enable, ... or an operation's name
    seq: int
    command: Command
    package_dir: Path
    config_dir: Path
    status_dir: Path
    log_dir: Path
    output: ExtensionLog
    settings: dict[str, Any] = field(default_factory=dict)
    protected: dict[str, Any] | None = None
    identity: tuple[int, int] | None = None  # (uid, gid); None: the agent's own user
    group: cgroups.Group | None = None
    limits: cgroups.Limits | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    data_dir: Path | None = None  # kept between commands (OUTPOST_EXT_DATA_DIR)
    # Per-machine credentials the manifest asks for ({"backup": {...}}): on stdin only.
    credentials: dict[str, Any] = field(default_factory=dict, repr=False)
    params: dict[str, Any] | None = None  # an operation's parameters, on stdin as "params"

    @property
    def status_file(self) -> Path:
        return self.status_dir / f"{self.seq}.status"


@dataclass
class Outcome:
    result: Result
    message: str
    code: int | None = None  # the handler's own code, from its status file
    exit_code: int | None = None  # negative: the signal that ended it
    seconds: float = 0.0
    status: HandlerStatusFile | None = None

    @property
    def ok(self) -> bool:
        return self.result in ("success", "warning")


def environment(spec: Spec) -> dict[str, str]:
    env = {"PATH": SAFE_PATH, "OUTPOST_EXT_NAME": spec.name,
           "OUTPOST_EXT_VERSION": spec.version, "OUTPOST_EXT_HANDLER": spec.handler,
           "OUTPOST_EXT_SEQ": str(spec.seq), "OUTPOST_EXT_CONFIG_DIR": str(spec.config_dir),
           "OUTPOST_EXT_STATUS_DIR": str(spec.status_dir),
           "OUTPOST_EXT_LOG_DIR": str(spec.log_dir),
           "OUTPOST_AGENT_PYTHON": sys.executable}
    if spec.data_dir is not None:
        env["OUTPOST_EXT_DATA_DIR"] = str(spec.data_dir)
    env.update(spec.extra_env)
    return env


def read_status(path: Path) -> tuple[HandlerStatusFile | None, str | None]:
    """(the status, None), (None, None) when there is none yet, or (None, why) when the
    file is malformed (the why names the file)."""
    try:
        # Not through a link: the directory is the extension user's, the reader root.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as fh:
            raw = fh.read(64 * 1024)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"{path} cannot be read ({exc.strerror or exc})"
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"{path} is not JSON ({exc})"
    try:
        return read_lax(HandlerStatusFile.read, "HandlerStatusFile", data), None
    except ValueError as exc:  # pydantic's ValidationError: read_lax loaded it to get here
        errors = getattr(exc, "errors", None)
        first = errors()[0] if errors is not None else {"loc": (), "msg": str(exc)}
        where = ".".join(str(p) for p in first["loc"]) or "(the file)"
        return None, (f"{path} is not a status file: {where}: {first['msg']} (write "
                      '{"status": "success"|"warning"|"error"|"transitioning", '
                      '"code": N, "message": "..."})')


def _stdin_payload(spec: Spec) -> bytes:
    payload: dict[str, Any] = {"settings": spec.settings, "protected": spec.protected or {}}
    if spec.credentials:
        payload["credentials"] = spec.credentials
    if spec.params is not None:
        payload["params"] = spec.params
    return json.dumps(payload).encode()


def _preexec(spec: Spec) -> Callable[[], None] | None:
    """In the child, before exec: join the extension's control group."""
    if spec.group is None:
        return None
    if spec.limits is not None:
        spec.group.apply(spec.limits)
    fds = spec.group.open_procs()
    return lambda: cgroups.join(fds)


async def _feed(proc: asyncio.subprocess.Process, data: bytes) -> None:
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        proc.stdin.write(data)
        await proc.stdin.drain()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        proc.stdin.close()


class _Leader:
    """The command's process as its ProcessGroup's leader. asyncio's ``Process.wait``
    returns only once the output pipes are closed too, which a process the command left
    running may never do: the exit is seen in ``returncode`` (set when the child watcher
    reaps it) instead."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid = proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    async def wait(self) -> int:
        delay = procgroup.POLL_MIN
        while self.proc.returncode is None:
            await asyncio.sleep(delay)
            delay = min(delay * 2, procgroup.POLL_MAX)
        return self.proc.returncode


async def _copy(proc: asyncio.subprocess.Process, spec: Spec) -> None:
    """The command's output into the extension's log, until every process holding it is
    gone (``proc`` is kept by this task: the pipes close when it is collected)."""
    stream = proc.stdout
    assert stream is not None
    try:
        while True:
            line = await stream.readline()
            if not line:
                return
            spec.output.write(spec.handler, line.decode("utf-8", "replace").rstrip("\n"))
    finally:
        # Closed here, in the event loop, rather than whenever the collector gets to it;
        # only once the exit is known: before, closing would reap the process itself
        # (Popen.poll) under the child watcher, which would then report it as 255.
        transport = getattr(proc, "_transport", None)
        if transport is not None and proc.returncode is not None:
            transport.close()


async def run(spec: Spec) -> Outcome:
    """Run ``spec``'s command to its end (see the module docstring)."""
    spec.status_dir.mkdir(parents=True, exist_ok=True)
    spec.status_file.unlink(missing_ok=True)  # an earlier command's status is not this one's
    argv = [str(spec.package_dir / spec.command.run), *spec.command.args]
    timeout = spec.command.timeout_seconds
    started = time.monotonic()
    spec.output.write(spec.handler, f"--- {spec.handler} of {spec.name} {spec.version} "
                      f"(settings {spec.seq}) starts")
    # The start is shielded from cancellation: cancelled while asyncio still connects its
    # pipes, it would kill the leader alone and then wait for the pipes to close, which a
    # child of the command holds open for as long as it runs.
    starting = asyncio.ensure_future(asyncio.create_subprocess_exec(
        *argv, cwd=spec.package_dir, env=environment(spec),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        user=spec.identity[0] if spec.identity else None,
        group=spec.identity[1] if spec.identity else None,
        extra_groups=[] if spec.identity else None, preexec_fn=_preexec(spec)))
    try:
        proc = await asyncio.shield(starting)
    except asyncio.CancelledError:
        with contextlib.suppress(OSError):
            await _end(spec, ProcessGroup(_Leader(await starting)))
        raise
    except OSError as exc:
        message = (f"the {spec.handler} command {spec.command.run} of {spec.name} "
                   f"{spec.version} could not be started: {exc.strerror or exc}")
        spec.output.write(spec.handler, f"--- {message}")
        return Outcome("error", message)
    group = ProcessGroup(_Leader(proc))
    running[proc.pid] = f"extension {spec.name} {spec.version}: {spec.handler}"
    feeder = asyncio.create_task(_feed(proc, _stdin_payload(spec)), name="ext-stdin")
    copier = asyncio.create_task(_copy(proc, spec), name="ext-output")
    try:
        outcome = await _wait(spec, group, started, timeout)
    except asyncio.CancelledError:
        await _end(spec, group)
        spec.output.write(spec.handler, "--- ended: the agent cancelled it")
        raise
    finally:
        running.pop(proc.pid, None)
        feeder.cancel()
        # What is left in the pipe: read for a moment, a shorter one when processes of the
        # command's group are still there (they may hold it for as long as they run).
        drain = OUTPUT_DRAIN if group.returncode is None or not group.members() else 0.2
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(asyncio.shield(copier), drain)
        if not copier.done():
            # A process the command left running (a service an enable started) still holds
            # its output: read on, so that it does not die of a closed pipe when it writes.
            _lingering.add(copier)
            copier.add_done_callback(_lingering.discard)
    outcome.seconds = round(time.monotonic() - started, 3)
    spec.output.write(spec.handler, f"--- {outcome.result}: {outcome.message}"
                      if outcome.message else f"--- {outcome.result}")
    return outcome


async def close_all() -> None:
    """At the agent's stop: stop reading what commands' leftover processes print (their
    pipes close with the agent in any case)."""
    tasks = list(_lingering)
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=5)


async def _end(spec: Spec, group: ProcessGroup) -> None:
    """End the command's process group, and whatever else runs in the extension's group."""
    await group.stop(STOP_GRACE)
    if spec.group is not None:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(spec.group.empty)


async def _wait(spec: Spec, group: ProcessGroup, started: float, timeout: float) -> Outcome:
    deadline = started + timeout
    try:
        exit_code = await asyncio.wait_for(group.wait(), timeout)
    except TimeoutError:
        await _end(spec, group)
        return _hung(spec, timeout, "it was still running")
    status, malformed = read_status(spec.status_file)
    if malformed:
        return Outcome("error", malformed, exit_code=exit_code)
    if exit_code != 0:
        said = f": {status.message}" if status and status.message else ""
        code = status.code if status else None
        return Outcome("error", f"the {spec.handler} command exited with {_exit_text(exit_code)}"
                       + (said if said else " without a status file" if status is None
                          else ""), code=code, exit_code=exit_code, status=status)
    # Exited 0: the status file says how it went; missing or 'transitioning' is work it left
    # running, waited for until its timeout.
    while status is None or status.status == "transitioning":
        if time.monotonic() >= deadline:
            await _end(spec, group)
            why = "its status file still said 'transitioning'" if status else \
                f"it wrote no status file ({spec.status_file})"
            return _hung(spec, timeout, why, exit_code)
        await asyncio.sleep(STATUS_POLL)
        status, malformed = read_status(spec.status_file)
        if malformed:
            return Outcome("error", malformed, exit_code=exit_code)
    return Outcome(status.status, status.message, code=status.code, exit_code=exit_code,
                   status=status)


def _hung(spec: Spec, timeout: float, why: str, exit_code: int | None = None) -> Outcome:
    return Outcome("timeout", f"the {spec.handler} handler hung: {why} after {timeout:g} s "
                   f"(its timeout_seconds), so its process group was killed",
                   exit_code=exit_code)


def _exit_text(code: int) -> str:
    if code < 0:
        return f"signal {-code}"
    return f"code {code}"

