"""A machine whose disk fills while a job runs (the agent's state on a small tmpfs).

The spool is where the agent keeps a job's output before the hub has it; when the disk
refuses it, the attempt ends as a failed activation naming the disk (the machine's fault, not
the runbook's), its process group with it, and the agent goes on. Before, the job stayed
Running with its runbook blocked on a full pipe, and the agent logged a traceback. With
``min_free_disk_mb`` the machine then takes no more work until the disk is freed.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import psutil

from tests.support import (SQLITE_ONLY, Agent, Hub, publish_script, register, small_tmpfs,
                           wait_until)

ACTIVATE_FAILED = ("The job action 'Activate' cannot be run, because the process stopped "
                   "unexpectedly. The job action was attempted three times.")


def _job(hub: Hub, job_id: str) -> dict:  # type: ignore[type-arg]
    answer = hub.api("GET", f"/v1/jobs/{job_id}")
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


def _runbooks_under(path: Path) -> list[int]:
    """Processes whose working directory is under ``path`` (a runbook left behind)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if str(proc.cwd()).startswith(str(path)):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


# SQLite only: a full disk on the agent's machine, not the database.
@SQLITE_ONLY
def test_a_full_disk_ends_the_attempt_and_the_job_resumes_once_freed(
        hub: Hub, agents: list[Agent], tmp_path: Path, shared: Path) -> None:
    agent: Agent | None = None
    with small_tmpfs(tmp_path / "small", "4m") as mount:
        try:
            flag = shared / "small-output"
            # About 12 MB of output, three times the disk; once the flag exists, one line.
            publish_script(hub, tmp_path, "flood",
                           f'if [ -e "{flag}" ]; then echo fits; exit 0; fi\n'
                           'for i in $(seq 1 120000); do\n'
                           '  echo "line $i ....................................................'
                           '......................................"\n'
                           'done\n')
            state = mount / "agent"
            assert register(hub, state, "small", "tiny").returncode == 0
            # First without the disk floor: the job is taken and fails on the disk each time.
            agent = Agent(state, "small", {"heartbeat_interval": 1, "backoff_max": 1,
                                           "min_free_disk_mb": 0})
            agents.append(agent.start())
            wait_until(lambda: hub.machines()["small"]["status"] == "Healthy", 15,
                       what="the agent on the small disk to be Healthy")

            answer = hub.api("POST", "/v1/jobs", json={"runbook": "flood", "group": "tiny"})
            assert answer.status_code == 201, answer.text
            job_id = answer.json()["id"]
            suspended = wait_until(lambda: (j := _job(hub, job_id))["status"] == "Suspended" and j,
                                   60, 0.2, what="three failed activations on the full disk")
            assert suspended["reason"] == ACTIVATE_FAILED
            reasons = [a["reason"] for a in suspended["attempts"]]
            assert len(reasons) == 3, reasons
            for reason in reasons:  # the disk named each time, the machine's fault
                assert "No space left on device" in reason and "free space" in reason, reasons
            assert "could not write the job's output to its spool" in reasons[0]
            # No runbook left blocked on a pipe nobody reads; the agent is still there.
            wait_until(lambda: not _runbooks_under(mount), 15, what="no runbook left running")
            assert agent.proc is not None and agent.proc.poll() is None
            assert hub.machines()["small"]["status"] == "Healthy"
            assert "failed inside the agent" not in agent.log()

            # A failed attempt's output files are removed with it, so the flood left the disk
            # as it found it. Something else fills it now; with a floor of 1 MB the machine
            # takes no work and says why, and the job waits in the queue instead of failing.
            agent.stop()
            for kept in (state / "joblogs").glob("*.jsonl"):
                kept.unlink()
            assert [f.stat().st_size for f in (state / "spool").iterdir()] == [0, 0]
            ballast = mount / "ballast"
            with ballast.open("wb") as fh:
                with contextlib.suppress(OSError):
                    while True:
                        fh.write(b"x" * 65536)
                        fh.flush()
            os.truncate(ballast, ballast.stat().st_size - 512 * 1024)
            agent.config["min_free_disk_mb"] = 1
            agent.start()
            assert hub.cli("job", "resume", job_id).returncode == 0
            wait_until(lambda: "min_free_disk_mb (1 MB)" in str(
                hub.machines()["small"].get("not_taking_work")), 30,
                what="the machine to say its disk is short")
            time.sleep(3)  # it stays queued: no fourth attempt on this disk
            queued = _job(hub, job_id)
            assert queued["status"] == "Queued" and len(queued["attempts"]) == 3, queued
            ballast.unlink()

            # The operator frees the disk: the machine takes work again and the job completes.
            for kept in (state / "joblogs").glob("*.jsonl"):
                kept.unlink()
            flag.touch()
            completed = wait_until(lambda: (j := _job(hub, job_id))["status"] == "Completed" and j,
                                   30, 0.2, what="the job to complete once the disk is freed")
            assert completed["attempts"][-1]["reason"] == "exit code 0"
            last = completed["attempts"][-1]["number"]  # its records: from (attempt - 1) << 32
            out = hub.api("GET", f"/v1/jobs/{job_id}/output?after={((last - 1) << 32) - 1}").json()
            assert [r["text"] for r in out] == ["fits"]
            # What the full disk's attempts did send arrived whole and in order.
            first = hub.api("GET", f"/v1/jobs/{job_id}/output?limit=50").json()
            assert [r["text"].split()[1] for r in first] == [str(i) for i in range(1, 51)]
        finally:
            if agent is not None:
                agent.stop()
            time.sleep(0.2)
