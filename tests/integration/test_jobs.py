"""Jobs end to end: a real hub, a real agent, real subprocesses, on both databases."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tests.support import SQLITE_ONLY, Agent, Hub, healthy_agent, publish_script, wait_until


_publish = publish_script
_healthy_agent = healthy_agent


def test_a_job_runs_and_its_streams_arrive_in_order(hub: Hub, agents: list[Agent],
                                                    tmp_path: Path) -> None:
    _publish(hub, tmp_path, "hello", 'echo "hello $who"\necho oops >&2\necho "WARNING: careful"\n'
             'echo "verbose: dropped"\nfor i in $(seq 1 200); do echo "line $i"; done\n'
             'echo "job=$OUTPOST_JOB_ID count=$count"\n',
             "--param", "who", "--param", "count:int=3")
    _healthy_agent(hub, tmp_path, agents)
    done = hub.cli("job", "start", "hello", "--group", "web", "--param", "who=world", "--wait",
                   "--json")
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["status"] == "Completed" and job["exit_code"] == 0
    assert job["params"] == {"who": "world", "count": 3}
    assert [a["reason"] for a in job["attempts"]] == ["exit code 0"]

    records = json.loads(hub.cli("job", "output", job["id"], "--json").stdout)
    assert [r["seq"] for r in records] == list(range(len(records)))
    texts = [(r["stream"], r["text"]) for r in records]
    assert texts[0] == ("Output", "hello world")
    assert ("Error", "oops") in texts and ("Warning", "careful") in texts
    assert not any(s == "Verbose" for s, _ in texts)  # --log-verbose was not set
    # stdout and stderr are two pipes: order holds within each stream.
    outputs = [t for s, t in texts if s == "Output"]
    assert outputs == ["hello world", *[f"line {i}" for i in range(1, 201)],
                       f"job={job['id']} count=3"]

    only_errors = hub.cli("job", "output", job["id"], "--stream", "Error")
    assert only_errors.stdout.strip() == "ERROR: oops"
    # Stream names in any case; --follow keeps to the streams asked for; a wrong name is
    # refused, naming the streams there are.
    assert hub.cli("job", "output", job["id"], "--stream", "error").stdout.strip() == \
        "ERROR: oops"
    followed = hub.cli("job", "output", job["id"], "--stream", "WARNING", "--follow")
    assert followed.returncode == 0 and followed.stdout.strip() == "WARNING: careful"
    wrong = hub.cli("job", "output", job["id"], "--stream", "Nope")
    assert wrong.returncode == 2 and "Unknown stream 'Nope'" in wrong.stderr, wrong.stderr
    assert "Output, Error, Warning, Verbose, Progress, Debug" in wrong.stderr
    # Job states too, in any case.
    listed = json.loads(hub.cli("job", "list", "--status", "completed", "--json").stdout)
    assert [j["id"] for j in listed] == [job["id"]]
    unknown = hub.cli("job", "list", "--status", "done")
    assert unknown.returncode == 2 and "Unknown job status 'done'" in unknown.stderr


# SQLite only: validation, before anything is queued.
@SQLITE_ONLY
def test_bad_parameters_are_refused_before_anything_is_queued(hub: Hub, tmp_path: Path) -> None:
    _publish(hub, tmp_path, "p", "true\n", "--param", "n:int")
    missing = hub.cli("job", "start", "p", "--group", "web")
    assert missing.returncode == 2 and "E4004" in missing.stderr and "'n'" in missing.stderr
    wrong = hub.cli("job", "start", "p", "--group", "web", "--param", "n=lots")
    assert wrong.returncode == 2 and "E4003" in wrong.stderr and "'n'" in wrong.stderr
    assert json.loads(hub.cli("job", "list", "--json").stdout) == []


# SQLite only: the agent's timeout and sandbox, not the database.
@SQLITE_ONLY
def test_failure_timeout_and_the_sandbox(hub: Hub, agents: list[Agent],
                                         tmp_path: Path) -> None:
    agent = _healthy_agent(hub, tmp_path, agents)
    _publish(hub, tmp_path, "fail", "exit 3\n")
    _publish(hub, tmp_path, "sleepy", "sleep 30 &\nsleep 30\n")
    _publish(hub, tmp_path, "snoop", "env\npwd\n")

    failed = hub.cli("job", "start", "fail", "--group", "web", "--wait", "--json")
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["status"] == "Failed"
    assert json.loads(failed.stdout)["exit_code"] == 3

    started = time.monotonic()
    slow = hub.cli("job", "start", "sleepy", "--group", "web", "--timeout", "1s", "--wait",
                   "--json")
    assert slow.returncode == 1 and time.monotonic() - started < 15
    job = json.loads(slow.stdout)
    assert job["status"] == "Failed" and job["reason"].startswith("timed out after 1 s")
    assert job["signal"] == 15  # TERM reached the whole process group

    snoop = hub.cli("job", "start", "snoop", "--group", "web", "--wait", "--json")
    job = json.loads(snoop.stdout)
    output = hub.cli("job", "output", job["id"]).stdout
    # The environment holds the job id and nothing of the agent's. (A root agent keeps its
    # key out of a runbook's reach with its job users: tests/integration/test_sandbox.py.)
    key = (agent.state_dir / "machine.key").read_text().splitlines()[1]
    assert key not in output
    env_names = {line.split("=", 1)[0] for line in output.splitlines() if "=" in line}
    assert "OUTPOST_JOB_ID" in env_names
    # Beside the job id only the helper's paths (docs/assets.md): no token, no key.
    assert {n for n in env_names if n.startswith("OUTPOST_")} <= {
        "OUTPOST_JOB_ID", "OUTPOST_HELPER_DIR", "OUTPOST_HUB_URL"}
    status = agent.status()
    assert status is not None
    jobs_dir = status["sandbox"]["jobs_dir"] or str(agent.state_dir / "jobs")
    assert f"{jobs_dir}/{job['id']}" in output  # its own working directory


def test_every_job_runs_exactly_once_across_four_agents(hub: Hub, agents: list[Agent],
                                                        tmp_path: Path, shared: Path) -> None:
    """The claim is one atomic statement: 4 agents of a group, 500 jobs, no job twice."""
    ledger = shared / "ledger"
    ledger.touch()
    os.chmod(ledger, 0o666)  # appended to by every job user
    _publish(hub, tmp_path, "tally", f'echo "$OUTPOST_JOB_ID" >> "{ledger}"\n')
    for i in range(4):
        _healthy_agent(hub, tmp_path, agents, f"w{i}", max_concurrent_jobs=4)
    ids = set()
    with hub.client(hub.admin_token) as client:
        for _ in range(500):
            response = client.post("/v1/jobs", json={"runbook": "tally", "group": "web"})
            assert response.status_code == 201, response.text
            ids.add(response.json()["id"])

    def all_done() -> bool:
        jobs = hub.api("GET", "/v1/jobs?limit=1000").json()
        return len(jobs) == 500 and all(j["status"] == "Completed" for j in jobs)

    wait_until(all_done, 120, 0.5, what="500 jobs to complete")
    lines = ledger.read_text().split()
    assert sorted(lines) == sorted(ids)  # each id exactly once
    machines = {j["machine_id"] for j in hub.api("GET", "/v1/jobs?limit=1000").json()}
    assert len(machines) > 1  # the group's agents shared the work


def test_large_output_is_read_in_pages(hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    """25,000 records: the API answers a page at a time, and the CLI reads every page."""
    _publish(hub, tmp_path, "many", "seq 1 25000\n")
    _healthy_agent(hub, tmp_path, agents)
    done = hub.cli("job", "start", "many", "--group", "web", "--wait", "--json")
    job_id = json.loads(done.stdout)["id"]
    page = hub.api("GET", f"/v1/jobs/{job_id}/output?after=99&limit=50").json()
    assert [r["text"] for r in page] == [str(i) for i in range(101, 151)]
    printed = hub.cli("job", "output", job_id).stdout.split()
    assert printed == [str(i) for i in range(1, 25001)]
    followed = hub.cli("job", "output", job_id, "--follow", "--json").stdout.splitlines()
    assert [json.loads(line)["seq"] for line in followed] == list(range(25000))


def test_a_job_queued_where_no_machine_can_take_it_says_so(hub: Hub, agents: list[Agent],
                                                           tmp_path: Path) -> None:
    """`job start` warns (stderr, exit 0) when the group has no machine, or none Healthy;
    `job show` says why the job waits, and names the machine of each attempt."""
    _publish(hub, tmp_path, "hi", "echo hi\n")
    empty = hub.cli("job", "start", "hi", "--group", "nobody-here")
    assert empty.returncode == 0, empty.stderr
    job_id = empty.stdout.strip()
    assert "warning: No machine is registered in group 'nobody-here'" in empty.stderr
    shown = json.loads(hub.cli("job", "show", job_id, "--json").stdout)
    assert shown["status"] == "Queued"
    assert shown["waiting_for"].startswith("No machine is registered in group 'nobody-here'")
    assert "waiting:  No machine is registered" in hub.cli("job", "show", job_id).stdout

    agent = _healthy_agent(hub, tmp_path, agents, "w9")
    done = hub.cli("job", "start", "hi", "--group", "web", "--wait", "--json")
    assert done.returncode == 0 and "warning" not in done.stderr, done.stderr
    job = json.loads(done.stdout)
    assert [a["machine"] for a in job["attempts"]] == ["w9"]
    assert "waiting_for" not in job
    assert " w9 " in hub.cli("job", "show", job["id"]).stdout
    # --follow --json: the records as JSON lines, then the job's end as one more line.
    followed = hub.cli("job", "start", "hi", "--group", "web", "--follow", "--json")
    assert followed.returncode == 0, followed.stderr
    lines = [json.loads(line) for line in followed.stdout.splitlines()]
    assert [line["text"] for line in lines[:-1]] == ["hi"]
    assert lines[-1]["job"]["status"] == "Completed" and lines[-1]["job"]["exit_code"] == 0

    agent.stop()  # registered, but no longer heartbeating
    machines_down = wait_until(lambda: hub.machines()["w9"]["status"] != "Healthy", 30,
                               what="w9 to stop being Healthy")
    assert machines_down
    late = hub.cli("job", "start", "hi", "--group", "web", "--count", "2")
    assert late.returncode == 0, late.stderr
    assert "warning: No machine of group 'web' is Healthy (w9 " in late.stderr


# SQLite only: the CLI's follow across a hub restart, not the database.
@SQLITE_ONLY
def test_follow_rides_out_a_hub_restart(hub: Hub, agents: list[Agent], tmp_path: Path,
                                        shared: Path) -> None:
    """`job start --follow` waits for a hub that restarts mid-job: every line once, in
    order, and exit 0; the agent keeps running the job meanwhile."""
    import subprocess

    from tests.support import OUTPOST, clean_env

    flag = shared / "go-on"
    _publish(hub, tmp_path, "slow", 'echo first\n'
             f'for i in $(seq 1 300); do [ -e "{flag}" ] && break; sleep 0.1; done\n'
             'echo second\n')
    _healthy_agent(hub, tmp_path, agents, backoff_max=1)
    follow = subprocess.Popen(
        [*OUTPOST, "job", "start", "slow", "--group", "web", "--follow", "--hub", hub.url,
         "--token", hub.admin_token, "--ca-fingerprint", hub.fingerprint],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        assert follow.stdout is not None
        assert follow.stdout.readline().strip() == "first"
        hub.stop()  # mid-job: the CLI and the agent both lose it
        time.sleep(2)
        hub.start()
        flag.touch()
        out, err = follow.communicate(timeout=90)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.communicate()
    assert follow.returncode == 0, err
    lines = out.splitlines()  # "first" was read above: nothing is printed twice
    assert lines[0] == "second" and len(lines) == 2, out
    assert lines[1].startswith("Job ") and " Completed (exit code 0)." in lines[1]
    assert "warning: lost the hub" in err and "the hub answers again" in err
