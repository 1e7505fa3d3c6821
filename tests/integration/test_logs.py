"""The agent's log and each job's kept log, as a user reads them (ED-1, EX-9): JSON lines
with rotation, ``outpost agent logs`` with its filters and -f across rotations, a job's log
kept after it ends and pruned after ``job_log_retention``, and clear errors for bad values.
Real hub and agent processes; the log is an agent-side file, so one database (SQLite)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any


from tests.support import (
    OUTPOST,
    Agent,
    Hub,
    clean_env,
    registered_agent,
    run_cli,
    wait_until,
)


def _logs(agent: Agent, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("agent", "logs", "--state-dir", str(agent.state_dir), *args)


def _records(agent: Agent, *args: str) -> list[dict[str, Any]]:
    done = _logs(agent, "--json", *args)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def _ts(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(record["time"].replace("Z", "+00:00")).timestamp()


def _on_disk(agent: Agent) -> list[dict[str, Any]]:
    """Every record in agent.log.N ... agent.log, oldest first, read straight from the files."""
    files = sorted(agent.state_dir.glob("agent.log.*"), key=lambda p: -int(p.suffix[1:]))
    files.append(agent.state_dir / "agent.log")
    return [json.loads(line) for path in files for line in path.read_text().splitlines()]


def _healthy(hub: Hub, agent: Agent) -> None:
    wait_until(lambda: hub.machines()[agent.name]["status"] == "Healthy", 20, 0.1,
               f"{agent.name} Healthy\n{agent.log()}")


def test_the_agent_log_is_json_lines_read_filtered_and_followed_across_rotation(
        sqlite_hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    # Debug heartbeats once a second and a 1 KiB rotation size: a rotation every few s.
    agent = registered_agent(sqlite_hub, tmp_path, "logs1", log_level="error",
                             log_max_bytes=1024, log_backups=50)
    agent.env = {"OUTPOST_LOG": "debug"}  # wins over the config's level (ED-1)
    agents.append(agent.start())
    _healthy(sqlite_hub, agent)

    records = _records(agent)
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record), record
    started = [r for r in records if r["message"].startswith("agent ")]
    assert started and started[0]["level"] == "INFO" and started[0]["logger"] == "outpost.agent"
    assert any(r["level"] == "DEBUG" for r in records)

    text = _logs(agent)
    assert text.returncode == 0, text.stderr
    first = text.stdout.splitlines()[0]
    assert " INFO " in first and "outpost.agent: " in first and not first.startswith("{")

    warnings = _records(agent, "--level", "warning")
    assert all(r["level"] in ("WARNING", "ERROR") for r in warnings)
    assert len(_records(agent, "--lines", "2")) == 2

    latest = _ts(_records(agent, "--lines", "1")[0])
    time.sleep(2.5)
    recent = _records(agent, "--since", "2s")
    assert recent and all(_ts(r) > latest for r in recent), (latest, recent)

    # -f prints what is there, then every new line, across rotations, once each.
    follower = subprocess.Popen(
        [*OUTPOST, "agent", "logs", "-f", "--json", "--state-dir", str(agent.state_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        inode = (agent.state_dir / "agent.log").stat().st_ino
        wait_until(lambda: (agent.state_dir / "agent.log").stat().st_ino != inode, 20, 0.2,
                   "a rotation")
        time.sleep(1.5)  # let the follower catch up with the newest file
    finally:
        follower.send_signal(signal.SIGINT)
        out, err = follower.communicate(timeout=10)
    assert follower.returncode == 0, err
    followed = [json.loads(line) for line in out.splitlines()]
    on_disk = _on_disk(agent)
    # What -f printed is what the files hold, in order, with nothing lost or repeated; the
    # agent may have written a line or two after the follower stopped.
    assert followed == on_disk[:len(followed)]
    assert len(on_disk) - len(followed) <= 3
    assert len(followed) > len(records) + 3


def _publish(hub: Hub, tmp_path: Path, name: str, body: str) -> None:
    script = tmp_path / f"{name}.sh"
    script.write_text("#!/bin/bash\n" + body)
    done = hub.cli("runbook", "publish", name, str(script))
    assert done.returncode == 0, done.stderr


def test_a_jobs_log_is_kept_on_the_machine_then_pruned(sqlite_hub: Hub, agents: list[Agent],
                                                      tmp_path: Path) -> None:
    agent = registered_agent(sqlite_hub, tmp_path, "logs2")  # kept 7 days by default
    agents.append(agent.start())
    _healthy(sqlite_hub, agent)
    _publish(sqlite_hub, tmp_path, "greet", 'echo "hello from $OUTPOST_JOB_ID"\n'
             'echo "oops" >&2\nexit 3\n')
    done = sqlite_hub.cli("job", "start", "greet", "--group", "web", "--wait", "--json")
    job_id = json.loads(done.stdout)["id"]
    kept = agent.state_dir / "joblogs" / f"{job_id}.1.jsonl"  # the spool, moved there
    wait_until(kept.is_file, 10, 0.1, "the job's log to be kept")
    # No file or directory is made for a job's log but its spool (joblogs/ is made once).
    assert [p.name for p in (agent.state_dir / "joblogs").iterdir()] == [kept.name]
    assert b'{"agent"' in kept.read_bytes()  # the agent's own lines about it are in it
    # ... and never sent to the hub as output.
    output = sqlite_hub.api("GET", f"/v1/jobs/{job_id}/output").json()
    assert [(r["stream"], r["text"]) for r in output] == [
        ("Output", f"hello from {job_id}"), ("Error", "oops")]

    shown = _logs(agent, "--job", job_id)
    assert shown.returncode == 0, shown.stderr
    assert f"OUTPUT   [attempt 1] hello from {job_id}" in shown.stdout
    assert "ERROR    [attempt 1] oops" in shown.stdout
    assert f"job {job_id}: running greet" in shown.stdout  # the agent's own line about it
    assert "attempt ended (exit): exit code 3" in shown.stdout
    records = _records(agent, "--job", job_id)
    assert {r["job"] for r in records} == {job_id}
    assert [r["message"] for r in records if r.get("stream") == "Output"] == [
        f"hello from {job_id}"]

    # The agent's own log tags its lines about the job with the job's id.
    tagged = [r for r in _records(agent) if r.get("job") == job_id]
    assert any(f"job {job_id}: running greet" in r["message"] for r in tagged), tagged
    index = json.loads(_logs(agent, "--jobs", "--json").stdout)
    assert [(row["job"], row["attempts"]) for row in index] == [(job_id, [1])]
    assert index[0]["bytes"] > 0 and index[0]["expires_at"]

    # -f follows a running job's log (from the spool) to its end.
    _publish(sqlite_hub, tmp_path, "ticker", 'for i in 1 2 3; do echo "tick $i"; sleep 0.7; '
             'done\n')
    started = sqlite_hub.cli("job", "start", "ticker", "--group", "web", "--json")
    ticker = json.loads(started.stdout)["id"]
    wait_until(lambda: list((agent.state_dir / "spool").glob(f"{ticker}.*.jsonl")), 15, 0.05,
               "the ticker job to start")
    follower = subprocess.Popen(
        [*OUTPOST, "agent", "logs", "--job", ticker, "-f", "--json", "--state-dir",
         str(agent.state_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=clean_env())
    try:
        wait_until(lambda: (agent.state_dir / "joblogs" / f"{ticker}.1.jsonl").exists(),
                   20, 0.1, "the ticker job to end and be delivered")
        time.sleep(1.5)
    finally:
        follower.send_signal(signal.SIGINT)
        out, err = follower.communicate(timeout=10)
    assert follower.returncode == 0, err
    followed = [json.loads(line) for line in out.splitlines()]
    assert [r["message"] for r in followed if r.get("stream") == "Output"] == [
        "tick 1", "tick 2", "tick 3"]
    assert followed[-1]["stream"] == "End" and followed[-1]["end"]["exit_code"] == 0

    index = json.loads(_logs(agent, "--jobs", "--json").stdout)
    assert 6.9 * 86400 < _ts({"time": index[0]["expires_at"]}) - time.time() < 7 * 86400

    # With a retention they have outlived, the agent removes them by itself.
    agent.stop()
    agent.config["job_log_retention"] = "2s"
    agent.start()
    wait_until(lambda: not kept.exists(), 20, 0.2, "the job log to be pruned")
    gone = _logs(agent, "--job", job_id)
    assert gone.returncode == 1
    assert "E7052" in gone.stderr and job_id in gone.stderr
    assert "outpost job output ID" in gone.stderr and "Traceback" not in gone.stderr
    # Both jobs' logs go, in one pass or two (the second job's may not be 2 s old yet at
    # the first).
    wait_until(lambda: json.loads(_logs(agent, "--jobs", "--json").stdout) == [], 20, 0.2,
               "every job log to be pruned")
    removed = re.findall(r"removed the logs of (\d+) job\(s\) older than 2s", agent.log())
    assert sum(int(n) for n in removed) == 2, agent.log()


def test_bad_values_are_errors_with_codes(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    since = run_cli("agent", "logs", "--state-dir", str(state), "--since", "ten minutes")
    assert since.returncode == 2
    assert "E7051" in since.stderr and "'ten minutes'" in since.stderr
    assert "Traceback" not in since.stderr
    level = run_cli("agent", "logs", "--state-dir", str(state), "--level", "chatty")
    assert level.returncode == 2 and "E7050" in level.stderr
    assert "debug, info, warning, error" in level.stderr
    unknown = run_cli("agent", "logs", "--state-dir", str(state), "--job", "no-such-job")
    assert unknown.returncode == 1 and "E7052" in unknown.stderr

    empty = run_cli("agent", "logs", "--state-dir", str(state))
    assert empty.returncode == 0 and "No agent log" in empty.stderr

    config = state / "agent.yaml"
    config.write_text("heartbeat_interval: 5\njob_log_retention: forever\n")
    run = run_cli("agent", "run", "--state-dir", str(state), "--config", str(config))
    assert run.returncode == 2
    assert "E2001" in run.stderr and ":2:20: job_log_retention" in run.stderr
    assert "duration such as 7d" in run.stderr
