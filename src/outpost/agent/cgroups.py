"""Control groups for jobs: one per job slot, with memory, CPU and process-count limits,
on the unified hierarchy (cgroup v2) or the per-controller ones (cgroup v1).

Each slot's group is made once, when the agent starts, and used again by every job that
runs in the slot: making and removing a group costs about 85 µs of the kernel's time on
the development machine, against a few µs for writing a limit that changed. A job's
process is born in its group, so nothing it starts can begin outside it: the agent steps
into the group for the moment it starts the process (``Hierarchy.enter`` and ``leave``,
about 100 µs), which keeps the cheap vfork start (a fork of the agent costs some 3 ms of
CPU: sandbox.py); where the process is forked anyway it joins between fork and exec
(``join``, which writes to a ``cgroup.procs`` file the agent opened). When the job ends,
whatever is left in the group is killed (``empty``): a process that left the runbook's
process group or session cannot outlive the job.

v2 (``/sys/fs/cgroup`` with ``cgroup.controllers``): the agent's own group is read from
``/proc/self/cgroup``; a group with processes cannot also hand controllers to its children,
so the agent first moves itself into a leaf ``agent`` beside the jobs' groups, as a
container manager does (systemd's ``Delegate=yes`` gives it that right under a service).
v1: the ``memory``, ``cpu`` and ``pids`` hierarchies, each mounted under the root.

``detect`` takes the root directory and the ``/proc/self/cgroup`` text as arguments: tests
point them at a directory tree that stands in for the kernel's.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("outpost.agent.cgroups")

ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "cpu", "pids")
CPU_PERIOD_US = 100_000
EMPTY_SECONDS = 0.5  # killing what a job left: at most this long, then it is left for later


class Unavailable(Exception):
    """No writable cgroup hierarchy with the controllers jobs need; the message says why."""


@dataclass(frozen=True)
class Limits:
    """A job's limits; 0 means none of that kind."""

    memory_mb: int = 512
    cpus: float = 1.0
    processes: int = 256

    def text(self) -> str:
        parts = [f"memory {mib(self.memory_mb)}" if self.memory_mb else "memory unlimited",
                 f"{self.cpus:g} CPU" if self.cpus else "CPU unlimited",
                 f"{self.processes} processes" if self.processes else "processes unlimited"]
        return ", ".join(parts)


def mib(megabytes: int) -> str:
    return f"{megabytes} MiB"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _write(path: Path, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def _pids(path: Path) -> list[int]:
    return [int(line) for line in _read(path).split()]


def _counter(text: str, name: str) -> int:
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == name and value.strip().isdigit():
            return int(value)
    return 0


class Group:
    """One slot's group: on v2 one directory, on v1 one directory per controller."""

    def __init__(self, version: int, dirs: dict[str, Path]) -> None:
        self.version = version
        self.dirs = dirs  # controller -> directory (v2: every controller -> the same one)
        self._applied: Limits | None = None
        self._procs = sorted({d / "cgroup.procs" for d in dirs.values()})
        # A process is in every v1 hierarchy at once: one listing (pids') shows them all.
        self._listing = dirs["pids"] / "cgroup.procs"
        self._fds: list[int] = []  # the procs files, kept open (open_procs)
        self._enter_fds: list[int] = []  # where the agent's thread goes (Hierarchy.enter)
        self._oom_seen: int | None = None

    @property
    def path(self) -> Path:
        return self.dirs["memory"]

    def apply(self, limits: Limits) -> None:
        """Write the limits that differ from the last job's."""
        if limits == self._applied:
            return
        memory = limits.memory_mb * 2**20
        if self.version == 2:
            d = self.dirs["memory"]
            _write(d / "memory.max", str(memory) if memory else "max")
            with contextlib.suppress(FileNotFoundError, PermissionError):
                _write(d / "memory.swap.max", "0" if memory else "max")
            quota = int(limits.cpus * CPU_PERIOD_US)
            _write(d / "cpu.max", f"{quota if quota else 'max'} {CPU_PERIOD_US}")
            _write(d / "pids.max", str(limits.processes) if limits.processes else "max")
        else:
            _write(self.dirs["memory"] / "memory.limit_in_bytes",
                   str(memory) if memory else "-1")
            _write(self.dirs["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            quota = int(limits.cpus * CPU_PERIOD_US)
            _write(self.dirs["cpu"] / "cpu.cfs_quota_us", str(quota) if quota else "-1")
            _write(self.dirs["pids"] / "pids.max",
                   str(limits.processes) if limits.processes else "max")
        self._applied = limits

    def open_procs(self) -> list[int]:
        """Descriptors of the group's ``cgroup.procs`` files, for ``join`` in a child and
        for ``Hierarchy.enter``; opened once and kept. Opened by the agent, so the job's
        user, which could not open them, can write them (the kernel checks the opener's
        rights)."""
        if not self._fds:
            fds: list[int] = []
            try:
                for path in self._procs:
                    fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
            except OSError:
                for fd in fds:
                    os.close(fd)
                raise
            self._fds = fds
        return self._fds

    def oom_kills(self) -> int:
        """How many processes the kernel has killed in the group for its memory limit."""
        if self.version == 2:
            return _counter(_read(self.dirs["memory"] / "memory.events"), "oom_kill")
        return _counter(_read(self.dirs["memory"] / "memory.oom_control"), "oom_kill")

    def oom_baseline(self) -> int:
        """The count before a job: the one seen after the last job (only the slot's jobs
        add to it), read once."""
        if self._oom_seen is None:
            self._oom_seen = self.oom_kills()
        return self._oom_seen

    def oom_since(self, before: int) -> bool:
        """Whether the kernel killed a process for the memory limit since ``before``."""
        self._oom_seen = self.oom_kills()
        return self._oom_seen > before

    def members(self) -> list[int]:
        """The processes in the group; never the agent (in it only while it starts a job)."""
        found = set(_pids(self._listing))
        found.discard(os.getpid())
        return sorted(found)

    def empty(self) -> bool:
        """Kill every process in the group; whether it is empty now."""
        if self.version == 2 and (self.path / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                _write(self.path / "cgroup.kill", "1")
        deadline = time.monotonic() + EMPTY_SECONDS
        rounds = 0
        while True:
            pids = self.members()
            if not pids:
                return True
            if time.monotonic() > deadline:
                return False
            # Stopped first, all of them, then killed: killed one by one, a shell whose child
            # died before it would run on for a moment and report the child 'Killed' in the
            # job's output (the pids are killed in number order, and numbers wrap).
            for sig in (signal.SIGSTOP, signal.SIGKILL):
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, sig)
            rounds += 1
            if rounds > 3:  # killed, and not gone yet: give them a moment to exit
                time.sleep(0.002)

    def remove(self) -> None:
        for fd in [*self._fds, *self._enter_fds]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = self._enter_fds = []
        deadline = time.monotonic() + EMPTY_SECONDS
        for d in sorted(set(self.dirs.values())):
            while True:  # busy while the last killed are still exiting
                try:
                    os.rmdir(d)
                except OSError as exc:
                    if exc.errno == errno.EBUSY and time.monotonic() < deadline:
                        time.sleep(0.01)
                        continue
                break


def join(fds: list[int]) -> None:
    """In the job's child, before exec: move this process into the group."""
    for fd in fds:
        os.write(fd, b"0")


class Hierarchy:
    """Where the agent makes its slots' groups: ``base`` per controller."""

    def __init__(self, version: int, bases: dict[str, Path], home: list[Path]) -> None:
        self.version = version
        self.bases = bases
        self.home = home  # the agent's own group(s), where it goes back after ``enter``
        self._home_fds: list[int] = []

    # On v1 the agent steps into the memory and pids groups only, moving its thread alone
    # (``tasks``): moving a whole process takes a lock over every thread group of the
    # system, and moving the agent out of a cpu group again cost 0.3 to 0.7 ms (measured);
    # the process it started is moved into the cpu group right after (``adopt``, about
    # 0.1 ms). Before that, only its CPU time is not yet limited: the interpreter has not
    # even started. v2 moves the agent's process, once, for every controller.
    _STEP = ("memory", "pids")

    def _entry(self, directory: Path) -> int:
        name = "tasks" if self.version == 1 else "cgroup.procs"
        return os.open(directory / name, os.O_WRONLY | os.O_CLOEXEC)

    def enter(self, group: Group) -> None:
        """Move the agent's thread into ``group``: a process it starts now is born there."""
        if not group._enter_fds:
            dirs = {group.dirs[c] for c in (self._STEP if self.version == 1 else ["memory"])}
            group._enter_fds = [self._entry(d) for d in sorted(dirs)]
        join(group._enter_fds)

    def leave(self) -> None:
        if not self._home_fds:
            home = self.home if self.version == 2 else [
                self.home[V1_CONTROLLERS.index(c)] for c in self._STEP]
            self._home_fds = [self._entry(p) for p in home]
        join(self._home_fds)

    def adopt(self, group: Group, pid: int) -> None:
        """After ``enter``, ``leave`` and the start: the process joins the groups the agent
        did not step into (v1's cpu)."""
        if self.version == 1:
            with contextlib.suppress(ProcessLookupError):
                _write(group.dirs["cpu"] / "cgroup.procs", str(pid))

    def describe(self) -> str:
        where = sorted({str(p) for p in self.bases.values()})
        return f"cgroup v{self.version} ({', '.join(where)})"

    def group(self, index: int) -> Group:
        """Slot ``index``'s group, made if missing (emptied of an earlier run's processes)."""
        dirs: dict[str, Path] = {}
        made: dict[Path, Path] = {}
        for controller, base in self.bases.items():
            if base not in made:
                path = base / f"slot{index}"
                path.mkdir(exist_ok=True)
                made[base] = path
            dirs[controller] = made[base]
        group = Group(self.version, dirs)
        group.empty()
        return group


def _own_path(proc_cgroup: str, controller: str | None) -> str:
    """The agent's group in a hierarchy, from /proc/self/cgroup (v2: ``0::/path``)."""
    for line in proc_cgroup.splitlines():
        number, _, rest = line.partition(":")
        names, _, path = rest.partition(":")
        if controller is None and number == "0" and names == "":
            return path
        if controller is not None and controller in names.split(","):
            return path
    return "/"


def _inside(root: Path, path: str) -> Path:
    """``path`` under the mounted ``root``; the root itself when the mount shows only part
    of the tree (a container without its own cgroup namespace)."""
    candidate = root / path.lstrip("/")
    return candidate if candidate.is_dir() else root


def detect(name: str, root: Path = ROOT, proc_cgroup: str | None = None) -> Hierarchy:
    """The hierarchy for an agent whose state is named ``name`` (several agents may share
    a machine): its groups are ``outpost-HASH/slotN`` under the agent's own group.
    Raises Unavailable, saying why, when none can be used."""
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError as exc:
            raise Unavailable(f"/proc/self/cgroup cannot be read ({exc.strerror})") from exc
    tag = "outpost-" + hashlib.sha256(name.encode()).hexdigest()[:10]
    try:
        if (root / "cgroup.controllers").is_file():
            return _detect_v2(root, proc_cgroup, tag)
        return _detect_v1(root, proc_cgroup, tag)
    except OSError as exc:
        raise Unavailable(f"{exc.filename or root}: {exc.strerror or exc}") from exc


def _detect_v2(root: Path, proc_cgroup: str, tag: str) -> Hierarchy:
    own = _inside(root, _own_path(proc_cgroup, None))
    wanted = {"memory", "cpu", "pids"}
    missing = wanted - set(_read(own / "cgroup.controllers").split())
    if missing:
        raise Unavailable(f"{own} does not offer the {', '.join(sorted(missing))} "
                          "controller(s)")
    home = own
    if own != root and _pids(own / "cgroup.procs"):
        # No internal processes: the agent leaves its group for a leaf of its own.
        home = own / "agent"
        home.mkdir(exist_ok=True)
        _write(home / "cgroup.procs", "0")
    _write(own / "cgroup.subtree_control", "+memory +cpu +pids")
    base = own / tag
    base.mkdir(exist_ok=True)
    _write(base / "cgroup.subtree_control", "+memory +cpu +pids")
    return Hierarchy(2, {c: base for c in V1_CONTROLLERS}, [home])


def _detect_v1(root: Path, proc_cgroup: str, tag: str) -> Hierarchy:
    bases: dict[str, Path] = {}
    home: list[Path] = []
    for controller in V1_CONTROLLERS:
        mount = root / controller
        if not (mount / "cgroup.procs").exists():
            raise Unavailable(f"no {controller} hierarchy is mounted at {mount}")
        own = _inside(mount, _own_path(proc_cgroup, controller))
        base = own / tag
        base.mkdir(exist_ok=True)
        bases[controller] = base
        home.append(own)  # one per controller, in V1_CONTROLLERS' order
    return Hierarchy(1, bases, home)
