"""common/supervise.py as the agent's daemon uses it: a task that fails is logged and
started again after a backoff that never passes its cap; one that ends is not; stop
cancels them all."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from outpost.common.supervise import Supervisor


def test_a_failing_task_is_started_again_within_the_cap(
        caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.supervise")
    runs: list[float] = []

    async def flaky() -> None:
        runs.append(time.monotonic())
        if len(runs) <= 4:
            raise RuntimeError(f"failure {len(runs)}")

    async def scenario() -> None:
        supervisor = Supervisor(log)
        task = supervisor.start("flaky", flaky, backoff_cap=0.05)
        await asyncio.wait_for(task, 10)  # ends once a run returns
        assert task.done() and not task.cancelled()

    with caplog.at_level(logging.ERROR, "test.supervise"):
        asyncio.run(scenario())
    assert len(runs) == 5
    gaps = [b - a for a, b in zip(runs, runs[1:], strict=False)]
    assert all(gap < 1.0 for gap in gaps), gaps  # 0.5 s doubling, capped at 0.05 s
    failed = [r for r in caplog.records if "task flaky failed" in r.getMessage()]
    assert len(failed) == 4 and failed[0].exc_info is not None


def test_stop_cancels_a_running_task() -> None:
    async def scenario() -> None:
        running = asyncio.Event()

        async def forever() -> None:
            running.set()
            await asyncio.Event().wait()

        supervisor = Supervisor(logging.getLogger("test.supervise"))
        task = supervisor.start("forever", forever)
        await asyncio.wait_for(running.wait(), 10)
        await supervisor.stop()
        assert task.cancelled()
        assert supervisor.tasks == {}

    asyncio.run(scenario())


def test_stop_ends_a_task_that_swallowed_its_cancellation() -> None:
    """A loop whose wait swallowed one cancellation (as Python 3.11's wait_for does when the
    waited event is set in the same turn) is cancelled again: stop does not hang."""
    swallowed = 0

    async def loop() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # the bug: carries on as if the wait had ended

    async def scenario() -> float:
        supervisor = Supervisor(logging.getLogger("test.supervise"))
        task = supervisor.start("loop", loop)
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await asyncio.wait_for(supervisor.stop(), 10)
        assert task.cancelled() and swallowed == 1
        return time.monotonic() - started

    assert asyncio.run(scenario()) < Supervisor.RECANCEL + 1.0
