"""The hub's database goes away for a while, for real, and comes back.

PostgreSQL is reached through a TCP proxy (tests/tcp_proxy.py) that resets every open
connection and refuses new ones for the outage. While it lasts, operator and agent requests
answer 503 E3007 with Retry-After and the background tasks say so once; afterwards everything
works without restarting the hub, no job has run twice (leases do not run out for time the
hub could not write), and waiting commands have ridden it out. On SQLite the outage is a
write lock that another process holds longer than the hub's busy timeout.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from outpost.protocol.errors import HubRefused
from tests.support import (
    OUTPOST,
    Agent,
    Hub,
    clean_env,
    free_port,
    healthy_agent,
    init_hub,
    last_beat,
    machine_calls,
    publish_script,
    query,
    wait_until,
)
from tests.tcp_proxy import TcpProxy, tcp_proxy

JOBS = 8
OUTAGE = 12.0  # more than two leases (5 s): none runs out for time the hub could not write


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    with tcp_proxy(("127.0.0.1", 5432)) as running:
        yield running


@pytest.fixture
def pg_hub(tmp_path: Path, postgres_url: str, proxy: TcpProxy) -> Iterator[Hub]:
    """A hub whose --database-url goes through the proxy."""
    url = postgres_url.replace("127.0.0.1:5432/", f"127.0.0.1:{proxy.port}/")
    hub = init_hub(tmp_path / "hub", url)
    try:
        yield hub.start()
    finally:
        hub.stop()


def _jobs(hub: Hub, ids: list[str]) -> list[dict[str, Any]]:
    out = []
    for job_id in ids:
        answer = hub.api("GET", f"/v1/jobs/{job_id}")
        assert answer.status_code == 200, answer.text
        out.append(answer.json())
    return out


def _all_completed(hub: Hub, ids: list[str]) -> list[dict[str, Any]] | None:
    found = _jobs(hub, ids)
    return found if all(j["status"] == "Completed" for j in found) else None


def _assert_unavailable(answer: Any) -> None:
    assert answer.status_code == 503, answer.text
    body = answer.json()
    assert body["code"] == "E3007" and body["reason"] == "database_unavailable", body
    assert int(answer.headers["retry-after"]) >= 1


def _failures(hub: Hub) -> float:
    """outpost_database_failures_total, all kinds."""
    text = hub.api("GET", "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("outpost_database_failures_total{"))


def test_an_outage_under_running_jobs_runs_each_job_once(
        pg_hub: Hub, proxy: TcpProxy, agents: list[Agent], tmp_path: Path,
        shared: Path) -> None:
    hub = pg_hub
    markers = shared / "markers"  # the runbooks run as job users
    markers.touch()
    os.chmod(markers, 0o666)
    publish_script(hub, tmp_path, "mark", f'echo "$OUTPOST_JOB_ID" >> "{markers}"\n'
                   'echo started\nsleep 4\necho done\n')
    publish_script(hub, tmp_path, "noop", "true\n")
    answer = hub.api("POST", "/v1/schedules", json={  # a background task of its own
        "name": "tick", "runbook": "noop", "group": "nowhere", "cron": "* * * * * *"})
    assert answer.status_code == 201, answer.text
    healthy_agent(hub, tmp_path, agents, "w1", max_concurrent_jobs=JOBS, backoff_max=2)
    call = machine_calls(hub, tmp_path / "agent-m2", "m2")  # speaks for itself below
    answer = hub.api("POST", "/v1/jobs/batch",
                     json={"jobs": [{"runbook": "mark", "group": "web"}] * JOBS})
    assert answer.status_code == 201, answer.text
    ids = [job["id"] for job in answer.json()["jobs"]]
    wait_until(lambda: all(j["status"] == "Running" for j in _jobs(hub, ids)), 20,
               what="every job to run")
    wait_until(lambda: len(markers.read_text().split()) == JOBS, 10, what="every marker")
    before = _failures(hub)

    proxy.cut()
    cut_at = time.monotonic()
    try:
        time.sleep(2)
        _assert_unavailable(hub.api("GET", "/v1/jobs"))  # an operator
        with pytest.raises(HubRefused) as refused:  # an agent
            call("POST", "/v1/agent/heartbeat", {"agent_version": "9.9.9",
                                                 "heartbeat_interval": 1, "jobs": []})
        assert refused.value.status == 503 and refused.value.code == "E3007"
        assert hub.api("GET", "/healthz").status_code == 200  # the hub itself is up
        assert _failures(hub) > before  # /metrics answers, and counts the outage
        time.sleep(max(0.0, OUTAGE - (time.monotonic() - cut_at)))
    finally:
        proxy.restore()
    back = time.time()

    try:
        ended = wait_until(lambda: _all_completed(hub, ids), 30, 0.2,
                           what="every job to complete")
    except AssertionError:
        print(hub.log()[-6000:])
        raise
    assert ended is not None
    ran = markers.read_text().split()
    twice = sorted({job_id for job_id in ran if ran.count(job_id) > 1})
    assert not twice, f"{len(twice)} of {JOBS} jobs ran more than once"
    assert sorted(ran) == sorted(ids)
    for job in ended:
        assert [a["number"] for a in job["attempts"]] == [1], job["attempts"]
        assert job["attempts"][0]["reason"] == "exit code 0"
    for job_id in ids:
        texts = [r["text"] for r in hub.api("GET", f"/v1/jobs/{job_id}/output").json()]
        assert texts == ["started", "done"]

    # Everything works again without restarting the hub; the outage was counted and said
    # once, without a traceback.
    done = hub.cli("job", "start", "mark", "--group", "web", "--wait")
    assert done.returncode == 0, done.stderr
    wait_until(lambda: query(hub.database_url, "SELECT count(*) FROM schedule_runs WHERE "
                             f"fired_at > {back}")[0][0] > 0, 15, what="the scheduler again")
    assert _failures(hub) > before
    log = hub.log()
    assert "Traceback" not in log, log[-6000:]
    assert log.count("database unavailable") == 1, log[-6000:]
    assert log.count("database reachable again") == 1, log[-6000:]


def test_an_agent_that_died_in_the_outage_loses_its_job_a_lease_after_it(
        pg_hub: Hub, proxy: TcpProxy, agents: list[Agent], tmp_path: Path) -> None:
    """HW-1 still holds: the lease is judged only once the hub could write for a whole
    lease, and then the silent machine's attempt is a failed activation."""
    hub = pg_hub
    publish_script(hub, tmp_path, "long", 'echo "pid $$"\nsleep 30\n')
    agent = healthy_agent(hub, tmp_path, agents, "w1", backoff_max=2)
    job_id = hub.api("POST", "/v1/jobs", json={"runbook": "long", "group": "web"}).json()["id"]
    wait_until(lambda: _jobs(hub, [job_id])[0]["status"] == "Running", 15, what="the job")
    pid = int(wait_until(lambda: hub.api("GET", f"/v1/jobs/{job_id}/output").json(), 10,
                         what="its pid")[0]["text"][4:])
    try:
        with proxy.outage():
            assert agent.proc is not None
            agent.proc.kill()  # kill -9 while the hub cannot write
            agent.proc.wait()
            time.sleep(8)  # more than a lease (5 s)
        back = time.monotonic()
        time.sleep(2)
        assert _jobs(hub, [job_id])[0]["status"] == "Running"  # a full lease from the return
        job = wait_until(lambda: (j := _jobs(hub, [job_id])[0])["status"] == "Queued" and j,
                         15, 0.2, what="the lease to expire")
        assert time.monotonic() - back >= 4.5
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert job["attempts"][0]["reason"].startswith("lease expired"), job["attempts"]
    assert job["reason"].startswith("activation 1 failed")


def test_a_replica_cut_off_from_the_database_hands_its_machines_to_another(
        pg_hub: Hub, postgres_url: str, proxy: TcpProxy, agents: list[Agent],
        tmp_path: Path, shared: Path) -> None:
    """Two hub processes on one PostgreSQL; only the first loses it. The second saw no
    outage and judges leases as usual, so the agent (given both URLs) must renew through it:
    a 503 E3007 moves it to the next hub URL as a refused connection does."""
    first = pg_hub
    shutil.copytree(first.data_dir, tmp_path / "hub2", ignore=shutil.ignore_patterns("*.log"))
    second = Hub(tmp_path / "hub2", free_port(), postgres_url, first.init).start()
    try:
        markers = shared / "markers"  # the runbooks run as job users
        markers.touch()
        os.chmod(markers, 0o666)
        publish_script(second, tmp_path, "mark", f'echo "$OUTPOST_JOB_ID" >> "{markers}"\n'
                       'sleep 4\n')
        agent = healthy_agent(first, tmp_path, agents, "w1", max_concurrent_jobs=JOBS,
                              backoff_max=2, hub_urls=[first.url, second.url])
        answer = second.api("POST", "/v1/jobs/batch",
                            json={"jobs": [{"runbook": "mark", "group": "web"}] * JOBS})
        assert answer.status_code == 201, answer.text
        ids = [job["id"] for job in answer.json()["jobs"]]
        wait_until(lambda: all(j["status"] == "Running" for j in _jobs(second, ids)), 20,
                   what="every job to run")
        with proxy.outage():
            time.sleep(12)  # more than two leases (5 s)
            _assert_unavailable(first.api("GET", "/v1/jobs"))
        ended = wait_until(lambda: _all_completed(second, ids), 30, 0.2,
                           what="every job to complete")
    finally:
        second.stop()
    assert ended is not None
    ran = markers.read_text().split()
    twice = sorted({job_id for job_id in ran if ran.count(job_id) > 1})
    assert not twice, f"{len(twice)} of {JOBS} jobs ran more than once"
    assert sorted(ran) == sorted(ids)  # each ran, once
    assert all(len(job["attempts"]) == 1 for job in ended)
    assert "cannot reach its database (E3007); trying the next hub URL" in agent.log()


def _waiting_cli(hub: Hub, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*OUTPOST, *args, "--hub", hub.url, "--token", hub.admin_token, "--ca-fingerprint",
         hub.fingerprint], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=clean_env())


def test_waiting_commands_ride_out_an_outage(pg_hub: Hub, proxy: TcpProxy,
                                            agents: list[Agent], tmp_path: Path) -> None:
    hub = pg_hub
    publish_script(hub, tmp_path, "count", "for i in $(seq 1 16); do echo \"line $i\"; "
                   "sleep 0.5; done\n")
    healthy_agent(hub, tmp_path, agents, "w1", backoff_max=2)
    follow = _waiting_cli(hub, "job", "start", "count", "--group", "web", "--follow")
    assert follow.stdout is not None
    first = follow.stdout.readline()
    assert first == "line 1\n", first
    job_id = hub.api("GET", "/v1/jobs").json()[0]["id"]  # the waits read the API
    output = _waiting_cli(hub, "job", "output", job_id, "--follow")
    wait = _waiting_cli(hub, "job", "start", "count", "--group", "web", "--wait")
    # The outage is for the waiting, not the submitting (a start that meets one is the
    # next test's), so the second job must be in first. A CLI process starts in about a
    # second, more on a loaded machine.
    deadline = time.monotonic() + 30
    while len(hub.api("GET", "/v1/jobs").json()) < 2:
        assert time.monotonic() < deadline, "job start --wait submitted nothing in 30 s"
        time.sleep(0.2)
    time.sleep(0.5)
    with proxy.outage():
        time.sleep(10)
    expected = [f"line {i}" for i in range(1, 17)]
    try:
        followed, follow_err = follow.communicate(timeout=40)
        printed, output_err = output.communicate(timeout=20)
        waited, wait_err = wait.communicate(timeout=20)
    finally:
        for proc in (follow, output, wait):
            proc.kill()
    assert follow.returncode == 0, follow_err
    assert (first + followed).splitlines() == [*expected, f"Job {job_id} Completed "
                                                          "(exit code 0)."]
    assert output.returncode == 0, output_err
    assert printed.splitlines() == expected
    assert wait.returncode == 0, wait_err
    assert waited.splitlines()[-1].endswith("Completed (exit code 0).")
    for err in (follow_err, output_err, wait_err):
        assert err.count("warning: lost the hub") == 1, err
        assert "E3007" in err or "database" in err, err
        assert err.count("the hub answers again") == 1, err


def test_a_locked_sqlite_file_answers_503_until_it_is_released(sqlite_hub: Hub,
                                                               tmp_path: Path) -> None:
    hub = sqlite_hub
    publish_script(hub, tmp_path, "noop", "true\n")
    path = hub.database_url[len("sqlite:///"):]
    other = sqlite3.connect(path, isolation_level=None)  # another process's writer, say
    try:
        other.execute("BEGIN IMMEDIATE")  # the write lock, held past the busy timeout
        refused = hub.api("POST", "/v1/jobs", json={"runbook": "noop", "group": "web"})
        _assert_unavailable(refused)
        assert "locked" in refused.json()["message"]
        assert hub.api("GET", "/v1/jobs").status_code == 200  # readers are not held up
    finally:
        other.execute("ROLLBACK")
        other.close()
    answer = hub.api("POST", "/v1/jobs", json={"runbook": "noop", "group": "web"})
    assert answer.status_code == 201, answer.text
    assert _failures(hub) >= 1
    assert "Traceback" not in hub.log()


def test_an_idle_agent_takes_work_at_once_after_an_outage(
        pg_hub: Hub, proxy: TcpProxy, agents: list[Agent], tmp_path: Path) -> None:
    """Its long-poll failed through the outage and backed off (up to backoff_max, 60 s);
    the first heartbeat the hub acknowledges afterwards sends it again at once."""
    hub = pg_hub
    publish_script(hub, tmp_path, "quick", "echo hi\n")
    # backoff_max 8: the outage lasts until the poll waits 4-8 s between tries, longer than
    # the 4 s the job is given below, without waiting for the default's 30-60 s.
    agent = healthy_agent(hub, tmp_path, agents, "w1", heartbeat_interval=1, backoff_max=8)
    proxy.cut()
    try:
        # A poll that carried the heartbeat logs its failure as the heartbeat's; the
        # heartbeat loop's own retries are at most its 1 s interval apart, so 4 s or more
        # is the poll's backoff either way.
        wait_until(lambda: max([float(d) for d in re.findall(
            r"(?:poll|heartbeat) \S+ [^\n]*retrying in ([0-9.]+) s", agent.log())] or [0])
            >= 4, 60,
            what="the poll to back off for 4 s or more")
    finally:
        proxy.restore()
    restored = time.time()
    wait_until(lambda: hub.api("GET", "/v1/jobs").status_code == 200, 15,
               what="the hub to reach its database again")
    wait_until(lambda: last_beat(hub, "w1") > restored, 15,
               what="a heartbeat acknowledged after the outage")
    submitted = time.monotonic()
    answer = hub.api("POST", "/v1/jobs", json={"runbook": "quick", "group": "web"})
    assert answer.status_code == 201, answer.text
    job_id = answer.json()["id"]
    wait_until(lambda: hub.api("GET", f"/v1/jobs/{job_id}").json()["status"] == "Completed",
               20, what="the job to complete")
    assert time.monotonic() - submitted < 4, "the poll was still backing off"


def test_a_job_start_during_an_outage_is_queued_once_after_it(
        pg_hub: Hub, proxy: TcpProxy, tmp_path: Path) -> None:
    """``job start`` sends its request again, with the same Idempotency-Key, while the hub
    answers 503 for its database, and the job is queued once the database is back (a try
    whose answer is lost after the hub committed it is answered with that job:
    tests/unit/test_idempotency.py)."""
    hub = pg_hub
    publish_script(hub, tmp_path, "once", "true\n")
    with proxy.outage():
        start = _waiting_cli(hub, "job", "start", "once", "--group", "web")
        assert start.stderr is not None
        line = start.stderr.readline()  # said once, when the first try met the outage
        assert "warning: lost the hub" in line, line
        assert start.poll() is None  # still trying
        time.sleep(2)
    printed, errors = start.communicate(timeout=60)
    assert start.returncode == 0, errors
    listed = hub.api("GET", "/v1/jobs").json()
    assert [j["id"] for j in listed] == [printed.strip()], (listed, printed)
    assert "the hub answers again" in errors
