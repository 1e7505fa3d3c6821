"""Helpers of the recovery tests (tests/unit/test_recovery_*.py, tests/integration/
test_recovery*.py): the recovery package on a fast-tier hub, a simulated agent's reports of
the extension and of its operations, real agents in a group."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.extbuild import manifest, package
from tests.inproc import InprocHub, Machine
from tests.support import Agent, Hub, registered_agent, wait_until

OPS = {"point": {"run": "bin/install", "pressure": True},
       "recover": {"run": "bin/install", "pressure": False},
       "prune": {"run": "bin/install", "pressure": True}}


async def recovery_package(hub: InprocHub) -> str:
    """The version of extension recovery the hub has: the shipped one, or (before the hub
    ships one) a stand-in with the same operations."""
    known = await hub.api("GET", "/v1/extensions/recovery")
    if known.status_code == 200:
        return str(known.json()["versions"][-1]["version"])
    made = await hub.api("POST", "/v1/extensions", headers={"Content-Type": "application/gzip"},
                         content=package(manifest("recovery", "1.0.0", operations=OPS)))
    assert made.status_code == 201, made.text
    return "1.0.0"


async def ready(machine: Machine, version: str, state: str = "Ready", step: str | None = None,
                message: str = "") -> None:
    """The machine's agent reports extension recovery in ``state``."""
    sent = await machine.call("POST", "/v1/agent/extensions/status", {"extensions": [
        {"name": "recovery", "version": version, "state": state, "step": step,
         "message": message, "changed_at": time.time()}]})
    assert sent.status_code == 204, sent.text


def point_result(short: str, paths: list[str]) -> dict[str, Any]:
    return {"snapshot": short, "snapshot_id": short + "0" * (64 - len(short)),
            "time": time.time(), "files": 3, "files_new": 3, "files_changed": 0,
            "bytes_added": 1000, "total_bytes": 3000, "duration_seconds": 0.5,
            "paths": paths, "consistency": "crash"}


async def end_op(machine: Machine, op_id: str, *, ok: bool = True,
                 result: dict[str, Any] | None = None, code: str | None = None,
                 message: str = "done") -> None:
    """The machine's agent starts operation ``op_id`` and ends it."""
    started = await machine.call("POST", f"/v1/agent/ext-ops/{op_id}/progress",
                                 {"attempt": 1, "state": "started", "at": time.time()})
    assert started.is_success, started.text
    ended = await machine.call("POST", f"/v1/agent/ext-ops/{op_id}/end", {
        "attempt": 1, "status": "succeeded" if ok else "failed", "code": code,
        "message": message, "result": result or {}, "at": time.time()})
    assert ended.is_success, ended.text


def group_agent(hub: Hub, tmp_path: Path, agents: list[Agent], name: str, group: str,
                **config: Any) -> Agent:
    """A registered agent of ``group``, started (stopped after the test) and Healthy."""
    agent = registered_agent(hub, tmp_path, name, group, **config)
    agents.append(agent.start())
    wait_until(lambda: hub.machines()[name]["status"] == "Healthy", 15, what=f"{name} healthy")
    return agent
