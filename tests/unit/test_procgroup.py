"""agent/procgroup.py with real processes: a leader that starts grandchildren, a group that
ignores SIGTERM, a paused group (its processes in state T), and what is left after the
leader exits."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from outpost.agent import procgroup
from outpost.agent.procgroup import ProcessGroup

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")


async def until(check: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Wait on observed state, looking every few milliseconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def dead(pid: int) -> bool:
    """Gone, or a zombie waiting for its reaper (it runs no more)."""
    return procgroup.state(pid) in (None, "Z")


def family(tmp_path: Path, trap: str = "") -> list[str]:
    """A shell that starts two sleeping grandchildren, writes their pids, and waits."""
    pids = tmp_path / "pids"
    return ["sh", "-c", f"{trap} sleep 300 & a=$!; sleep 300 & b=$!; "
            f"echo $a $b > {pids}.tmp; mv {pids}.tmp {pids}; wait"]


async def children(tmp_path: Path) -> list[int]:
    path = tmp_path / "pids"
    await until(path.exists, "the grandchildren's pids")
    return [int(pid) for pid in path.read_text().split()]


def test_stop_ends_the_leader_and_every_grandchild(tmp_path: Path) -> None:
    async def scenario() -> None:
        group = await ProcessGroup.start(family(tmp_path))
        kids = await children(tmp_path)
        assert group.pgid == group.pid
        assert set(group.members()) >= {group.pid, *kids}
        assert group.alive()
        started = time.monotonic()
        code = await group.stop(grace=5)
        assert time.monotonic() - started < 4  # every one took the TERM: no waiting out
        assert code == -signal.SIGTERM
        assert all(dead(pid) for pid in kids), [procgroup.state(pid) for pid in kids]
        assert group.members() == []
        assert not group.alive()
        assert not group.signal(signal.SIGTERM)  # nothing is left to signal

    asyncio.run(scenario())


def test_a_group_ignoring_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    async def scenario() -> None:
        # An ignored signal stays ignored across fork and exec: the grandchildren too.
        group = await ProcessGroup.start(family(tmp_path, "trap '' TERM;"))
        kids = await children(tmp_path)
        started = time.monotonic()
        code = await group.stop(grace=0.5)
        took = time.monotonic() - started
        assert code == -signal.SIGKILL
        assert took >= 0.5
        assert all(dead(pid) for pid in kids)
        assert group.members() == []

    asyncio.run(scenario())


def test_stop_waits_for_a_grandchild_that_ignores_sigterm(tmp_path: Path) -> None:
    """The leader goes at the TERM, a grandchild does not: it is killed all the same."""
    async def scenario() -> None:
        pids = tmp_path / "pids"
        group = await ProcessGroup.start(
            ["sh", "-c", f"sh -c \"trap '' TERM; echo \\$\\$ > {pids}.tmp; "
             f"mv {pids}.tmp {pids}; exec sleep 300\" & wait"])
        [kid] = await children(tmp_path)
        await until(lambda: procgroup.state(kid) == "S", "the grandchild asleep")
        code = await group.stop(grace=0.3)
        assert code == -signal.SIGTERM  # the leader took it
        assert dead(kid)
        assert not group.alive()

    asyncio.run(scenario())


def test_suspend_stops_every_process_and_resume_wakes_them(tmp_path: Path) -> None:
    async def scenario() -> None:
        group = await ProcessGroup.start(family(tmp_path))
        kids = await children(tmp_path)
        everyone = [group.pid, *kids]
        assert group.suspend()
        await until(lambda: all(procgroup.state(pid) == "T" for pid in everyone),
                    "every process stopped (state T)")
        assert group.resume()
        await until(lambda: all(procgroup.state(pid) in ("S", "R") for pid in everyone),
                    "every process running again")
        # A paused group still ends at stop: SIGCONT goes with the SIGTERM.
        assert group.suspend()
        await until(lambda: procgroup.state(group.pid) == "T", "the leader stopped")
        assert await group.stop(grace=5) == -signal.SIGTERM
        assert all(dead(pid) for pid in kids)

    asyncio.run(scenario())


def test_members_outlive_their_leader_until_stopped(tmp_path: Path) -> None:
    """The leader exits by itself and leaves a grandchild: the group is alive until it
    is stopped, and wait() is the leader's own status."""
    async def scenario() -> None:
        pids = tmp_path / "pids"
        group = await ProcessGroup.start(
            ["sh", "-c", f"sleep 300 & echo $! > {pids}.tmp; mv {pids}.tmp {pids}; exit 3"])
        assert await group.wait() == 3
        [kid] = await children(tmp_path)
        assert group.returncode == 3
        assert group.alive()
        assert group.members() == [kid]
        assert not await group.wait_gone(timeout=0.05)
        assert await group.stop(grace=5) == 3
        assert dead(kid)
        assert await group.wait_gone(timeout=0)

    asyncio.run(scenario())


def test_a_group_that_ends_by_itself(tmp_path: Path) -> None:
    async def scenario() -> None:
        out = tmp_path / "out"
        with out.open("wb") as fh:
            group = await ProcessGroup.start(["sh", "-c", "echo hello; exit 0"], stdout=fh,
                                             cwd=tmp_path, env={"PATH": os.environ["PATH"]})
        assert await group.wait_gone(timeout=10)
        assert group.returncode == 0
        assert out.read_text() == "hello\n"
        assert await group.stop(grace=1) == 0  # nothing to end: at once

    asyncio.run(scenario())


def test_members_of_an_unknown_group() -> None:
    assert procgroup.members(2**22 + 12345) == []  # above any pid_max: no such group
    assert procgroup.state(os.getpid()) in ("R", "S")
    assert procgroup.wait_gone_blocking(2**22 + 12345, 0)
