"""Who a job runs as, where, and within what limits: the job slots of one agent.

An agent runs at most ``max_concurrent_jobs`` jobs; each running job holds a slot, the
lowest free one. On an agent running as root a slot has its own unprivileged user
(jobusers.py), and the job runs as that user unless its group names another
(``outpost group set GROUP --run-as USER``, ``root`` included). Where a cgroup hierarchy is
writable a slot also has its own control group (cgroups.py), limiting memory, CPU and
processes; elsewhere the job gets resource limits (rlimits) instead: ``RLIMIT_NPROC`` for
processes and ``RLIMIT_DATA`` for memory, and no CPU limit, which rlimits cannot express.

A job user's working directory cannot lie in the state directory, which only root may
enter: it is made in a jobs directory (``jobs_root``) that every user may pass through
but none may list (0711), owned by root.

Starting a process as another user costs: Python forks the agent for it instead of using
vfork (a change of user in a vfork child is unsafe), and a fork of the agent (some 40 MB)
cost 1.3 ms of CPU in the agent and 1.6 ms in the child on the development machine, against
0.1 and 0.5 ms with vfork. So the runbook is started with vfork through util-linux's
``setpriv``, which changes the user and execs the interpreter (1.1 ms more in the child, for
its own exec), and the agent steps into the slot's group while it starts it (cgroups.py),
so that the child is born there. Without ``setpriv`` (BusyBox systems) the agent forks.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pwd
import resource
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from outpost.protocol.errors import OutpostError

from . import cgroups
from .cgroups import Limits
from .jobusers import JobUser, JobUsers

log = logging.getLogger("outpost.agent.sandbox")

HELPER_DIR = ".helper"  # JOBS_ROOT/.helper/: the helper files job users' directories link
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
T = TypeVar("T")
Start = Callable[[list[str], "tuple[int, int] | None", "Callable[[], None] | None"], T]


def agent_user() -> str:
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _reachable(path: Path) -> bool:
    """Whether every user may pass through each directory from / down to ``path``."""
    current = Path("/")
    for part in path.resolve().parts[1:]:
        current = current / part
        try:
            st = os.stat(current)
        except OSError:
            return False
        if not st.st_mode & stat.S_IXOTH:
            return False
    return True


def _safe_root(path: Path) -> bool:
    """A directory of the agent's own user, not a link, that no other user may write."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
            and not st.st_mode & 0o022)


def jobs_root(state_root: Path) -> Path:
    """Where job users' working directories go: beside the state directory
    (``STATE-jobs``) when every user may reach it, else under the system's temporary
    directory (``outpost-jobs-HASH``, for a state directory inside a private one such as
    the data directory of ``outpost up``)."""
    state_root = state_root.resolve()
    if _reachable(state_root.parent):
        candidate = state_root.parent / f"{state_root.name}-jobs"
    else:
        tag = hashlib.sha256(str(state_root).encode()).hexdigest()[:10]
        candidate = Path(tempfile.gettempdir()) / f"outpost-jobs-{tag}"
    with contextlib.suppress(FileExistsError):
        candidate.mkdir(mode=0o711)
    if not _safe_root(candidate):
        # Someone else made the name first (the temporary directory is everyone's).
        candidate = Path(tempfile.mkdtemp(prefix="outpost-jobs-"))
    os.chmod(candidate, 0o711)
    return candidate


@dataclass
class Slot:
    index: int
    user: JobUser | None
    group: cgroups.Group | None
    busy: bool = False


class Lease:
    """One attempt's hold on a slot: the identity it runs as and its limits."""

    def __init__(self, sandbox: Sandbox, slot: Slot, identity: tuple[int, int] | None,
                 run_as: str, limits: Limits, job_user: JobUser | None) -> None:
        self.sandbox = sandbox
        self.slot = slot
        self.identity = identity
        self.run_as = run_as  # what 'job show' says the attempt ran as
        self.limits = limits
        self.job_user = job_user  # the slot's user, when the job runs as it
        self._oom_before = 0
        self._stepped = False  # the agent stepped into the group to start the process
        self._released = False

    def spawn(self, argv: list[str], start: Start[T]) -> T:
        """Start the job's process with ``start(argv, identity, preexec)``, born in the
        slot's group and as the job's user, by vfork where it can (module docstring)."""
        group = self.slot.group
        hierarchy = self.sandbox.hierarchy
        setpriv = self.sandbox.setpriv
        if group is None or hierarchy is None or (self.identity is not None
                                                  and setpriv is None):
            return self._forked(argv, start)
        if self.identity is not None:
            assert setpriv is not None
            uid, gid = self.identity
            argv = [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                    "--inh-caps=-all", "--", *argv]
        group.apply(self.limits)
        self._oom_before = group.oom_baseline()
        self._stepped = True
        hierarchy.enter(group)
        try:
            return start(argv, None, None)
        finally:
            try:
                hierarchy.leave()
            except OSError as exc:  # the agent must not stay where jobs are limited
                log.error("the agent could not leave the group of slot %s (%s)",
                          self.slot.index, exc.strerror or exc)

    def started(self, pid: int) -> None:
        """The process ``spawn`` started: it joins what the agent did not step into."""
        group, hierarchy = self.slot.group, self.sandbox.hierarchy
        if group is not None and hierarchy is not None and self._stepped:
            try:
                hierarchy.adopt(group, pid)
            except OSError as exc:
                log.warning("slot %s: the job's process could not join %s (%s)",
                            self.slot.index, group.path, exc.strerror or exc)

    def _forked(self, argv: list[str], start: Start[T]) -> T:
        return start(*self.forked(argv))

    def forked(self, argv: list[str]
               ) -> tuple[list[str], tuple[int, int] | None, Callable[[], None] | None]:
        """(argv, identity, preexec) for a start by fork: the child joins the group (or
        sets its rlimits) between fork and exec."""
        group = self.slot.group
        if group is not None:
            group.apply(self.limits)
            self._oom_before = group.oom_baseline()
            fds = group.open_procs()
            return argv, self.identity, lambda: cgroups.join(fds)
        limits = self.sandbox.rlimits(self.limits, self.job_user is not None)
        if not limits:
            return argv, self.identity, None

        def set_rlimits() -> None:
            for kind, value in limits:
                resource.setrlimit(kind, (value, value))
        return argv, self.identity, set_rlimits

    def out_of_memory(self) -> bool:
        group = self.slot.group
        return group is not None and bool(self.limits.memory_mb) \
            and group.oom_since(self._oom_before)

    def finish(self) -> bool:
        """The job has ended: kill what is left of it in its group. Whether nothing of it
        can be running any more (no group: not known, False)."""
        group = self.slot.group
        if group is None:
            return False
        with contextlib.suppress(OSError):
            group.oom_since(self._oom_before)  # the next job's baseline
        try:
            emptied = group.empty()
        except OSError as exc:
            log.warning("slot %s: its group %s could not be emptied (%s)", self.slot.index,
                        group.path, exc.strerror or exc)
            return False
        if not emptied:
            log.warning("slot %s: processes are left in %s after its job", self.slot.index,
                        group.path)
        return emptied

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.sandbox.give(self.slot)


class Sandbox:
    """The job slots of one agent (see the module's docstring)."""

    def __init__(self, state_root: Path, slots: int, defaults: Limits,
                 job_users: bool = True, cgroup_root: Path = cgroups.ROOT,
                 proc_cgroup: str | None = None, users: JobUsers | None = None) -> None:
        self.state_root = state_root
        self.defaults = defaults
        self.use_users = job_users and os.geteuid() == 0
        self.users = users or JobUsers()
        self.cgroup_root = cgroup_root
        self.proc_cgroup = proc_cgroup
        self.hierarchy: cgroups.Hierarchy | None = None
        self.why_no_cgroups = ""
        self.group_name = ""
        self.slots: list[Slot] = []
        self.jobs_root: Path | None = None
        self.setpriv: str | None = None  # util-linux's, to change user after a vfork
        self._count = slots
        self._base_processes = 0

    def start(self) -> None:
        """Find or make the job users, the slots' groups and the jobs directory. Raises
        OutpostError (E4012) when job users are wanted and cannot be had."""
        if self.use_users:
            self.users.ensure(self._count)
            try:
                self.jobs_root = jobs_root(self.state_root)
            except OSError as exc:
                raise OutpostError(
                    "job_users_unavailable", f"The agent cannot make the directory its job "
                    f"users work in ({exc.filename}: {exc.strerror or exc}).",
                    fix="Free space or fix the permissions there, or start the agent with "
                        "another --state-dir.") from exc
        if os.geteuid() == 0:
            self.setpriv = shutil.which("setpriv", path=SAFE_PATH)
        try:
            self.hierarchy = cgroups.detect(str(self.state_root.resolve()),
                                            self.cgroup_root, self.proc_cgroup)
        except cgroups.Unavailable as exc:
            self.why_no_cgroups = str(exc)
        except PermissionError as exc:
            self.why_no_cgroups = f"not allowed to make groups ({exc.strerror})"
        if self.hierarchy is None:
            self._base_processes = _own_processes()
        for index in range(1, self._count + 1):
            self.slots.append(self._slot(index))

    def _slot(self, index: int) -> Slot:
        group = None
        if self.hierarchy is not None:
            try:
                group = self.hierarchy.group(index)
            except OSError as exc:
                log.warning("slot %s has no group of its own (%s); its jobs get rlimits",
                            index, exc.strerror or exc)
        user = self.users.user(index) if self.use_users else None
        return Slot(index, user, group)

    def close(self) -> None:
        """At the agent's stop: the slots' groups are removed (emptied first), and the
        spare working directories (the next start would not trust them); a jobs directory
        under the temporary directory goes altogether."""
        if self.jobs_root is not None:
            temporary = self.jobs_root.parent == Path(tempfile.gettempdir())
            shutil.rmtree(self.jobs_root if temporary else self.jobs_root / ".spare",
                          ignore_errors=True)
        for slot in self.slots:
            if slot.group is not None:
                with contextlib.suppress(OSError):
                    slot.group.empty()
                slot.group.remove()
        if self.hierarchy is not None:
            for base in set(self.hierarchy.bases.values()):
                with contextlib.suppress(OSError):
                    os.rmdir(base)

    # --- what jobs get -------------------------------------------------------------------
    def limits_for(self, job: dict[str, Any]) -> Limits:
        """The group's limits where it sets them, else the agent's defaults."""
        asked = job.get("limits") or {}
        d = self.defaults
        return Limits(memory_mb=int(asked.get("memory_mb") or d.memory_mb),
                      cpus=float(asked.get("cpus") or d.cpus),
                      processes=int(asked.get("processes") or d.processes))

    def lease(self, job: dict[str, Any], identity: tuple[int, int] | None) -> Lease:
        """A slot for the job. ``identity`` is the group's run-as user's (None: none, or
        the agent's own user, root included)."""
        slot = next((s for s in self.slots if not s.busy), None)
        if slot is None:  # more jobs than slots: the claim is the hub's to bound
            slot = self._slot(len(self.slots) + 1)
            self.slots.append(slot)
        slot.busy = True
        requested = job.get("run_as")
        job_user = None
        if requested:
            run_as = f"{requested} (group {self.group_name or '?'} asks for {requested})"
        elif slot.user is not None:
            job_user = slot.user
            identity = (slot.user.uid, slot.user.gid)
            run_as = slot.user.name
        else:
            run_as = f"{agent_user()} (the agent's user)"
        return Lease(self, slot, identity, run_as, self.limits_for(job), job_user)

    def give(self, slot: Slot) -> None:
        slot.busy = False

    def rlimits(self, limits: Limits, own_user: bool) -> list[tuple[int, int]]:
        """The rlimits for a job without a group. RLIMIT_NPROC counts every process of the
        user: a job user's are the job's alone, the agent's user's include the agent's
        own."""
        found = []
        if limits.processes:
            base = 0 if own_user else self._base_processes
            found.append((resource.RLIMIT_NPROC, base + limits.processes))
        if limits.memory_mb:
            found.append((resource.RLIMIT_DATA, limits.memory_mb * 2**20))
        return found

    # --- what the agent says of it -------------------------------------------------------
    def describe_users(self) -> str:
        if self.use_users and self.slots:
            users = [s.user.name for s in self.slots if s.user is not None]
            return f"{users[0]}..{users[-1]} (one user per job slot)" if users else "-"
        return f"{agent_user()} (the agent's user)"

    def describe_limits(self) -> str:
        if self.hierarchy is not None:
            return self.hierarchy.describe()
        return f"rlimits (no cgroups: {self.why_no_cgroups})"

    def status(self) -> dict[str, Any]:
        return {"run_as": self.describe_users(), "limits_by": self.describe_limits(),
                "cgroup_version": self.hierarchy.version if self.hierarchy else None,
                "default_limits": {"memory_mb": self.defaults.memory_mb,
                                   "cpus": self.defaults.cpus,
                                   "processes": self.defaults.processes},
                "jobs_dir": str(self.jobs_root) if self.jobs_root else None}


def _own_processes() -> int:
    """How many processes the agent's user runs (RLIMIT_NPROC counts them all)."""
    uid = os.geteuid()
    count = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if entry.stat().st_uid == uid:
                        count += 1
    return count
