"""An idle agent keeps one connection to the hub: its heartbeat goes out on the connection
its long-poll has just freed (agent/turns.py), so the hub holds one descriptor per agent,
not two, and heartbeats reuse that connection rather than paying a TLS handshake each."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from tests.support import Agent, Hub, healthy_agent


def _connections(pid: int, port: int) -> int:
    return sum(1 for c in psutil.Process(pid).net_connections(kind="tcp")
               if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)


@pytest.mark.parametrize("interval,poll", [(2.0, 25.0), (2.5, 2.0)],
                         ids=["polls-held-until-the-heartbeat", "heartbeats-sent-early"])
def test_an_idle_agent_holds_one_connection_to_the_hub(
        sqlite_hub: Hub, agents: list[Agent], tmp_path: Path, interval: float,
        poll: float) -> None:
    hub = sqlite_hub
    agent = healthy_agent(hub, tmp_path, agents, "m1", heartbeat_interval=interval,
                          poll_timeout=poll)
    assert agent.proc is not None
    before = hub.machines()["m1"]["last_heartbeat_at"]
    seen: list[int] = []
    deadline = time.monotonic() + 8.0  # three heartbeats or more, each beside a long-poll
    while time.monotonic() < deadline:
        seen.append(_connections(agent.proc.pid, hub.port))
        time.sleep(0.05)
    assert hub.machines()["m1"]["last_heartbeat_at"] >= before + 4.0, "no heartbeats"
    assert max(seen) == 1, f"connections to the hub seen: {sorted(set(seen))}"
    assert "heartbeat failed" not in agent.log()
