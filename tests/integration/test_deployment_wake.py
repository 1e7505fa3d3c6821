"""A deployment aimed at one machine reaches its agent through the long-poll in
milliseconds, not at its next heartbeat; one aimed at a group arrives with each machine's
heartbeat (spread over the interval, as extension goals are)."""

from __future__ import annotations

import time
from pathlib import Path

from tests.support import Agent, Hub, registered_agent, wait_until


def _module(agent: Agent) -> dict[str, object] | None:
    status = agent.status() or {}
    modules = (status.get("modules") or {}).get("modules") or []
    return next((m for m in modules if m["name"] == "idle" and m["state"] == "running"), None)


def test_a_machine_deployment_wakes_the_poll_and_its_removal_too(
        sqlite_hub: Hub, tmp_path: Path, agents: list[Agent]) -> None:
    hub = sqlite_hub
    # A heartbeat every 5 minutes: only the long-poll can bring the deployment in time.
    agent = registered_agent(hub, tmp_path, "m1", heartbeat_interval=300)
    agents.append(agent.start())
    wait_until(lambda: agent.status(), 15, what="the agent's status")
    wait_until(lambda: hub.machines()["m1"]["status"] == "Healthy", 15, what="Healthy")
    manifest = tmp_path / "idle.yaml"
    manifest.write_text("modules:\n  idle:\n    command: [/bin/sleep, '3600']\n")
    started = time.monotonic()
    made = hub.cli("deployment", "create", "idle", str(manifest), "--machine", "m1")
    assert made.returncode == 0, made.stderr
    wait_until(lambda: _module(agent), 10, 0.05, "the module running")
    # The poll took the change: far sooner than the 300 s heartbeat (the CLI's own start is
    # most of this).
    assert time.monotonic() - started < 10
    deleted = hub.cli("deployment", "delete", "idle")
    assert deleted.returncode == 0, deleted.stderr
    wait_until(lambda: not (agent.status() or {}).get("modules", {}).get("modules"), 10,
               what="the module removed")
    assert "Traceback" not in agent.log()
