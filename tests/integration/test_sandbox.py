"""The job sandbox on a root agent: runbooks run as one unprivileged user per job slot, in a
control group of their slot with memory, CPU and process limits (docs/security.md,
docs/jobs.md). A real hub and a real agent, laid out as 'outpost up' lays them out (the
agent's state inside the hub's data directory), under a directory every user may pass
through, as /var/lib is: what keeps a runbook out is the modes of the files and directories
themselves, not a private temporary directory of the test's."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import SQLITE_ONLY, Agent, Hub, init_hub, publish_script, register, wait_until

# SQLite only: the sandbox on the machine is the subject here, not the database.
pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs a root agent"),
              SQLITE_ONLY]


@pytest.fixture
def open_base() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="outpost-sandbox-test-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def up_layout(open_base: Path, database_url: str) -> Iterator[tuple[Hub, Agent]]:
    """A hub in BASE/data and its agent with its state in BASE/data/agent, as 'outpost up'
    makes them, started; the agent runs up to 4 jobs at once."""
    data = open_base / "data"
    hub = init_hub(data, database_url).start()
    agent: Agent | None = None
    try:
        state = data / "agent"
        done = register(hub, state, "m1")
        assert done.returncode == 0, done.stderr
        agent = Agent(state, "m1")
        agent.config["max_concurrent_jobs"] = 4
        agent.start()
        wait_until(lambda: hub.machines()["m1"]["status"] == "Healthy", 20,
                   what=f"m1 healthy:\n{agent.log() if agent else ''}")
        yield hub, agent
    finally:
        if agent is not None:
            agent.stop()
        hub.stop()


SNOOP = r"""
IFS=',' read -ra paths <<< "$targets"
for p in "${paths[@]}"; do
  if [ -d "$p" ]; then
    if ls "$p" >/dev/null 2>&1; then echo "READ $p"; else echo "REFUSED $p"; fi
  elif cat "$p" >/dev/null 2>&1; then echo "READ $p"; else echo "REFUSED $p"; fi
done
echo "uid $(id -u) $(id -un)"
"""


ENDED = ("Completed", "Failed", "Stopped", "Suspended")


# Jobs are started, waited for and read through the API: the commands are tested in
# test_jobs.py, and each would cost a Python process here. 'job show' stays a command where its
# text is what is asserted.
def _output(hub: Hub, job_id: str) -> list[str]:
    done = hub.api("GET", f"/v1/jobs/{job_id}/output")
    assert done.status_code == 200, done.text
    return [r["text"] for r in done.json()]


def _job(hub: Hub, job_id: str) -> dict[str, Any]:
    done = hub.api("GET", f"/v1/jobs/{job_id}")
    assert done.status_code == 200, done.text
    job: dict[str, Any] = done.json()
    return job


def _start(hub: Hub, runbook: str, **params: str) -> str:
    done = hub.api("POST", "/v1/jobs", json={"runbook": runbook, "group": "web",
                                             "params": params})
    assert done.status_code == 201, done.text
    return str(done.json()["id"])


def _run(hub: Hub, runbook: str, timeout: float = 60, **params: str) -> dict[str, Any]:
    """Start a job and wait for its end."""
    job_id = _start(hub, runbook, **params)
    wait_until(lambda: _job(hub, job_id)["status"] in ENDED, timeout, 0.2,
               what=f"job {job_id} to end")
    return _job(hub, job_id)



def test_a_runbook_cannot_read_the_agents_or_the_hubs_secrets_or_another_jobs_token(
        up_layout: tuple[Hub, Agent], tmp_path: Path) -> None:
    hub, agent = up_layout
    data, state = hub.data_dir, agent.state_dir
    publish_script(hub, tmp_path, "hold", "sleep 60\n")
    publish_script(hub, tmp_path, "snoop", SNOOP, "--param", "targets")

    # A job that runs on while another tries to take its token.
    held = _start(hub, "hold")
    wait_until(lambda: hub.api("GET", f"/v1/jobs/{held}").json()["status"] == "Running", 20,
               0.2, what="the held job running")
    status = agent.status()
    assert status is not None
    jobs_dir = Path(status.get("sandbox", {}).get("jobs_dir") or state / "jobs")
    targets = {
        "machine key": state / "machine.key",
        "identity": state / "identity.json",
        "agent config": state / "agent.yaml",
        "spool": state / "spool",
        "held job's spool": state / "spool" / f"{held}.1.jsonl",
        "hub master key": data / "master.key",
        "admin token": data / "admin.token",
        "CA key": data / "ca.key",
        "hub config": data / "hub.yaml",
        "another job's token": jobs_dir / held / ".outpost" / "job.token",
        "another job's directory": jobs_dir / held,
        "the jobs directory": jobs_dir,
    }
    for what, path in targets.items():
        assert path.exists(), f"{what}: {path} should exist for the test to mean anything"

    job = _run(hub, "snoop", targets=",".join(str(p) for p in targets.values()))
    assert job["status"] == "Completed", (job, agent.log()[-3000:])
    lines = _output(hub, job["id"])
    read = [what for what, path in targets.items() if f"READ {path}" in lines]
    assert read == [], f"the runbook read: {read}\n{lines}"
    assert all(f"REFUSED {path}" in lines for path in targets.values()), lines
    # The second slot's user: the first is the held job's.
    assert "uid" in lines[-1] and lines[-1].endswith("outpost-job2"), lines
    show = hub.cli("job", "show", job["id"])
    assert "run as: outpost-job2" in show.stdout, show.stdout
    assert _job(hub, job["id"])["attempts"][0]["run_as"] == "outpost-job2"

    # A group that asks for root gets root, and 'job show' says so.
    assert hub.cli("group", "set", "web", "--run-as", "root").returncode == 0
    job = _run(hub, "snoop", targets=str(state / "machine.key"))
    assert job["status"] == "Completed", job
    lines = _output(hub, job["id"])
    assert f"READ {state / 'machine.key'}" in lines and lines[-1] == "uid 0 root", lines
    show = hub.cli("job", "show", job["id"])
    assert "run as: root (group web asks for root)" in show.stdout, show.stdout

    assert hub.api("POST", f"/v1/jobs/{held}/stop").status_code == 200
    # Modes: nothing of the hub's or the agent's is open to other users.
    assert os.stat(data).st_mode & 0o777 == 0o700
    assert os.stat(state).st_mode & 0o777 == 0o700
    assert os.stat(jobs_dir).st_mode & 0o777 == 0o711


def _group_set(hub: Hub, *args: str) -> None:
    done = hub.cli("group", "set", "web", *args)
    assert done.returncode == 0, done.stderr


def test_a_job_over_its_memory_limit_fails_naming_the_limit(
        up_layout: tuple[Hub, Agent], tmp_path: Path) -> None:
    hub, agent = up_layout
    _group_set(hub, "--memory-mb", "64")
    # The interpreter's process is killed; the runbook ends with its status (137).
    publish_script(hub, tmp_path, "hog", "python3 -c 'x = bytearray(200 * 2**20); "
                                         "print(len(x))'\n")
    job = _run(hub, "hog", timeout=120)
    assert job["status"] == "Failed", job
    assert "out of memory (limit 64 MiB)" in job["reason"], job
    # A runbook that stays within the limit is not touched.
    _group_set(hub, "--memory-mb", "0")  # back to the agent's default, 512 MiB
    job = _run(hub, "hog", timeout=120)
    assert job["status"] == "Completed", job
    status = agent.status()
    assert status is not None and status["sandbox"]["limits_by"].startswith("cgroup v"), status


def _job_processes(agent: Agent) -> int:
    """Processes in the agent's jobs' groups now (other tests' agents share the machine
    and its job users, not these groups)."""
    tag = "outpost-" + hashlib.sha256(str(agent.state_dir.resolve()).encode()).hexdigest()[:10]
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            count += f"/{tag}/" in Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            pass
    return count


def _detached_left() -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x00313\x00":
                found.append(pid)
        except OSError:
            continue
    return found


def test_a_fork_bomb_is_held_to_the_process_limit_and_what_it_leaves_is_killed(
        up_layout: tuple[Hub, Agent], tmp_path: Path) -> None:
    hub, agent = up_layout
    _group_set(hub, "--processes", "40")
    # Bounded: each process forks two and waits, down to depth 8, where it sleeps 20 s;
    # without a limit some 500 processes, then it ends by itself. The runbook first leaves
    # a process behind in a session of its own, its output elsewhere, then ends after 4 s
    # while the bomb still runs (its output goes nowhere, so the job ends with its leader).
    publish_script(hub, tmp_path, "bomb", r"""
setsid sleep 313 >/dev/null 2>&1 < /dev/null &
bomb() { [ "$1" -ge 8 ] && { sleep 20; return; }; bomb $(($1 + 1)) & bomb $(($1 + 1)) & wait; }
(bomb 0) >/dev/null 2>&1 &
sleep 4
exit 0
""")
    started = time.monotonic()
    job_id = _start(hub, "bomb")
    most = 0
    while time.monotonic() - started < 90:
        most = max(most, _job_processes(agent))
        job = _job(hub, job_id)
        if job["status"] in ENDED:
            break
        time.sleep(0.1)
    assert job["status"] in ("Completed", "Failed"), job
    assert time.monotonic() - started < 60
    assert 10 < most <= 40, most  # the bomb ran, and no further than its limit
    # The machine stays Healthy and the agent answers.
    assert hub.machines()["m1"]["status"] == "Healthy"
    assert agent.status() is not None
    # Nothing of the job is left: the detached sleep and the bomb went with the group.
    wait_until(lambda: not _detached_left(), 10, what="the detached sleep killed")
    wait_until(lambda: _job_processes(agent) == 0, 10, what="the bomb's processes killed")
    # And the agent still runs jobs.
    publish_script(hub, tmp_path, "after", "echo fine\n")
    done = _run(hub, "after")
    assert done["status"] == "Completed", (done, agent.log()[-3000:])
