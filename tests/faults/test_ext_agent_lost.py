"""An extension operation Running when its agent dies ends Failed with E9093, and the next
operation in line runs (HW-1 for extension operations), on SQLite and PostgreSQL.

A real hub and a real agent (heartbeat every 3 s, so a lease of 9 s). The operation's command
sleeps; the agent is killed with kill -9 while it runs, twice:

- started again at once: its heartbeats never stop for a lease, but they come from a process
  started after the operation was handed out, which does not run it;
- not started again: its heartbeats stop, and the lease runs out.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from tests import extbuild
from tests.support import Agent, Hub, healthy_agent, run_cli, wait_until

NAME = "lost"
STATUS = ("status() { printf '{\"status\":\"%s\",\"code\":0,\"message\":\"%s\"}' \"$1\" \"$2\" "
          "> \"$OUTPOST_EXT_STATUS_DIR/$OUTPOST_EXT_SEQ.status\"; }\n")


def _script(body: str) -> tuple[bytes, int]:
    return f"#!/bin/sh\n{STATUS}{body}\n".encode(), 0o755


def _package(shared: Path) -> bytes:
    files = {f"bin/{h}": _script("status success ok") for h in
             ("install", "enable", "disable", "update", "uninstall")}
    files["bin/slow"] = _script(f"echo $$ >> {shared}/slow-pids\nsleep 120\nstatus success x")
    files["bin/quick"] = _script("status success quick")
    operations = {"slow": {"run": "bin/slow", "pressure": False, "expected_seconds": 600},
                  "quick": {"run": "bin/quick", "pressure": False}}
    return extbuild.package(extbuild.manifest(NAME, "1.0.0", operations=operations),
                            files=files)


def _ask(hub: Hub, operation: str, name: str = NAME) -> str:
    response = hub.api("POST", f"/v1/machines/m1/extensions/{name}/operations/{operation}",
                       json={"params": {}})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _op(hub: Hub, op_id: str) -> dict[str, Any]:
    found: dict[str, Any] = hub.api("GET", f"/v1/extension-operations/{op_id}").json()
    return found


def _wait(hub: Hub, agent: Agent, op_id: str, status: str, timeout: float) -> dict[str, Any]:
    found: dict[str, Any] = wait_until(
        lambda: (row := _op(hub, op_id))["status"] == status and row, timeout, 0.2,
        what=f"operation {op_id} {status}\n{agent.log()[-2000:]}")
    return found


def _kill9(agent: Agent) -> None:
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait(10)


def test_an_operation_whose_agent_died_ends_failed_and_the_next_one_runs(
        hub: Hub, agents: list[Agent], shared: Path, tmp_path: Path) -> None:
    agent = healthy_agent(hub, tmp_path, agents, "m1", heartbeat_interval=3)
    try:
        published = hub.api("POST", "/v1/extensions", content=_package(shared),
                            headers={"Content-Type": "application/gzip"})
        assert published.status_code == 201, published.text
        assert hub.api("PUT", f"/v1/extensions/{NAME}/targets/machine/m1",
                       json={}).status_code == 200
        wait_until(lambda: any(r["name"] == NAME and r["state"] == "Ready" for r in
                               hub.api("GET", "/v1/machines/m1/extensions").json()),
                   60, 0.2, what=f"{NAME} Ready\n{agent.log()[-2000:]}")

        # Killed and started again at once.
        first = _ask(hub, "slow")
        _wait(hub, agent, first, "Running", 30)
        second = _ask(hub, "quick")
        assert _op(hub, second)["status"] == "Queued"  # one at a time: behind the first
        _kill9(agent)
        agent.start()
        failed = _wait(hub, agent, first, "Failed", 30)
        assert failed["code"] == "E9093", failed
        assert "The agent stopped while the operation slow of extension lost on m1 ran and " \
               "started again at " in failed["message"], failed
        assert failed["ended_at"] is not None
        done = _wait(hub, agent, second, "Succeeded", 30)
        assert done["message"] == "quick", done

        # Killed and left dead: the lease (3 heartbeats of 3 s) runs out.
        third = _ask(hub, "slow")
        _wait(hub, agent, third, "Running", 30)
        _kill9(agent)
        killed_at = time.time()
        failed = _wait(hub, agent, third, "Failed", 40)
        assert failed["code"] == "E9093", failed
        assert failed["message"].startswith(
            "The agent stopped heartbeating while the operation slow of extension lost on m1 "
            "ran: last heard from at "), failed
        assert "over 9 s ago (3 heartbeat intervals)" in failed["message"], failed
        assert failed["ended_at"] - killed_at >= 9 - 3, failed  # not before the lease

        # What the operator sees.
        shown = hub.cli("extension", "operation", third, "--json")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["code"] == "E9093"
        explained = run_cli("explain", "E9093")
        assert explained.returncode == 0 and "stopped heartbeating" in explained.stdout
    finally:
        pids = shared / "slow-pids"
        for pid in (pids.read_text().split() if pids.exists() else []):
            try:
                os.kill(int(pid), signal.SIGKILL)  # the commands the killed agents left
            except ProcessLookupError:
                pass
