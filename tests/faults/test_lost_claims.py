"""A claim the machine never received is not a failed activation (HW-1 counts only real ones).

The hub claims a job for a machine in the answer to its long-poll (or to its reports). When
that answer is lost on the way, the job waits out its lease: the machine's heartbeats go on
without listing it. The hub then queues it again without counting a failed activation; a
machine that stopped heartbeating still fails it, and a job some agent drops without a word
every time is counted after NOT_RECEIVED_MAX such losses, so it cannot circle for ever.

The first test loses the answer for real, in a proxy between a real agent and the hub. The
second speaks the agent's protocol itself, signed with the machine's own key, so that it
decides exactly which answers are lost and when heartbeats are sent.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from outpost.hub.jobs import NOT_RECEIVED, NOT_RECEIVED_MAX
from tests.proxy import connect_proxy
from tests.support import (
    Agent,
    Hub,
    machine_calls,
    publish_script,
    query,
    register,
    wait_until,
)


def _job(hub: Hub, job_id: str) -> dict[str, Any]:
    answer = hub.api("GET", f"/v1/jobs/{job_id}")
    assert answer.status_code == 200, answer.text
    data: dict[str, Any] = answer.json()
    return data


def _activations(hub: Hub, job_id: str) -> int:
    return int(query(hub.database_url, f"SELECT activations FROM jobs WHERE id = '{job_id}'")
               [0][0])


def test_an_answer_lost_in_a_proxy_costs_the_job_no_activation(
        hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    publish_script(hub, tmp_path, "hello", "echo hello\n")
    with connect_proxy() as proxy:
        state = tmp_path / "agent-w1"
        assert register(hub, state, "w1").returncode == 0
        agent = Agent(state, "w1", {"heartbeat_interval": 1, "proxy": proxy.url,
                                    "backoff_max": 1})
        agents.append(agent.start())
        wait_until(lambda: hub.machines()["w1"]["status"] == "Healthy", 15,
                   what="w1 healthy through the proxy")
        wait_until(lambda: _long_polls_open(hub) >= 1, 15,
                   what="the agent's long-poll to be waiting at the hub")

        proxy.swallow = True  # whatever the hub answers now never reaches the agent
        answer = hub.api("POST", "/v1/jobs", json={"runbook": "hello", "group": "web"})
        assert answer.status_code == 201, answer.text
        job_id = answer.json()["id"]
        wait_until(lambda: proxy.swallowed > 0 and _job(hub, job_id)["status"] == "Activating",
                   15, what="the claim's answer to be lost")
        proxy.swallow = False

        try:
            done = wait_until(lambda: (j := _job(hub, job_id))["status"] == "Completed" and j,
                              30, 0.2, what="the job to be queued again and run")
        except AssertionError:
            print(_job(hub, job_id), agent.log()[-3000:], hub.log()[-5000:])
            raise
    reasons = [a["reason"] for a in done["attempts"]]
    assert reasons == [NOT_RECEIVED, "exit code 0"], reasons
    assert _activations(hub, job_id) == 1  # the attempt that ran; the lost one not counted
    out = hub.api("GET", f"/v1/jobs/{job_id}/output").json()
    assert [r["text"] for r in out] == ["hello"]


def test_only_a_machine_that_heartbeats_on_is_excused_and_only_so_often(
        hub: Hub, tmp_path: Path) -> None:
    publish_script(hub, tmp_path, "noop", "true\n")
    call = machine_calls(hub, tmp_path / "agent-m1")

    def beat() -> None:  # a machine that holds no job, every 0.5 s (its interval is 1 s)
        call("POST", "/v1/agent/heartbeat", {"agent_version": "9.9.9", "heartbeat_interval": 1,
                                             "jobs": []})

    def claim_and_lose(number: int, heartbeats: bool) -> dict[str, Any]:
        items = call("POST", "/v1/agent/poll?wait=0&capacity=1")["items"]
        assert [(i["payload"]["job_id"], i["payload"]["attempt"]) for i in items] == \
            [(job_id, number)]  # ... and the answer is dropped here
        deadline = time.monotonic() + 20
        while (now := _job(hub, job_id))["status"] != "Queued":
            assert time.monotonic() < deadline, f"attempt {number} never expired: {now}"
            if heartbeats:
                beat()
            time.sleep(0.5)
        return now

    beat()
    answer = hub.api("POST", "/v1/jobs", json={"runbook": "noop", "group": "web"})
    assert answer.status_code == 201, answer.text
    job_id = answer.json()["id"]

    # No heartbeat after the claim: the machine may have died holding it. Counted.
    now = claim_and_lose(1, heartbeats=False)
    assert now["attempts"][-1]["reason"].startswith("lease expired"), now["attempts"]
    assert now["reason"].startswith("activation 1 failed")
    assert _activations(hub, job_id) == 1

    # Heartbeats go on without the job: the claim never arrived. Not counted, up to the cap.
    for number in range(2, 2 + NOT_RECEIVED_MAX):
        now = claim_and_lose(number, heartbeats=True)
        assert now["attempts"][-1]["reason"] == NOT_RECEIVED
        assert _activations(hub, job_id) == 1

    # Past the cap the same loss is a failed activation again.
    number = 2 + NOT_RECEIVED_MAX
    now = claim_and_lose(number, heartbeats=True)
    assert now["attempts"][-1]["reason"].startswith("lease expired"), now["attempts"]
    assert now["reason"].startswith("activation 2 failed")
    assert _activations(hub, job_id) == 2
    assert [a["number"] for a in now["attempts"]] == list(range(1, number + 1))


def _long_polls_open(hub: Hub) -> float:
    """The hub's outpost_long_polls_open gauge: the long-polls it holds now."""
    text = hub.api("GET", "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("outpost_long_polls_open"))
