"""Nothing a runbook wrote is lost when its agent dies: kill -9 under load, with output the
agent had not read yet, for attempts the hub has already given up.

The fault: the agent hangs (SIGSTOP, as a stuck agent would) while its runbooks go on
printing, then is killed with kill -9 (as a watchdog would). The runbooks outlive it and
print on. The hub gives their attempts up when the leases expire and another machine runs
the jobs; then the first agent starts again. Every line each first attempt printed must
reach the hub, in order, once.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.test_hw1 import healthy, job, publish, start, wait_status
from tests.support import SQLITE_ONLY, Agent, Hub, wait_until

JOBS = 4


@pytest.fixture
def witness() -> Iterator[Path]:
    """A directory every runbook user may write to (runbooks may run as another user)."""
    path = Path(tempfile.mkdtemp(prefix="outpost-witness-"))
    os.chmod(path, 0o1777)
    yield path
    for item in path.iterdir():
        item.unlink()
    path.rmdir()


def output(hub: Hub, job_id: str) -> list[dict[str, object]]:
    got: list[dict[str, object]] = hub.api("GET", f"/v1/jobs/{job_id}/output").json()
    return got


def printed(witness: Path, job_id: str, attempt: int) -> list[str]:
    """The lines the runbook wrote to its stdout: each is noted after its write returned."""
    path = witness / f"{job_id}.{attempt}"
    return path.read_text().splitlines() if path.exists() else []


# SQLite only: the agent's spool across kill -9 (a report sent twice, on both databases:
# tests/unit/test_jobs_reports.py).
@SQLITE_ONLY
def test_everything_an_attempt_wrote_reaches_the_hub_after_kill_9(
        hub: Hub, agents: list[Agent], tmp_path: Path, witness: Path) -> None:
    # Attempt 1 prints until it is ended; a later attempt prints one line and ends.
    publish(hub, tmp_path, "chatty",
            f'if [ -e "{witness}/$OUTPOST_JOB_ID.started" ]; then echo again; exit 0; fi\n'
            f'touch "{witness}/$OUTPOST_JOB_ID.started"\n'
            'i=0\nwhile [ $i -lt 3000 ]; do i=$((i+1))\n'
            f'  echo "line $i" && echo "line $i" >> "{witness}/$OUTPOST_JOB_ID.1"\n'
            '  [ $((i % 10)) -eq 0 ] && echo "err $i" >&2\n'
            '  sleep 0.01\ndone\n')
    first = healthy(hub, tmp_path, agents, "w1", heartbeat_interval=1)
    ids = [start(hub, "chatty") for _ in range(JOBS)]
    for job_id in ids:
        wait_until(lambda j=job_id: len(printed(witness, j, 1)) > 5, 20,
                   what=f"job {job_id} to print")

    assert first.proc is not None
    os.kill(first.proc.pid, signal.SIGSTOP)  # the agent hangs; its runbooks print on
    time.sleep(1.5)
    first.proc.kill()  # then a watchdog kills it
    first.proc.wait()
    time.sleep(1.0)  # the runbooks outlive it

    healthy(hub, tmp_path, agents, "w2", heartbeat_interval=1)
    for job_id in ids:  # the hub gave the first attempts up and w2 ran the jobs
        done = wait_status(hub, job_id, "Completed", 60)
        assert done["attempts"][0]["reason"].startswith("lease expired"), done["attempts"]

    first.start()  # it ends the runbooks it left running and delivers what they wrote
    wait_until(lambda: not list((first.state_dir / "spool").glob("*.jsonl")), 30,
               what="the first agent's leftover spools to be delivered")
    for job_id in ids:
        wrote = printed(witness, job_id, 1)
        got = output(hub, job_id)
        base = 0  # attempt 1's records are numbered from 0
        mine = [r for r in got if int(str(r["seq"])) < base + (1 << 32)]
        lines = [r["text"] for r in mine if r["stream"] == "Output"]
        assert len(wrote) > 100  # it printed on while the agent was stopped and dead
        assert lines[:len(wrote)] == wrote, (
            f"job {job_id}: the runbook wrote {len(wrote)} lines, the hub has "
            f"{len(lines)}; first missing: {next((w for w in wrote if w not in lines), None)}")
        seqs = [int(str(r["seq"])) for r in mine]
        assert seqs == list(range(len(seqs)))  # once each, in order
        errors = [r["text"] for r in mine if r["stream"] == "Error"]
        assert errors == [f"err {i}" for i in range(10, len(wrote) + 1, 10)][:len(errors)]
        assert len(errors) >= len(wrote) // 10 - 1
        assert job(hub, job_id)["status"] == "Completed"
