"""Nothing is lost, nothing duplicated, the order holds: HW-8's streams through real faults.

The hub is stopped for 15 seconds while a job prints (three times the job's 5 s lease, and
long enough for the agent's upload retries to back off to their 10 s cap); an agent is killed
with kill -9 while its spool holds output the hub has not seen.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.faults.test_hw1 import healthy, job, publish, start, wait_status
from tests.support import SQLITE_ONLY, Agent, Hub, wait_until


def records(hub: Hub, job_id: str) -> list[dict[str, object]]:
    out: list[dict[str, object]] = hub.api("GET", f"/v1/jobs/{job_id}/output").json()
    return out


OUTAGE = 15.0
LINES = 250  # printed over 25 s: before, through and after the outage


# SQLite only: the agent's spool while the hub is away, not the database.
@SQLITE_ONLY
def test_output_survives_15_seconds_without_the_hub(hub: Hub, agents: list[Agent],
                                                    tmp_path: Path) -> None:
    publish(hub, tmp_path, "steady", f'for i in $(seq 1 {LINES}); do echo "line $i"; '
            'echo "err $i" >&2; sleep 0.1; done\n')
    healthy(hub, tmp_path, agents, "w1")
    job_id = start(hub, "steady")
    wait_until(lambda: len(records(hub, job_id)) > 10, 15, what="the first records")

    hub.stop()
    time.sleep(OUTAGE)  # the agent is cut off; the runbook goes on printing into the spool
    hub.start()
    assert job(hub, job_id)["status"] == "Running"  # it prints on after the outage too

    done = wait_status(hub, job_id, "Completed", 60)
    assert len(done["attempts"]) == 1  # the outage did not cost the activation
    got = records(hub, job_id)
    assert [r["seq"] for r in got] == list(range(2 * LINES))  # each once, none missing
    assert [r["text"] for r in got if r["stream"] == "Output"] == \
        [f"line {i}" for i in range(1, LINES + 1)]
    assert [r["text"] for r in got if r["stream"] == "Error"] == \
        [f"err {i}" for i in range(1, LINES + 1)]


# SQLite only: the agent's spool across kill -9, not the database.
@SQLITE_ONLY
def test_spooled_output_survives_kill_9_of_the_agent(hub: Hub, agents: list[Agent],
                                                     tmp_path: Path) -> None:
    publish(hub, tmp_path, "burst",
            'sleep 1\nfor i in $(seq 1 3000); do echo "row $i"; done\necho done >&2\n')
    agent = healthy(hub, tmp_path, agents, "w1", backoff_max=2)
    job_id = start(hub, "burst")
    wait_status(hub, job_id, "Running", 15)
    hub.stop()  # from here on the output can only go to the spool

    def ended() -> bool:
        spools = list((agent.state_dir / "spool").glob("*.jsonl"))
        return bool(spools) and spools[0].read_bytes().rstrip().rsplit(b"\n", 1)[-1] \
            .startswith(b'{"end"')

    wait_until(ended, 20, what="the runbook to end into the spool")
    assert agent.proc is not None
    agent.proc.kill()  # kill -9 with 3,001 records and the job's end not yet delivered
    agent.proc.wait()

    hub.start()
    agent.start()
    done = wait_status(hub, job_id, "Completed", 30)
    assert [a["reason"] for a in done["attempts"]] == ["exit code 0"]
    got = records(hub, job_id)
    assert [r["seq"] for r in got] == list(range(3001))
    assert [r["text"] for r in got if r["stream"] == "Output"] == \
        [f"row {i}" for i in range(1, 3001)]
    assert job(hub, job_id)["exit_code"] == 0
    wait_until(lambda: not list((agent.state_dir / "spool").glob("*.jsonl")), 10,
               what="the delivered spool to be removed")
