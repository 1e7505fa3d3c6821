"""Fast tier: uninstalling an extension from one machine (``extension uninstall --machine``)
and the next operation that installs it again change that machine's goals, so its waiting
long-poll answers at once with the new etag, on SQLite and PostgreSQL (whose notifiers
differ), rather than at the agent's next heartbeat."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.extbuild import manifest, package
from tests.inproc import FAST, InprocHub, Machine

pytestmark = FAST

HOLD = 20.0  # the poll's own hold: an answer well before it came from the wake-up


async def _etag(machine: Machine) -> str:
    answer = await machine.ok("POST", "/v1/agent/heartbeat",
                              {"agent_version": "9.9.9", "heartbeat_interval": 30})
    return str(answer["extensions_etag"])


async def _poll_until_changed(machine: Machine, etag: str) -> tuple[float, dict[str, Any]]:
    began = time.monotonic()
    answer = await machine.ok("POST", f"/v1/agent/poll?wait={HOLD:g}&capacity=0"
                                      f"&extensions_etag={etag}")
    return time.monotonic() - began, answer


async def test_uninstall_and_reinstall_wake_the_machines_long_poll(
        fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    machine = await hub.machine("m1")
    data = package(manifest("ops", "1.0.0", operations={"snap": {"run": "bin/snap"}}))
    await hub.ok("POST", "/v1/extensions", content=data,
                 headers={"Content-Type": "application/gzip"})
    await hub.ok("PUT", "/v1/extensions/ops/targets/group/web", json={})
    installed = await _etag(machine)

    poll = asyncio.ensure_future(_poll_until_changed(machine, installed))
    await asyncio.sleep(0.3)  # the poll is waiting
    assert not poll.done()
    await hub.ok("POST", "/v1/machines/m1/extensions/ops/uninstall")
    took, answer = await asyncio.wait_for(poll, HOLD + 5)
    assert took < HOLD / 2, took
    assert answer["items"] == [] and answer["extensions_etag"] != installed, answer
    uninstalled = answer["extensions_etag"]

    # The next operation asked of it there installs it again: the same wake-up.
    poll = asyncio.ensure_future(_poll_until_changed(machine, uninstalled))
    await asyncio.sleep(0.3)
    assert not poll.done()
    response = await hub.api("POST", "/v1/machines/m1/extensions/ops/operations/snap",
                             json={"params": {}})
    assert response.status_code == 201, response.text
    took, answer = await asyncio.wait_for(poll, HOLD + 5)
    assert took < HOLD / 2, took
    assert answer["extensions_etag"] not in (uninstalled, None), answer
