"""ED-4: the agent keeps retrying while no hub answers, and fails over between hub URLs.

The hub is really stopped and started again on the same port; the "first hub" of the
fail-over test is a real closed port on this machine.
"""

from __future__ import annotations

import time
from pathlib import Path


from tests.support import (SQLITE_ONLY, Agent, Hub, free_port, last_beat, registered_agent,
                           run_cli, wait_until)


# SQLite only: the agent waiting for a hub, not the database.
@SQLITE_ONLY
def test_an_agent_started_while_the_hub_is_down_connects_when_it_comes_up(
        hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    agent = registered_agent(hub, tmp_path, "f1", backoff_max=2)
    hub.stop()
    agents.append(agent.start())
    # It logs each failed try with its kind, and keeps trying: three tries, still running.
    wait_until(lambda: agent.log().count("hub unreachable (refused)") >= 3, 30,
               what="three refused tries in the agent's log")
    assert agent.proc is not None and agent.proc.poll() is None
    status = agent.status()
    assert status is not None and status["last_error"]["kind"] == "refused"
    assert status["last_error"]["code"] == "E2004"
    pid = agent.proc.pid

    hub.start()  # the same port as before
    started = time.time()
    wait_until(lambda: last_beat(hub, "f1") > started, 30, what="a heartbeat after the outage")
    assert agent.proc.poll() is None and agent.proc.pid == pid  # never restarted
    assert hub.machines()["f1"]["status"] == "Healthy"
    # The hub records a heartbeat carried by a poll as the poll arrives, and acknowledges
    # it when the poll returns (a second here, the agent's heartbeat interval).
    wait_until(lambda: "heartbeat acknowledged again" in agent.log(), 10,
               what="the acknowledgement logged")


def test_the_agent_fails_over_from_a_closed_port_to_the_second_hub_url(
        sqlite_hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    closed = f"https://localhost:{free_port()}"  # nothing listens there
    state = tmp_path / "agent-f2"
    args = sqlite_hub.register_args(state, "f2")
    at = args.index("--hub")
    args[at + 1: at + 2] = [closed, "--hub", sqlite_hub.url]
    result = run_cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    assert f"hub {closed} unreachable (refused)" in result.stderr  # registration tried it
    assert '"hub_urls": [' in result.stdout and closed in result.stdout

    agent = Agent(state, "f2")
    agents.append(agent.start())
    wait_until(lambda: last_beat(sqlite_hub, "f2") > 0, 30, what="heartbeats via the 2nd URL")
    switched = f"now talking to hub {sqlite_hub.url} ({closed} did not answer)"
    log = wait_until(lambda: switched in agent.log() and agent.log(), 10, what=switched)
    assert f"hub {closed} unreachable (refused)" in log
    status = agent.status()
    assert status is not None
    assert status["hub_urls"] == [closed, sqlite_hub.url]
    assert status["hub_url"] == sqlite_hub.url
    # It stays on the hub that answered: the closed port is not tried for every request.
    tries = log.count(f"hub {closed} unreachable")
    time.sleep(3)
    assert agent.log().count(f"hub {closed} unreachable") == tries


def test_config_hub_urls_override_the_registration(
        sqlite_hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    closed = f"https://localhost:{free_port()}"
    agent = registered_agent(sqlite_hub, tmp_path, "f3", hub_urls=[closed, sqlite_hub.url])
    agents.append(agent.start())
    wait_until(lambda: last_beat(sqlite_hub, "f3") > 0, 30, what="heartbeats via the 2nd URL")
    assert f"hub {closed} unreachable (refused)" in agent.log()


def test_registering_while_the_hub_is_down_fails_plainly(
        sqlite_hub: Hub, tmp_path: Path) -> None:
    state = tmp_path / "agent-f4"
    sqlite_hub.stop()
    began = time.monotonic()
    result = run_cli(*sqlite_hub.register_args(state, "f4"), timeout=60)
    assert time.monotonic() - began < 30  # it does not hang: 'agent run' is what retries
    assert result.returncode == 1, result.stdout + result.stderr
    text = result.stdout + result.stderr
    assert "E2004" in text and "refused" in text
    assert "Traceback" not in text
    assert not (state / "registration.json").exists()
    assert not (state / "machine.key").exists()
