"""The shortest path a user takes: a hub, a registered agent, a Healthy machine."""

from __future__ import annotations

from pathlib import Path

from tests.support import Agent, Hub, registered_agent, wait_until


def test_registered_agent_becomes_healthy(hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    agent = registered_agent(hub, tmp_path, "m1")
    agents.append(agent.start())
    machine = wait_until(lambda: hub.machines().get("m1", {}).get("status") == "Healthy"
                         and hub.machines()["m1"], 15, what="m1 to be Healthy")
    assert machine["group"] == "web"
    listing = hub.cli("machine", "list")
    assert listing.returncode == 0, listing.stderr
    assert "m1" in listing.stdout and "Healthy" in listing.stdout
