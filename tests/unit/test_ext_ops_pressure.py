"""The pressure gate of extension operations (EX-7): agent/pressure.py's real sampling of a
real busy process, with thresholds chosen by the test; the hub is a recorder of the reports
the gate sends (the agent's narrow ``call`` seam)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

from outpost.agent.extensions.ops import Operations
from outpost.agent.pressure import Pressure
from outpost.protocol import work as wire
from tests.support import wait_until


class Hub:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def call(self, method: str, path: str, body: Any = None) -> None:
        self.calls.append((path, body))


def _asked(deadline: float | None) -> wire.ExtOpPayload:
    return wire.ExtOpPayload(op_id="op1", extension="backup", operation="snapshot",
                             deadline=deadline)


def _busy(pressure: Pressure) -> subprocess.Popen[bytes]:
    """A real busy loop, once the real sampling sees it over the threshold."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        wait_until(lambda: pressure.reason() is not None, 15, 0.2, what="the busy loop seen")
    except BaseException:
        busy.kill()
        busy.wait()
        raise
    return busy


def test_an_operation_waits_saying_why_then_starts_when_the_load_passes() -> None:
    hub = Hub()
    pressure = Pressure(max_cpu=5, max_memory=100, seconds=0)
    ops = Operations(None, hub.call, pressure.reason)  # type: ignore[arg-type]
    busy = _busy(pressure)

    async def scenario() -> str | None:
        gate = asyncio.create_task(ops.wait_for_load(_asked(time.time() + 60)))
        started = time.monotonic()
        while not hub.calls and time.monotonic() - started < 20:
            await asyncio.sleep(0.1)
        assert not gate.done()
        pressure.max_cpu = 101.0  # the load passed: no reading can be over it
        return await asyncio.wait_for(gate, 10)

    try:
        said = asyncio.run(scenario())
        assert said is not None and said.startswith("started after waiting "), said
        assert " s for the machine's load to pass (CPU at " in said, said
    finally:
        busy.kill()
        busy.wait()
    path, body = hub.calls[0]
    assert path == "/v1/agent/ext-ops/op1/progress"
    assert body["state"] == "waiting"
    assert body["message"].startswith("waiting: CPU at "), body
    assert "above the 5% threshold" in body["message"], body
    assert all(p.endswith("/progress") for p, _ in hub.calls)  # no end: it goes on


def test_an_operation_still_waiting_at_its_deadline_ends_failed_saying_why() -> None:
    hub = Hub()
    pressure = Pressure(max_cpu=5, max_memory=100, seconds=0)
    ops = Operations(None, hub.call, pressure.reason)  # type: ignore[arg-type]
    busy = _busy(pressure)
    try:
        assert asyncio.run(ops.wait_for_load(_asked(time.time() + 2.5))) is None
    finally:
        busy.kill()
        busy.wait()
    path, body = hub.calls[-1]
    assert path == "/v1/agent/ext-ops/op1/end"
    assert body["status"] == "failed" and body["code"] == "E9091", body
    assert "did not start by its deadline: waiting: CPU at" in body["message"], body
