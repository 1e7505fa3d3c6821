"""Extension operations on the hub, in the fast tier (the hub's app in this process, on
SQLite and PostgreSQL): the agent's reports checked against the machine and the attempt,
transient failures re-queued with backoff and handed out again, and the periodic pass run
by two replicas at once doing each change once."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from outpost.hub import extension_ops
from outpost.hub.extension_ops import ExtensionOps
from tests.extbuild import manifest, package
from tests.inproc import FAST, InprocHub, Machine

pytestmark = FAST


async def _setup(hub: InprocHub, **op: Any) -> Machine:
    machine = await hub.machine("m1")
    # Healthy for 3 intervals: a loaded machine may take seconds to reach the first ask.
    await machine.heartbeat(interval=30)
    data = package(manifest("ops", "1.0.0", operations={"snap": {"run": "bin/snap", **op}}))
    await hub.ok("POST", "/v1/extensions", content=data,
                 headers={"Content-Type": "application/gzip"})
    await hub.ok("PUT", "/v1/extensions/ops/targets/machine/m1", json={})
    return machine


async def _ask(hub: InprocHub) -> dict[str, Any]:
    response = await hub.api("POST", "/v1/machines/m1/extensions/ops/operations/snap",
                             json={"params": {"k": "v"}})
    assert response.status_code == 201, response.text
    found: dict[str, Any] = response.json()
    return found


def _end(attempt: int, **extra: Any) -> dict[str, Any]:
    return {"attempt": attempt, "status": "failed", "at": time.time(), **extra}


async def test_reports_are_checked_and_a_transient_failure_is_tried_again(
        fast_hub_any: InprocHub, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = fast_hub_any
    monkeypatch.setattr(extension_ops, "RETRY_BASE", 0.2)
    machine = await _setup(hub)
    other = await hub.machine("m2")
    asked = await _ask(hub)
    [item] = await machine.poll()
    assert item["kind"] == "ext_op"
    assert item["payload"]["op_id"] == asked["id"] and item["payload"]["attempt"] == 1
    assert item["payload"]["params"] == {"k": "v"}
    path = f"/v1/agent/ext-ops/{asked['id']}"
    # Another machine's report, and one for an attempt that is not the current one.
    for who, attempt in ((other, 1), (machine, 2)):
        refused = await who.call("POST", f"{path}/progress", {
            "attempt": attempt, "state": "started", "at": time.time()})
        assert refused.status_code == 409 and refused.json()["code"] == "E9092", refused.text
    started = await machine.call("POST", f"{path}/progress",
                                 {"attempt": 1, "state": "started", "at": time.time()})
    assert started.status_code == 204, started.text
    shown = await hub.ok("GET", f"/v1/extension-operations/{asked['id']}")
    assert shown["status"] == "Running" and shown["expected_end"] > time.time()
    ended = await machine.call("POST", f"{path}/end", _end(
        1, code="7", message="repository locked", transient=True))
    assert ended.status_code == 204, ended.text
    shown = await hub.ok("GET", f"/v1/extension-operations/{asked['id']}")
    assert (shown["status"], shown["attempt"]) == ("Queued", 2), shown
    assert "attempt 1 of 3 failed (7: repository locked)" in shown["message"], shown
    # Handed out again once the backoff passed, as attempt 2.
    deadline = time.monotonic() + 10
    items: list[dict[str, Any]] = []
    while not items and time.monotonic() < deadline:
        items = await machine.poll(wait=1)
    assert [i["payload"]["attempt"] for i in items] == [2], items
    # The last attempt's failure fails it, with its cause.
    for attempt in (2, 3):
        if attempt == 3:
            items = []
            while not items and time.monotonic() < deadline + 10:
                items = await machine.poll(wait=1)
        response = await machine.call("POST", f"{path}/end", _end(
            attempt, code="7", message="repository locked", transient=True))
        assert response.status_code == 204, response.text
    shown = await hub.ok("GET", f"/v1/extension-operations/{asked['id']}")
    assert (shown["status"], shown["attempt"], shown["code"]) == ("Failed", 3, "7"), shown
    assert "no attempts left" in shown["message"], shown


async def test_two_replicas_fail_a_late_operation_once_and_withdraw_its_item(
        fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    machine = await _setup(hub, start_timeout_seconds=0.3)
    asked = await _ask(hub)
    replica = ExtensionOps(hub.hub.engine, hub.hub.extensions.cache)
    await asyncio.sleep(0.4)
    await asyncio.gather(hub.hub.ext_ops.tick(), replica.tick(), replica.tick())
    shown = await hub.ok("GET", f"/v1/extension-operations/{asked['id']}")
    assert (shown["status"], shown["code"]) == ("Failed", "151076"), shown
    assert shown["message"] == ("Job execution timed out while tracking for extension "
                                "operation to be started."), shown
    assert await machine.poll() == []  # the item is withdrawn: no agent runs it later
    listed = await hub.ok("GET", "/v1/extension-operations?machine=m1&extension=ops")
    assert [r["id"] for r in listed] == [asked["id"]]
    missing = await hub.api("GET", "/v1/extension-operations/nope")
    assert missing.status_code == 404 and missing.json()["code"] == "E9087"


async def test_a_running_operation_whose_agent_went_away_ends_failed_and_the_next_runs(
        fast_hub_any: InprocHub, monkeypatch: pytest.MonkeyPatch) -> None:
    """E9093: silent for a lease, counted only from when this process could record
    heartbeats (its first pass); or heard from an agent started after the claim."""
    hub = fast_hub_any
    await hub.stop_task("extension-operations")  # this test runs the passes itself
    monkeypatch.setattr(extension_ops, "LEASE_MIN", 0.5)
    monkeypatch.setattr(extension_ops, "RESTART_MARGIN", 0.2)
    monkeypatch.setattr(extension_ops, "REAP_GAP", 60.0)  # a slow sleep is no outage here
    machine = await _setup(hub)
    first, second = await _ask(hub), await _ask(hub)
    [item] = await machine.poll()
    assert item["payload"]["op_id"] == first["id"]
    path = f"/v1/agent/ext-ops/{first['id']}/progress"
    started = await machine.call("POST", path, {"attempt": 1, "state": "started",
                                                "at": time.time()})
    assert started.status_code == 204, started.text
    await machine.heartbeat(interval=0.1)  # its last: a lease of 0.5 s
    ops = ExtensionOps(hub.hub.engine, hub.hub.extensions.cache)
    await asyncio.sleep(0.8)
    await ops.tick()  # its first pass: the silence before it is not counted
    shown = await hub.ok("GET", f"/v1/extension-operations/{first['id']}")
    assert shown["status"] == "Running", shown
    await asyncio.sleep(0.8)
    await ops.tick()
    shown = await hub.ok("GET", f"/v1/extension-operations/{first['id']}")
    assert (shown["status"], shown["code"]) == ("Failed", "E9093"), shown
    assert shown["message"].startswith("The agent stopped heartbeating while the operation "
                                       "snap of extension ops on m1 ran"), shown
    # The next one in line is handed out.
    [item] = await machine.poll()
    assert item["payload"]["op_id"] == second["id"]
    path = f"/v1/agent/ext-ops/{second['id']}/progress"
    started = await machine.call("POST", path, {"attempt": 1, "state": "started",
                                                "at": time.time()})
    assert started.status_code == 204, started.text
    await asyncio.sleep(0.5)
    beat = {"agent_version": "0.1.0", "heartbeat_interval": 30}
    await machine.ok("POST", "/v1/agent/heartbeat", beat)  # no uptime: it says nothing
    await ops.tick()
    assert (await hub.ok("GET", f"/v1/extension-operations/{second['id']}"))["status"] == \
        "Running"
    await machine.ok("POST", "/v1/agent/heartbeat", beat | {"uptime_seconds": 0.1})
    await ops.tick()
    shown = await hub.ok("GET", f"/v1/extension-operations/{second['id']}")
    assert (shown["status"], shown["code"]) == ("Failed", "E9093"), shown
    assert "ran and started again at" in shown["message"], shown
