"""An agent killed with kill -9 and started again at once, while it held an extension
operation (hub/extension_ops.py, ``started_run``):

- a Running operation ends Failed with E9093 at the hub's next pass, however soon after the
  start the agent came back (the hub compares the run of the agent that started it with the
  run of the heartbeats that follow; before, only an agent started over 5 s after the
  operation's hand-out was told apart);
- an operation the agent held back for the machine's load (Waiting) never started, so it
  goes back in line and the new agent runs it, rather than waiting out its start timeout.

A real hub and a real agent on SQLite and PostgreSQL; the load is real (one busy loop a CPU).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests import extbuild
from tests.faults.test_ext_agent_lost import _op, _script
from tests.faults.test_ext_agent_lost import _ask as lost_ask
from tests.support import Agent, Hub, healthy_agent, wait_until

NAME = "restart"


def _package(shared: Path) -> bytes:
    files = {f"bin/{h}": _script("status success ok") for h in
             ("install", "enable", "disable", "update", "uninstall")}
    files["bin/slow"] = _script(f"echo $$ >> {shared}/slow-pids\nsleep 120\nstatus success x")
    files["bin/work"] = _script("echo working\nstatus success done")
    operations = {"slow": {"run": "bin/slow", "pressure": False, "expected_seconds": 600},
                  "work": {"run": "bin/work", "start_timeout_seconds": 300}}
    return extbuild.package(extbuild.manifest(NAME, "1.0.0", operations=operations),
                            files=files)


def _ask(hub: Hub, operation: str) -> str:
    return lost_ask(hub, operation, NAME)


def _wait(hub: Hub, agent: Agent, op_id: str, *status: str, timeout: float = 30
          ) -> dict[str, Any]:
    found: dict[str, Any] = wait_until(
        lambda: (row := _op(hub, op_id))["status"] in status and row, timeout, 0.2,
        what=f"operation {op_id} {'/'.join(status)}\n{agent.log()[-2000:]}")
    return found


def _restart9(agent: Agent) -> None:
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait(10)
    agent.start()


def test_an_agent_restarted_at_once_is_told_apart_by_its_run(
        hub: Hub, agents: list[Agent], shared: Path, tmp_path: Path) -> None:
    agent = healthy_agent(hub, tmp_path, agents, "m1", heartbeat_interval=30,
                          max_cpu_percent=50, max_memory_percent=100, pressure_seconds=2)
    loops: list[subprocess.Popen[bytes]] = []
    try:
        published = hub.api("POST", "/v1/extensions", content=_package(shared),
                            headers={"Content-Type": "application/gzip"})
        assert published.status_code == 201, published.text
        assert hub.api("PUT", f"/v1/extensions/{NAME}/targets/machine/m1",
                       json={}).status_code == 200
        wait_until(lambda: any(r["name"] == NAME and r["state"] == "Ready" for r in
                               hub.api("GET", "/v1/machines/m1/extensions").json()),
                   60, 0.2, what=f"{NAME} Ready\n{agent.log()[-2000:]}")

        # Running, then the agent killed and started again within a second or two: the
        # lease (3 heartbeats of 30 s) is nowhere near, nor the old 5 s margin.
        first = _ask(hub, "slow")
        running = _wait(hub, agent, first, "Running")
        _restart9(agent)
        failed = _wait(hub, agent, first, "Failed", timeout=20)
        assert failed["code"] == "E9093", failed
        assert "The agent stopped while the operation slow of extension restart on m1 ran " \
               "and started again" in failed["message"], failed
        assert failed["ended_at"] - running["started_at"] < 20, failed

        # Waiting for the machine's load, then the agent killed and started again: handed
        # out again to the new agent, which runs it once the load is gone.
        for _ in range(os.cpu_count() or 1):
            loops.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        wait_until(lambda: "threshold" in str((agent.status() or {}).get("not_taking_work")),
                   30, 0.2, what="the agent to see the CPU load")
        second = _ask(hub, "work")
        waiting = _wait(hub, agent, second, "Waiting")
        assert waiting["started_at"] is None, waiting
        # The new agent finds no pressure (a threshold no reading is over), so it runs the
        # operation as soon as the hub hands it out again.
        agent.config["max_cpu_percent"] = 100
        agent.write_config()
        restarted_at = time.time()
        _restart9(agent)
        done = _wait(hub, agent, second, "Succeeded", "Failed", timeout=60)
        assert done["status"] == "Succeeded", done
        assert "working" in done["output"], done
        assert done["attempt"] == 1 and done["code"] is None, done
        # Not left to its start timeout (300 s): the hub's next pass after the new run's
        # first heartbeat handed it out again.
        assert done["ended_at"] - restarted_at < 45, done
        assert done["waited_seconds"] and done["waited_seconds"] > 0, done
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
        pids = shared / "slow-pids"
        for pid in (pids.read_text().split() if pids.exists() else []):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
