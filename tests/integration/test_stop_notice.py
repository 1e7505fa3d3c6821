"""A graceful stop tells the hub: the machine shows Stopped at once, with when, until its
next heartbeat; a silent death (kill -9) still waits for missed heartbeats."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path
from typing import Any

from tests.support import SQLITE_ONLY, Agent, Hub, healthy_agent, run_cli, wait_until


def _machine(hub: Hub, name: str) -> dict[str, Any]:
    done = hub.cli("machine", "list", "--json")
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return next(m for m in rows if m["name"] == name)


def _status(hub: Hub, name: str) -> str:
    """The machine's status from GET /v1/machines (the rows ``machine list --json``
    prints), for the waits: a command each poll would cost a Python process each time."""
    return str(hub.machines()[name]["status"])


def _table_status(hub: Hub, name: str) -> str:
    done = hub.cli("machine", "list")
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.lstrip().startswith(name))
    return [cell.strip() for cell in line.split("\u2502")][4]


# SQLite only: the agent's stop notice on SIGTERM (the conditional update behind it runs on both
# databases in tests/unit/test_poll_heartbeat.py).
@SQLITE_ONLY
def test_sigterm_shows_stopped_at_once_and_a_heartbeat_heals_it(
        hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    agent = healthy_agent(hub, tmp_path, agents, "m1")
    assert _machine(hub, "m1")["stopped_at"] is None

    stopped = time.time()
    assert agent.stop(signal.SIGTERM) == 0, agent.log()
    # The stop is recorded before the agent exits: no wait for missed heartbeats (3 s here).
    machine = _machine(hub, "m1")
    assert machine["status"] == "Stopped", (machine, agent.log())
    assert stopped - 1 <= machine["stopped_at"] <= time.time(), machine
    assert re.fullmatch(r"Stopped [0-9]+s ago", _table_status(hub, "m1"))
    shown = hub.cli("machine", "show", "m1")
    assert re.search(r"^status: +Stopped [0-9]+s ago$", shown.stdout, re.M), shown.stdout
    assert re.search(r"^stopped_at: +\d{4}-\d\d-\d\d ", shown.stdout, re.M), shown.stdout
    assert "the hub was told this agent is stopping" in agent.log()
    # It stays Stopped past the missed-heartbeat window: the hub knows, it does not guess.
    time.sleep(3.5)
    assert _machine(hub, "m1")["status"] == "Stopped"

    # The agent side says so too.
    check = run_cli("check", "--state-dir", str(agent.state_dir))
    assert check.returncode == 1
    assert re.search(r"it was stopped \d+ s ago, and the hub at https://\S+ was told "
                     r"\(it shows the machine Stopped\)", check.stdout), check.stdout

    status = run_cli("agent", "status", "--state-dir", str(agent.state_dir))
    assert status.returncode == 3
    assert re.search(r"It was stopped [0-9]+s ago; the hub at https://\S+ was told",
                     status.stdout), status.stdout

    agents.append(agent.start())  # the next heartbeat makes it Healthy again
    wait_until(lambda: _status(hub, "m1") == "Healthy", 10, 0.1, "m1 Healthy")
    assert _machine(hub, "m1")["stopped_at"] is None
    assert _table_status(hub, "m1") == "Healthy"


# SQLite only: the agent killed without a notice, not the database.
@SQLITE_ONLY
def test_kill_9_waits_for_missed_heartbeats(hub: Hub, agents: list[Agent],
                                            tmp_path: Path) -> None:
    agent = healthy_agent(hub, tmp_path, agents, "m1")
    assert agent.proc is not None
    agent.proc.kill()
    agent.proc.wait()
    killed = time.monotonic()
    # Nothing told the hub. (Read over HTTP: a CLI process takes a second or more to start
    # on a loaded machine, and the machine turns Unresponsive 3 s after its last beat.)
    assert _status(hub, "m1") == "Healthy"
    wait_until(lambda: _status(hub, "m1") == "Unresponsive", 8, 0.2, "m1 Unresponsive")
    assert time.monotonic() - killed >= 1.0
    assert _machine(hub, "m1")["stopped_at"] is None


# SQLite only: the agent's stop without a hub, not the database.
@SQLITE_ONLY
def test_an_absent_hub_does_not_hold_the_stop_up(hub: Hub, agents: list[Agent],
                                                 tmp_path: Path) -> None:
    agent = healthy_agent(hub, tmp_path, agents, "m1")
    hub.stop()
    began = time.monotonic()
    assert agent.stop(signal.SIGTERM) == 0, agent.log()
    assert time.monotonic() - began < 5.0, agent.log()
    assert "could not tell the hub this agent is stopping" in agent.log()
    check = run_cli("check", "--state-dir", str(agent.state_dir))
    assert "no hub answered its stop notice" in check.stdout, check.stdout
    hub.start()
    assert _machine(hub, "m1")["status"] != "Stopped"


def test_a_job_running_at_a_graceful_stop_runs_again_as_before(
        hub: Hub, agents: list[Agent], tmp_path: Path, shared: Path) -> None:
    """The stop notice changes only the machine's status: the job the agent held is ended
    and, once its lease runs out, queued again and run by the agent started again."""
    from tests.support import publish_script

    marker = shared / "first-attempt"
    publish_script(hub, tmp_path, "twice", f'if [ -e "{marker}" ]; then echo second; '
                   f'else touch "{marker}"; sleep 60; fi\n')
    agent = healthy_agent(hub, tmp_path, agents, "m1")
    started = hub.cli("job", "start", "twice", "--group", "web", "--json")
    assert started.returncode == 0, started.stderr
    job_id = json.loads(started.stdout)["id"]
    wait_until(marker.exists, 15, 0.1, "the first attempt to start")

    assert agent.stop(signal.SIGTERM) == 0, agent.log()
    assert _machine(hub, "m1")["status"] == "Stopped"
    agents.append(agent.start())

    def ended() -> bool:
        status = hub.api("GET", f"/v1/jobs/{job_id}").json()["status"]
        return status in ("Completed", "Failed", "Suspended")

    wait_until(ended, 40, 0.2, "the job to end")
    job: dict[str, Any] = json.loads(hub.cli("job", "show", job_id, "--json").stdout)
    assert job["status"] == "Completed", job
    assert len(job["attempts"]) == 2, job
    output = hub.cli("job", "output", job_id)
    assert output.stdout.strip() == "second", output.stdout
