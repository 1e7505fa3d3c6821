"""HW-1, HW-1a, HW-1b: activations that fail for real, run-as users, and backpressure.

Each test creates the fault itself: a sandbox killed by SIGKILL, an agent killed with kill -9,
a run-as user that does not exist, a machine over its memory threshold.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support import SQLITE_ONLY, Agent, Hub, publish_script, registered_agent, wait_until

ACTIVATE_FAILED = ("The job action 'Activate' cannot be run, because the process stopped "
                   "unexpectedly. The job action was attempted three times.")


publish = publish_script


def healthy(hub: Hub, tmp_path: Path, agents: list[Agent], name: str,
            **config: Any) -> Agent:
    agent = registered_agent(hub, tmp_path, name, **config)
    agents.append(agent.start())
    wait_until(lambda: hub.machines()[name]["status"] == "Healthy", 15, what=f"{name} healthy")
    return agent


def start(hub: Hub, runbook: str, group: str = "web", **params: str) -> str:
    response = hub.api("POST", "/v1/jobs", json={"runbook": runbook, "group": group,
                                                 "params": params})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def job(hub: Hub, job_id: str) -> dict[str, Any]:
    response = hub.api("GET", f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def wait_status(hub: Hub, job_id: str, status: str, timeout: float = 30) -> dict[str, Any]:
    return wait_until(lambda: (j := job(hub, job_id))["status"] == status and j, timeout, 0.1,
                      what=f"job {job_id} to be {status}")


def texts(hub: Hub, job_id: str) -> list[str]:
    return [r["text"] for r in hub.api("GET", f"/v1/jobs/{job_id}/output").json()]


def test_a_sandbox_killed_three_times_suspends_the_job(hub: Hub, agents: list[Agent],
                                                        tmp_path: Path) -> None:
    """HW-1: three failed activations suspend the job with the documented text; resume
    starts the count again."""
    publish(hub, tmp_path, "crash", 'echo "attempt"\nkill -9 $$\n')
    healthy(hub, tmp_path, agents, "w1")
    job_id = start(hub, "crash")
    done = wait_status(hub, job_id, "Suspended")
    assert done["reason"] == ACTIVATE_FAILED
    assert [a["number"] for a in done["attempts"]] == [1, 2, 3]
    for attempt in done["attempts"]:
        assert attempt["signal"] == signal.SIGKILL and attempt["ended_at"] is not None
        assert "killed by SIGKILL, not by the agent" in attempt["reason"]
    assert texts(hub, job_id) == ["attempt"] * 3  # every attempt's output, once each

    shown = hub.cli("job", "show", job_id)
    assert "attempted three times" in shown.stdout and "SIGKILL" in shown.stdout

    resumed = hub.cli("job", "resume", job_id, "--json")
    assert resumed.returncode == 0, resumed.stderr
    # The job as read after the resume committed: an agent woken by it may have claimed it
    # already (milliseconds), so it is Queued or further along, never still Suspended.
    assert json.loads(resumed.stdout)["status"] in ("Queued", "Activating", "Running")
    again = wait_until(lambda: len((j := job(hub, job_id))["attempts"]) == 6
                       and j["status"] == "Suspended" and j, 30, 0.1, what="three more tries")
    assert [a["number"] for a in again["attempts"]] == [1, 2, 3, 4, 5, 6]


def test_a_killed_agent_loses_its_lease_and_another_machine_runs_the_job(
        hub: Hub, agents: list[Agent], tmp_path: Path, shared: Path) -> None:
    """HW-1: kill -9 the agent mid-job; the lease expires and a healthy machine of the group
    runs it. The restarted agent ends the runbook its predecessor left behind."""
    flag = shared / "first-try"
    publish(hub, tmp_path, "once", f'if [ -e "{flag}" ]; then echo second; exit 0; fi\n'
            f'touch "{flag}"\necho "pid $$"\nsleep 120\n')
    first = healthy(hub, tmp_path, agents, "w1")
    job_id = start(hub, "once")
    wait_until(lambda: any(t.startswith("pid ") for t in texts(hub, job_id)), 15,
               what="the runbook to start")
    orphan = int(next(t for t in texts(hub, job_id) if t.startswith("pid "))[4:])
    healthy(hub, tmp_path, agents, "w2")

    assert first.proc is not None
    first.proc.kill()  # kill -9: no goodbye to the hub
    first.proc.wait()
    assert psutil.pid_exists(orphan)  # the runbook outlived its agent

    done = wait_status(hub, job_id, "Completed", 40)
    ids = {m["name"]: m["id"] for m in hub.machines().values()}
    assert [(a["number"], a["machine_id"]) for a in done["attempts"]] == [
        (1, ids["w1"]), (2, ids["w2"])]
    assert done["attempts"][0]["reason"].startswith("lease expired")
    assert done["attempts"][1]["reason"] == "exit code 0"
    assert texts(hub, job_id) == [f"pid {orphan}", "second"]

    # The agent, started again, ends what it left running and reports it; the hub already
    # gave that attempt up, so nothing changes for the job.
    first.start()
    wait_until(lambda: not psutil.pid_exists(orphan) or
               psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE, 15,
               what="the leftover runbook to be ended")
    wait_until(lambda: not list((first.state_dir / "spool").glob("*.jsonl")), 15,
               what="the leftover spool to be delivered")
    assert job(hub, job_id)["status"] == "Completed"
    assert "delivering attempt 1 spooled by the last run" in first.log()


def test_stop_suspend_and_resume(hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    publish(hub, tmp_path, "ticker", 'echo "pid $$"\n'
            'for i in $(seq 1 600); do echo "tick $i"; sleep 0.1; done\n')
    healthy(hub, tmp_path, agents, "w1")
    job_id = start(hub, "ticker")
    wait_until(lambda: len(texts(hub, job_id)) > 3, 15, what="ticks")
    pid = int(texts(hub, job_id)[0][4:])

    assert hub.cli("job", "suspend", job_id).returncode == 0
    wait_status(hub, job_id, "Suspended", 15)
    assert psutil.Process(pid).status() == psutil.STATUS_STOPPED  # paused, not ended
    time.sleep(0.5)
    held = len(texts(hub, job_id))
    time.sleep(1.0)
    assert len(texts(hub, job_id)) == held

    assert hub.cli("job", "resume", job_id).returncode == 0
    wait_status(hub, job_id, "Running", 15)
    wait_until(lambda: len(texts(hub, job_id)) > held + 3, 15, what="ticks after resume")

    stopped = hub.cli("job", "stop", job_id)
    assert stopped.returncode == 0, stopped.stderr
    done = wait_status(hub, job_id, "Stopped", 15)
    assert done["reason"].startswith("stopped by the operator; killed by SIGTERM")
    assert done["attempts"][0]["signal"] == signal.SIGTERM
    wait_until(lambda: not psutil.pid_exists(pid), 10, what="the process group to end")

    # An ended job cannot be stopped again, and only a Suspended job resumes.
    again = hub.cli("job", "stop", job_id)
    assert again.returncode == 1 and "E4009" in again.stderr and "Stopped" in again.stderr
    assert hub.cli("job", "resume", job_id).returncode == 1


def test_queued_jobs_are_stopped_and_suspended_without_a_machine(hub: Hub) -> None:
    hub.cli("runbook", "publish", "noop", "/dev/null", "--type", "sh")
    first, second = start(hub, "noop", "empty"), start(hub, "noop", "empty")
    assert json.loads(hub.cli("job", "stop", first, "--json").stdout)["status"] == "Stopped"
    assert json.loads(hub.cli("job", "suspend", second, "--json").stdout)["status"] \
        == "Suspended"
    assert json.loads(hub.cli("job", "resume", second, "--json").stdout)["status"] == "Queued"
    other = hub.api("POST", "/v1/accounts", json={"name": "other"}).json()
    foreign = hub.api("POST", f"/v1/jobs/{second}/stop", token=other["token"])
    assert foreign.status_code == 404  # another account's job does not exist for it
    assert job(hub, second)["status"] == "Queued"


# SQLite only: the agent's run-as user on the machine, not the database.
@SQLITE_ONLY
@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")
def test_run_as_user_of_the_group(hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    """HW-1a: a root agent runs the group's runbooks as its run-as user, who cannot read
    the machine key; a user that does not exist fails the job and is named."""
    agent = healthy(hub, tmp_path, agents, "w1")
    publish(hub, tmp_path, "whoami", "id -un\n"
            f'cat "{agent.state_dir}/machine.key" && echo KEY-READ || echo key-refused\n')
    assert hub.cli("group", "set", "web", "--run-as", "nobody").returncode == 0
    listed = json.loads(hub.cli("group", "list", "--json").stdout)
    assert {"name": "web", "machines": 1, "run_as": "nobody", "memory_mb": None,
            "cpus": None, "max_processes": None} in listed

    done = hub.cli("job", "start", "whoami", "--group", "web", "--wait", "--json")
    assert done.returncode == 0, done.stderr
    out = texts(hub, json.loads(done.stdout)["id"])
    assert out[0] == "nobody"
    assert "key-refused" in out and "KEY-READ" not in out

    assert hub.cli("group", "set", "web", "--run-as", "no-such-user-x").returncode == 0
    failed = hub.cli("job", "start", "whoami", "--group", "web", "--wait", "--json")
    assert failed.returncode == 1
    result = json.loads(failed.stdout)
    assert result["status"] == "Failed" and len(result["attempts"]) == 1  # not retried
    assert "'no-such-user-x'" in result["reason"] and "does not exist" in result["reason"]
    assert any("no-such-user-x" in t for t in texts(hub, result["id"]))


# SQLite only: the agent's reading of an exit code, not the database.
@SQLITE_ONLY
def test_exit_code_255_is_explained(hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    """HW-1a: 4294967295 is -1 seen as unsigned; the job says so, and is not retried."""
    publish(hub, tmp_path, "minus1", "exit -1\n")
    healthy(hub, tmp_path, agents, "w1")
    done = hub.cli("job", "start", "minus1", "--group", "web", "--wait", "--json")
    result = json.loads(done.stdout)
    assert result["status"] == "Failed" and result["exit_code"] == 255
    assert "4294967295" in result["reason"] and len(result["attempts"]) == 1


# SQLite only: the agent's memory pressure, not the database.
@SQLITE_ONLY
def test_a_machine_under_memory_pressure_takes_no_job(hub: Hub, agents: list[Agent],
                                                      tmp_path: Path) -> None:
    """HW-1b: above its memory threshold the agent claims nothing and the machine list says
    why; a machine without pressure in the same group runs the job."""
    publish(hub, tmp_path, "hi", "echo hi\n")
    # Any machine uses more than 0.1 % of its memory: the threshold makes the fault real.
    healthy(hub, tmp_path, agents, "busy", max_memory_percent=0.1, pressure_seconds=0,
            max_cpu_percent=100)
    wait_until(lambda: hub.machines()["busy"]["not_taking_work"], 15,
               what="the pressure to show")
    why = hub.machines()["busy"]["not_taking_work"]
    assert why.startswith("memory at ") and "above the 0.1% threshold" in why
    listed = hub.cli("machine", "list").stdout  # a table: the reason may wrap
    assert "not taking" in listed and "memory" in listed and "threshold" in listed

    job_id = start(hub, "hi")
    time.sleep(2)
    assert job(hub, job_id)["status"] == "Queued"  # the busy machine did not claim it
    healthy(hub, tmp_path, agents, "idle")
    done = wait_status(hub, job_id, "Completed", 20)
    assert done["machine_id"] == hub.machines()["idle"]["id"]
