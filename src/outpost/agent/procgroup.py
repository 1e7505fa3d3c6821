"""A process group: a process started in a session and process group of its own, and
everything it starts, signalled, paused and ended as one.

A job attempt (runner.JobRun) and any long-running supervised process of the agent (an
extension's handler, a module) use it alike:

- ``ProcessGroup.start(argv, ...)`` starts a process as a group leader (``setsid``); or
  ``ProcessGroup(leader)`` takes one started otherwise (runner.py starts its runbook
  through process.py and the sandbox's lease, which places it in its control group).
- ``signal`` sends to the whole group; ``suspend`` and ``resume`` are SIGSTOP and SIGCONT.
- ``stop(grace)`` sends SIGTERM (and SIGCONT, so that a paused group takes it), waits up to
  ``grace`` seconds for every member to be gone, then sends SIGKILL, and returns once no
  member is left: a grandchild that ignores SIGTERM, or outlives its parent, goes too.
- ``wait`` is the leader's exit status; ``alive`` whether the leader or any member is left.

A member is a live (not zombie) process whose process group is the leader's pid: found
with ``killpg(pgid, 0)`` first (no member at all: no scan), then through /proc, so that
zombies waiting for their reaper do not count. The pgid cannot be taken by another group
while one of its members lives, so signalling it while ``alive`` reaches only this group.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal as signals
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Protocol

log = logging.getLogger("outpost.agent.procgroup")

POLL_MIN = 0.005  # seconds between looks at a group that is ending, at first
POLL_MAX = 0.1  # ... and at most
KILL_WAIT = 10.0  # how long members may take to go after SIGKILL (a process in D state)


class Leader(Protocol):
    """What the group needs of its leader: asyncio's Process and process.Process have it."""

    pid: int

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...


def members(pgid: int) -> list[int]:
    """The live processes of a process group (zombies left out), by pid."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    except PermissionError:
        pass  # another user's members: /proc still shows them
    found = []
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            fields = _stat(int(entry.name))
            if fields is not None and fields[2] == pgid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def state(pid: int) -> str | None:
    """The kernel's state letter for a process (R, S, D, T, Z, ...), None when gone."""
    fields = _stat(pid)
    return fields[0] if fields is not None else None


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgrp) from /proc/PID/stat; None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name, in parentheses, may hold spaces and parentheses itself.
    rest = raw[raw.rfind(b")") + 2:].split()
    try:
        return rest[0].decode(), int(rest[1]), int(rest[2])
    except (IndexError, ValueError):
        return None


def gone(pgid: int) -> bool:
    return not members(pgid)


def wait_gone_blocking(pgid: int, timeout: float) -> bool:
    """Until no member of the group is left, for at most ``timeout`` seconds, blocking (for
    code that runs before the event loop, such as runner.end_leftover). Whether it is."""
    deadline = time.monotonic() + timeout
    delay = POLL_MIN
    while True:
        if gone(pgid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, POLL_MAX)


class ProcessGroup:
    def __init__(self, leader: Leader) -> None:
        """A group whose leader has been started with ``start_new_session`` (or
        ``setsid``/``setpgid(0, 0)``): its pid is the group's id."""
        self.leader = leader

    @classmethod
    async def start(cls, argv: list[str], *, cwd: str | Path | None = None,
                    env: dict[str, str] | None = None,
                    identity: tuple[int, int] | None = None,
                    stdout: int | IO[Any] | None = asyncio.subprocess.DEVNULL,
                    stderr: int | IO[Any] | None = asyncio.subprocess.DEVNULL,
                    preexec: Callable[[], None] | None = None) -> ProcessGroup:
        """Start ``argv`` as the leader of a new session and process group, stdin from
        /dev/null; ``identity`` (uid, gid) to run as another user (the agent must be root);
        ``preexec`` runs in the child before exec (to join a control group, set rlimits).
        OSError when it cannot be started."""
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=stdout,
            stderr=stderr, start_new_session=True,
            user=identity[0] if identity else None,
            group=identity[1] if identity else None,
            extra_groups=[] if identity else None, preexec_fn=preexec)
        return cls(proc)

    @property
    def pid(self) -> int:
        return self.leader.pid

    @property
    def pgid(self) -> int:
        return self.leader.pid

    @property
    def returncode(self) -> int | None:
        """The leader's exit status (negative: the signal that ended it), None while it
        runs."""
        return self.leader.returncode

    def members(self) -> list[int]:
        return members(self.pgid)

    def alive(self) -> bool:
        """Whether the leader runs or any process of the group is left."""
        return self.leader.returncode is None or not gone(self.pgid)

    def signal(self, sig: int) -> bool:
        """Send ``sig`` to every process of the group; False when none is left (or the
        agent may not signal them)."""
        if not self.alive():
            return False
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def suspend(self) -> bool:
        return self.signal(signals.SIGSTOP)

    def resume(self) -> bool:
        return self.signal(signals.SIGCONT)

    async def wait(self) -> int:
        """The leader's exit status, once it has exited (the rest of the group may still
        run: ``wait_gone``)."""
        return await self.leader.wait()

    async def wait_gone(self, timeout: float | None = None) -> bool:
        """Until the leader has exited and no process of the group is left, for at most
        ``timeout`` seconds (None: no limit). Whether that is so."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.leader.returncode is None:
            try:
                await asyncio.wait_for(self.leader.wait(), timeout)
            except TimeoutError:
                return False
        delay = POLL_MIN
        while not gone(self.pgid):
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            await asyncio.sleep(delay if remaining is None else min(delay, remaining))
            delay = min(delay * 2, POLL_MAX)
        return True

    async def stop(self, grace: float) -> int | None:
        """End the whole group: SIGTERM, up to ``grace`` seconds for every process of it to
        go, then SIGKILL. Returns the leader's exit status (None if it could not be
        ended: not the agent's to signal)."""
        self.signal(signals.SIGTERM)
        self.signal(signals.SIGCONT)  # a paused group must wake to take the TERM
        if not await self.wait_gone(grace):
            self.signal(signals.SIGKILL)
            if not await self.wait_gone(KILL_WAIT):
                log.warning("process group %d: %s still there %g s after SIGKILL",
                            self.pgid, ", ".join(map(str, self.members())) or "its leader",
                            KILL_WAIT)
        return self.leader.returncode
