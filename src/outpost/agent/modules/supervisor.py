"""The module supervisor: makes the machine's module processes match a deployment.

``Supervisor.apply(doc)`` starts, stops, restarts and removes modules so that each runs as
its ``ModuleSpec`` says; one task per module (``_life``) carries it through its states
(``protocol.modules.ModuleState``):

- **start**: the package is downloaded and unpacked once per version (``extpackage``,
  checked against the manifest's digest), or the command on the machine is used; each of
  ``ports`` must be free (ED-5); a root agent runs the program as ``outpost-mod`` (or
  ``run_as``) in a new session, in the control group ``mod-NAME`` with the manifest's limits
  (the extension runtime's helpers, runtime.py), and with ``dns`` in a mount namespace of its
  own where ``/etc/resolv.conf`` names those servers (ED-11). Its stdout and stderr go to
  ``<state>/logs/modules/NAME.log`` (opened by the agent; copied to ``NAME.log.1`` and
  emptied past its size, so the module keeps writing while the agent is away).
- **watch**: the process's pidfd is readable the moment it ends, so a kill -9 is acted on
  at once; a probe (health.py) runs beside it.
- **restart**: by ``restart_policy`` and the backoff schedule (backoff.py): ``backoff`` with
  ``next_try_at`` while waiting, ``failed`` once ``max_restarts`` are used up.
- **order**: a module starts once every module of a lower ``order`` that should run is
  running (and healthy, when it has a probe), or failed (which would otherwise hold the
  rest back for ever).

**Adoption.** The agent stopping does not stop its modules. Each module's pid, process start
time (``/proc/PID/stat`` field 22, so a reused pid is not mistaken for it) and spec hash are
kept in ``<state>/modules/supervisor.json`` (checksummed), with the deployment last applied;
a new Supervisor (``start``) applies that deployment again and adopts every module still
alive with the same spec, watching it by its pidfd. What it cannot know of an adopted
module: its exit status (it is not the agent's child; reported as None) and what it did
while no agent watched.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from outpost.protocol.errors import OutpostError
from outpost.protocol.readers import ReadError
from outpost.protocol.modreaders import (
    MODULE_MANIFEST_NAME,
    DeploymentDoc,
    DeploymentManifest,
    MessageCounters,
    ModulePackageManifest,
    ModulesReport,
    ModuleSpec,
    ModuleStatus,
    wire,
)
from outpost.protocol.routes import Route, compile_all

from .. import cgroups
from ..extensions.runtime import Runtime
from ..jobusers import _useradd
from ..state import CorruptFile, read_checked, write_checked
from . import health, procs
from .backoff import Schedule
from .channel import ModuleChannel, package_refused

if TYPE_CHECKING:
    from outpost.protocol.modules import ModuleState

log = logging.getLogger("outpost.agent.modules")

MODULE_USER = "outpost-mod"
TREE = "modules"  # <state>/modules/ (state file; the packages too when not root)
STATE_FILE = "supervisor.json"
LOG_MAX_BYTES = 4 * 1024 * 1024
ROTATE_EVERY = 2.0  # seconds between looks at a running module's log size
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

ChangeHook = Callable[[DeploymentManifest, dict[str, Route]], None]


def _make_user(name: str) -> None:
    _useradd(name, "Outpost edge modules")


def spec_hash(spec: ModuleSpec) -> str:
    body = json.dumps(wire(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _ended(code: int | None) -> str:
    """How a module's process ended, for its reason: ``it was killed by SIGKILL (exit
    137)`` names the signal behind an exit code past 128."""
    if code is None:
        return "it exited with an unknown status (adopted)"
    if code > 128:
        with contextlib.suppress(ValueError):
            return f"it was killed by {signal.Signals(code - 128).name} (exit {code})"
    return f"it exited with {code}"


_DONE: Any = object()  # the task of a module that is not to run


class StartRefused(Exception):
    """A start that must not be tried again before the next deployment (no backoff)."""

    def __init__(self, error: OutpostError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass
class _Module:
    name: str
    spec: ModuleSpec
    hash: str
    schedule: Schedule
    state: ModuleState = "starting"
    version: str | None = None
    pid: int | None = None
    start_time: int | None = None
    exit_code: int | None = None
    last_start_at: float | None = None
    last_exit_at: float | None = None
    next_try_at: float | None = None
    healthy: bool | None = None
    reason: str | None = None
    code: str | None = None
    adopted: bool = False
    proc: subprocess.Popen[bytes] | None = None
    pidfd: int | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    unhealthy_restart: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    started_mono: float = 0.0

    def status(self) -> ModuleStatus:
        return ModuleStatus(
            name=self.name, state=self.state, desired=self.spec.status, pid=self.pid,
            exit_code=self.exit_code, restart_count=self.schedule.restarts,
            last_start_at=self.last_start_at, last_exit_at=self.last_exit_at,
            next_try_at=self.next_try_at, healthy=self.healthy, version=self.version,
            reason=self.reason, code=self.code)


class Supervisor:
    def __init__(self, state_root: Path, channel: ModuleChannel,
                 socket_path: Path | None = None, *,
                 hierarchy: cgroups.Hierarchy | None = None,
                 defaults: cgroups.Limits | None = None,
                 make_user: Callable[[str], None] = _make_user,
                 module_user: str = MODULE_USER, log_max_bytes: int = LOG_MAX_BYTES,
                 clock: Callable[[], float] = time.time, root: Path | None = None) -> None:
        self.state_root = state_root
        self.channel = channel
        self.socket_path = socket_path
        self.runtime = Runtime(state_root, defaults or cgroups.Limits(), hierarchy,
                               root=root, make_user=make_user, ext_user=module_user,
                               tree=TREE, group_prefix="mod-")
        self.state_path = state_root / TREE / STATE_FILE
        self.log_dir = state_root / "logs" / "modules"
        self.log_max_bytes = log_max_bytes
        self.clock = clock
        self.doc: DeploymentDoc | None = None
        self.error: str | None = None
        self.on_change: list[ChangeHook] = []
        self.on_state: list[Callable[[], None]] = []
        self._modules: dict[str, _Module] = {}
        self._records: dict[str, dict[str, Any]] = {}
        self._changed = asyncio.Event()

    # --- public ----------------------------------------------------------------------
    async def start(self) -> None:
        """Apply the deployment last applied (from the state file), adopting the modules
        that still run."""
        try:
            saved = read_checked(self.state_path)
        except FileNotFoundError:
            return
        except CorruptFile as exc:
            log.warning("modules: the supervisor's state is unreadable (%s); modules that "
                        "still run will be started again", exc)
            return
        self._records = dict(saved.get("modules") or {})
        doc = saved.get("doc")
        if doc:
            try:
                found = DeploymentDoc.read(doc)
            except ReadError as exc:  # written by an agent of another version
                log.warning("modules: the deployment in the supervisor's state is unreadable "
                            "(%s); it is fetched again", exc)
                return
            await self.apply(found)

    def statuses(self) -> list[ModuleStatus]:
        return [m.status() for m in self._modules.values()]

    def report(self, counters: MessageCounters | None = None) -> ModulesReport:
        doc = self.doc
        extra = {"messages": counters} if counters is not None else {}
        return ModulesReport(deployment=doc.deployment if doc else None,
                             version=doc.version if doc else 0, etag=doc.etag if doc else "",
                             reported_at=self.clock(), modules=self.statuses(),
                             error=self.error, **extra)

    @property
    def module_socket(self) -> Path:
        """Where modules reach the local message hub (``OUTPOST_MODULE_SOCKET``): the
        constructor's, else ``msghub.sock`` in the modules' tree (which their user can
        pass through; the state directory is the agent's alone)."""
        if self.socket_path is None:
            self.socket_path = self.runtime.root / "msghub.sock"
        return self.socket_path

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    async def apply(self, doc: DeploymentDoc) -> None:
        """Make the modules match ``doc``: a module whose spec is unchanged and that runs
        is left alone; a failed one starts afresh (a new deployment clears ``failed``)."""
        manifest = doc.manifest or DeploymentManifest()
        fresh = self.doc is None or doc.etag != self.doc.etag
        self.doc = doc
        self.error = None
        for name in [n for n in self._modules if n not in manifest.modules]:
            await self._remove(name)
        for name, spec in manifest.modules.items():
            digest = spec_hash(spec)
            current = self._modules.get(name)
            if current is not None and current.hash == digest and not (
                    fresh and current.state == "failed"):
                continue
            if current is not None:
                await self._cancel(current)
                await self._stop_process(current)
            module = _Module(name, spec, digest, Schedule.of(spec.backoff))
            self._modules[name] = module
            if spec.status == "stopped":
                module.state = "stopped"
                module.task = _DONE  # nothing to run (the process was stopped above)
                continue
            self._adopt(module)
        for module in self._modules.values():
            if module.task is None:
                module.task = asyncio.create_task(self._life(module), name=f"mod-{module.name}")
        self._save()
        self._notify()
        try:
            routes = compile_all(manifest.route_texts(), manifest.modules)
        except ValueError as exc:  # the hub checked it: only a hub of another version
            self.error = f"the routes do not compile: {exc}"
            routes = {}
        for hook in self.on_change:
            try:
                hook(manifest, routes)
            except Exception:
                log.exception("modules: a deployment hook failed")

    async def restart(self, name: str) -> None:
        """``outpost agent restart MODULE``: stop it and start it afresh (its count too)."""
        module = self._modules.get(name)
        if module is None:
            raise OutpostError("module_unknown", f"This machine runs no module named "
                               f"'{name}'.", module=name)
        if module.spec.status == "stopped":
            return  # the deployment wants it stopped: it stays so
        await self._cancel(module)
        await self._stop_process(module)
        module.schedule.reset()
        module.state, module.reason, module.code = "starting", None, None
        module.task = asyncio.create_task(self._life(module), name=f"mod-{name}")
        self._notify()

    async def close(self) -> None:
        """The agent stops: the watching stops; the modules keep running (adopted by the
        next agent)."""
        for module in self._modules.values():
            await self._cancel(module)
            self._unwatch(module)
            if module.proc is not None and module.proc.returncode is None:
                # Let go of the child: its Popen must not warn that it still runs, nor
                # reap it later (the next agent watches it by its pidfd).
                module.proc.returncode = 0
                module.proc = None
        self._save()
        self.runtime.close()

    async def stop_all(self) -> None:
        """Stop and forget every module (a machine leaving, and tests)."""
        for name in list(self._modules):
            await self._remove(name)
        self._save()

    def owner_of(self, pid: int) -> str | None:
        """The module ``pid`` belongs to (its process or a descendant), or None. Trusts only
        what a process cannot claim for itself: its session and process group (inherited;
        a module's leader starts both), its control group (moving needs the agent's rights),
        and its parents, each checked against a leader that still is the module's (its
        start time), never a name a process gives itself."""
        leaders = {m.pid: m for m in self._modules.values()
                   if m.pid is not None and m.start_time is not None}
        live = {p: m for p, m in leaders.items() if procs.alive(p, m.start_time)}
        stat = procs.proc_stat(pid)
        if stat is None:
            return None
        if pid in live:
            return live[pid].name
        for candidate in (stat[2], stat[1]):
            if candidate in live:
                return live[candidate].name
        found = procs.cgroup_owner(pid, self.runtime.hierarchy, self.runtime.group_prefix,
                                   self._modules)
        if found is not None:
            return found
        current, seen = stat[0], 0
        while current > 1 and seen < 256:
            if current in live:
                return live[current].name
            parent = procs.proc_stat(current)
            if parent is None:
                return None
            current, seen = parent[0], seen + 1
        return None

    # --- one module's life ---------------------------------------------------------------
    def _adopt(self, module: _Module) -> None:
        record = self._records.get(module.name)
        if not record or record.get("hash") != module.hash:
            return
        pid, start_time = record.get("pid"), record.get("start_time")
        if not isinstance(pid, int) or not procs.alive(pid, start_time):
            return
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return
        module.pid, module.start_time, module.adopted = pid, start_time, True
        module.version = record.get("version")
        module.last_start_at = record.get("started_at")
        module.schedule.restarts = int(record.get("restarts") or 0)
        module.state = "running" if module.spec.health is None else "starting"
        module.started_mono = time.monotonic() - max(
            0.0, self.clock() - (module.last_start_at or self.clock()))
        self._watch(module, pidfd)
        log.info("modules: adopted %s (pid %d)", module.name, pid)

    async def _life(self, m: _Module) -> None:
        spec = m.spec
        if m.pid is None:
            await self._gate(m)
        while True:
            if m.pid is None:
                try:
                    await self._start(m)
                except StartRefused as exc:
                    self._set(m, "failed", exc.error.message, exc.error.code)
                    return
                except OutpostError as exc:
                    if not await self._wait_backoff(m, 0.0, exc.message, exc.code):
                        return
                    continue
            ended_by_probe = await self._watch_run(m)
            ran_for = time.monotonic() - m.started_mono
            code = m.exit_code
            self._after_exit(m)
            if ended_by_probe:
                why, code_name = m.reason or "its health probe failed", m.code
            else:
                why, code_name = _ended(code), None
                policy = spec.restart_policy
                if policy == "never" or (policy in ("on-failure", "on-unhealthy")
                                         and code == 0):
                    self._set(m, "stopped" if code == 0 else "failed",
                              f"{why}; restart policy {policy}", None)
                    return
            if not await self._wait_backoff(m, ran_for, why, code_name):
                return

    async def _wait_backoff(self, m: _Module, ran_for: float, why: str,
                            code: str | None) -> bool:
        wait = m.schedule.next_wait(ran_for)
        if wait is None:
            count = m.schedule.max_restarts + 1
            err = OutpostError("module_restarts_exhausted", f"The module {m.name} ended "
                               f"{count} times in a row (last: {why}); it is failed until the "
                               f"next deployment or 'outpost agent restart {m.name}'.")
            self._set(m, "failed", err.message, code or err.code)
            return False
        m.next_try_at = self.clock() + wait
        self._set(m, "backoff", why, code)
        self._save()
        await asyncio.sleep(wait)
        m.next_try_at = None
        return True

    def _ready(self, other: _Module) -> bool:
        if other.state == "failed" or other.spec.status == "stopped":
            return True
        if other.state not in ("running", "unhealthy"):
            return False
        return other.spec.health is None or other.healthy is True

    async def _gate(self, m: _Module) -> None:
        while True:
            waiting = [o.name for o in self._modules.values()
                       if o.spec.order < m.spec.order and not self._ready(o)]
            if not waiting:
                return
            self._set(m, "starting", "waiting for the modules of a lower order: "
                      + ", ".join(sorted(waiting)), None)
            await self._changed.wait()

    async def _start(self, m: _Module) -> None:
        self._set(m, "starting", None, None)
        argv, cwd, version = await self._program(m)
        procs.check_ports(m.name, m.spec.ports)
        if m.spec.dns and os.geteuid() != 0:
            raise StartRefused(OutpostError(
                "module_dns_unprivileged", f"The module {m.name} names DNS servers, which an "
                "agent that does not run as root cannot give it.", module=m.name))
        identity = self._identity(m)
        group = self.runtime.group(m.name)
        if group is not None:
            group.apply(self.runtime.limits(m.spec.limits))
        home = self.runtime.home(m.name)
        data = home / "data"
        data.mkdir(mode=0o700, exist_ok=True)
        if identity is not None:
            os.chown(data, *identity)
        resolv = self._resolv(m, home) if m.spec.dns else None
        env = self._env(m, data)
        preexec = procs.preexec(group, identity, resolv)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        logfd = os.open(self.log_path(m.name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            os.write(logfd, f"--- {stamp} outpost: starting {m.name}"
                     f"{' ' + version if version else ''}: {' '.join(argv)}\n".encode())
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                    stdout=logfd, stderr=logfd, start_new_session=True,
                                    close_fds=True, preexec_fn=preexec)
        except OSError as exc:
            # Name the file (the program, or an interpreter its #! line names) that the
            # module's user could not run or find.
            where = f" ({exc.filename})" if exc.filename else ""
            raise OutpostError("module_start_failed", f"The module {m.name} could not be "
                               f"started: {exc.strerror or exc}{where}.", module=m.name,
                               path=exc.filename) from None
        except subprocess.SubprocessError as exc:
            raise OutpostError("module_start_failed", f"The module {m.name} could not be "
                               f"started: {exc}.", module=m.name) from None
        finally:
            os.close(logfd)
        stat = procs.proc_stat(proc.pid)
        m.proc, m.pid, m.adopted = proc, proc.pid, False
        m.start_time = stat[3] if stat else None
        m.version = version
        m.exit_code, m.healthy = None, None
        m.last_start_at = self.clock()
        m.started_mono = time.monotonic()
        self._watch(m, os.pidfd_open(proc.pid))
        self._set(m, "running" if m.spec.health is None else "starting", None, None)
        self._save()

    async def _watch_run(self, m: _Module) -> bool:
        """Until the process ends (False) or the probe asks for a restart (True)."""
        m.unhealthy_restart.clear()
        prober = (asyncio.create_task(self._probe_loop(m), name=f"probe-{m.name}")
                  if m.spec.health is not None else None)
        try:
            while not m.exited.is_set():
                waits = [asyncio.ensure_future(m.exited.wait()),
                         asyncio.ensure_future(m.unhealthy_restart.wait())]
                done, pending = await asyncio.wait(waits, timeout=ROTATE_EVERY,
                                                   return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
                self._rotate(m.name)
                if m.unhealthy_restart.is_set() and not m.exited.is_set():
                    await self._stop_process(m, keep_state=True)
                    return True
            return False
        finally:
            if prober is not None:
                prober.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await prober

    async def _probe_loop(self, m: _Module) -> None:
        spec = m.spec.health
        assert spec is not None
        identity = self._identity(m)
        group = self.runtime.group(m.name)
        env = self._env(m, self.runtime.home(m.name) / "data")
        failures = 0
        while True:
            await asyncio.sleep(spec.interval_seconds)
            ok, why = await health.probe(spec, env, procs.preexec(group, identity, None))
            if ok:
                failures = 0
                was, m.healthy = m.healthy, True
                if m.state in ("starting", "unhealthy"):
                    self._set(m, "running", None, None)
                elif was is not True:
                    self._notify()
                continue
            if time.monotonic() - m.started_mono < spec.start_period_seconds:
                continue
            failures += 1
            if failures < spec.failures:
                continue
            m.healthy = False
            err = OutpostError("module_unhealthy", f"The module {m.name} failed its health "
                               f"probe {spec.failures} times in a row: {why}.", module=m.name)
            self._set(m, "unhealthy", err.message, err.code)
            if m.spec.restart_policy == "on-unhealthy":
                m.unhealthy_restart.set()
                return

    # --- processes -----------------------------------------------------------------------
    def _watch(self, m: _Module, pidfd: int) -> None:
        m.exited = asyncio.Event()
        m.pidfd = pidfd
        loop = asyncio.get_running_loop()

        def ended() -> None:
            self._unwatch(m)
            if m.proc is not None:
                code = m.proc.poll()
                m.exit_code = procs.exit_code(code) if code is not None else None
            else:
                m.exit_code = None  # adopted: not the agent's child, its status is not known
            m.last_exit_at = self.clock()
            m.exited.set()

        loop.add_reader(pidfd, ended)

    def _unwatch(self, m: _Module) -> None:
        if m.pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(m.pidfd)
            with contextlib.suppress(OSError):
                os.close(m.pidfd)
            m.pidfd = None

    def _after_exit(self, m: _Module) -> None:
        """What the ended process left in its session or group is killed before a start."""
        if m.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(m.pid, signal.SIGKILL)
        self.runtime.empty_group(m.name)
        m.pid, m.start_time, m.proc = None, None, None
        self._save()

    async def _stop_process(self, m: _Module, keep_state: bool = False) -> None:
        """TERM to its process group, ``stop_timeout_seconds``, then KILL to the whole
        group (and its control group)."""
        if m.pid is None:
            return
        if not m.exited.is_set():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(m.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(m.exited.wait(), m.spec.stop_timeout_seconds)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(m.pid, signal.SIGKILL)
        if not m.exited.is_set():
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(m.exited.wait(), 2.0)
        self._unwatch(m)
        self.runtime.empty_group(m.name)
        if not keep_state:
            m.pid, m.start_time, m.proc = None, None, None

    async def _cancel(self, m: _Module) -> None:
        if m.task is _DONE:
            m.task = None
        elif m.task is not None:
            m.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await m.task
            m.task = None

    async def _remove(self, name: str) -> None:
        m = self._modules.pop(name)
        await self._cancel(m)
        await self._stop_process(m)
        self._records.pop(name, None)
        self.runtime.remove_group(name)
        shutil.rmtree(self.runtime.root / name, ignore_errors=True)
        log.info("modules: removed %s", name)
        self._notify()

    async def _program(self, m: _Module) -> tuple[list[str], str, str | None]:
        """The argv, working directory and package version of the module's program."""
        spec = m.spec
        if spec.command is not None:
            return [*spec.command, *spec.args], "/", None
        ref = spec.package
        assert ref is not None
        if ref.version is None:
            raise StartRefused(OutpostError(
                "module_start_failed", f"The module {m.name} could not be started: its "
                "package has no pinned version (the hub pins it when the deployment is "
                "made).", module=m.name))
        directory = self.runtime.root / "packages" / ref.name / ref.version
        if not directory.is_dir():
            from outpost.protocol import extpackage  # tarfile: at the first download
            try:
                data, sha = await self.channel.fetch_package(ref.name, ref.version)
            except OutpostError as exc:
                if exc.reason == "module_package_refused":
                    raise package_refused(m.name, ref.name, ref.version,
                                          int(exc.details.get("status", 0))) from None
                raise
            try:
                # light: its manifest checked without pydantic (the agent's budget).
                await asyncio.to_thread(extpackage.unpack, data, directory,
                                        ref.sha256 or sha, "module", True)
            except FileExistsError:
                pass  # another module of the same package unpacked it first
            except OutpostError as exc:
                raise OutpostError("module_start_failed", f"The module {m.name} could not "
                                   f"be started: {exc.message}", module=m.name) from None
        try:
            manifest = ModulePackageManifest.read(json.loads(
                (directory / MODULE_MANIFEST_NAME).read_bytes()))
        except (OSError, ValueError) as exc:  # ReadError, a JSON error: not as unpacked
            raise OutpostError("module_start_failed", f"The module {m.name} could not be "
                               f"started: {directory / MODULE_MANIFEST_NAME} cannot be read "
                               f"({exc}).", module=m.name) from None
        argv = [str(directory / manifest.run.run), *manifest.run.args, *spec.args]
        return argv, str(directory), ref.version

    def _identity(self, m: _Module) -> tuple[int, int] | None:
        try:
            identity, _said = self.runtime.identity(m.spec.run_as)
        except OutpostError as exc:
            user = m.spec.run_as or self.runtime.ext_user
            raise StartRefused(OutpostError(
                "module_user_unavailable", f"The module {m.name} cannot run as '{user}': "
                f"{exc.message}", module=m.name, user=user)) from None
        return identity

    def _env(self, m: _Module, home: Path) -> dict[str, str]:
        env = {"PATH": PATH, "HOME": str(home), "LANG": "C.UTF-8"}
        env.update(m.spec.env)
        env["OUTPOST_MODULE_NAME"] = m.name
        env["OUTPOST_MODULE_SOCKET"] = str(self.module_socket)
        return env

    def _resolv(self, m: _Module, home: Path) -> bytes:
        path = home / "resolv.conf"
        text = "".join(f"nameserver {server}\n" for server in m.spec.dns)
        path.write_text(f"# written by the Outpost agent for module {m.name}\n{text}")
        os.chmod(path, 0o644)
        return str(path).encode()

    def _rotate(self, name: str) -> None:
        """Past its bound the log is copied to NAME.log.1 and emptied: the module's
        descriptor (O_APPEND) then writes at the start of the emptied file."""
        path = self.log_path(name)
        try:
            if path.stat().st_size <= self.log_max_bytes:
                return
            shutil.copyfile(path, path.with_name(path.name + ".1"))
            os.truncate(path, 0)
        except OSError:
            pass

    # --- state -------------------------------------------------------------------------
    def _set(self, m: _Module, state: ModuleState, reason: str | None,
             code: str | None) -> None:
        changed = (m.state, m.reason, m.code) != (state, reason, code)
        m.state, m.reason, m.code = state, reason, code
        if changed:
            if state in ("failed", "backoff", "unhealthy"):
                log.warning("modules: %s is %s: %s", m.name, state, reason)
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        for hook in self.on_state:
            try:
                hook()
            except Exception:
                log.exception("modules: a state hook failed")

    def _save(self) -> None:
        records = {}
        for m in self._modules.values():
            if m.pid is not None:
                records[m.name] = {"pid": m.pid, "start_time": m.start_time, "hash": m.hash,
                                   "version": m.version, "started_at": m.last_start_at,
                                   "restarts": m.schedule.restarts}
        self._records = records
        data = {"doc": wire(self.doc) if self.doc else None,
                "modules": records}
        try:
            self.state_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_checked(self.state_path, data)
        except OSError as exc:
            log.warning("modules: the supervisor's state could not be saved (%s)", exc)


def recorded(state_root: Path) -> bool:
    """Whether the state directory records a deployment (the daemon then loads this
    package at its start, to adopt the modules)."""
    return (state_root / TREE / STATE_FILE).exists()
