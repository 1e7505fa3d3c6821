"""Schedules end to end: real hub processes, a real agent, on both databases."""

from __future__ import annotations

import json
import shutil
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from tests.support import (SQLITE_ONLY, Agent, Hub, clean_env, free_port, query,
                           registered_agent, run_cli, wait_until)


def _publish(hub: Hub, tmp_path: Path, name: str, body: str, *extra: str) -> None:
    script = tmp_path / f"{name}.sh"
    script.write_text("#!/bin/bash\n" + body)
    done = hub.cli("runbook", "publish", name, str(script), *extra)
    assert done.returncode == 0, done.stderr


def _json(result: Any) -> Any:
    assert result.returncode == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def _refused(result: Any, code: str, exit_code: int) -> str:
    """The command failed with ``exit_code`` and the error's code, and no traceback."""
    assert result.returncode == exit_code, (result.returncode, result.stdout, result.stderr)
    err: str = result.stderr
    assert f"code:   {code}" in err and "fix:" in err, err
    assert "Traceback" not in err, err
    return err


def _wide(hub: Hub, *args: str) -> Any:
    """A text command with room for its table (a pipe gives rich 80 columns)."""
    return run_cli(*args, "--hub", hub.url, "--token", hub.admin_token, "--ca-fingerprint",
                   hub.fingerprint, env=clean_env(COLUMNS="200"))


def _api(hub: Hub, method: str, path: str, token: str | None = None, status: int = 200,
         **kw: Any) -> Any:
    """An API call that must answer ``status``; its JSON body. (The CLI costs a second a
    call on a busy machine, so checks that are not about the CLI go through the API.)"""
    response = hub.api(method, path, token, **kw)
    assert response.status_code == status, (response.status_code, response.text)
    return response.json()


def _show(hub: Hub, name: str) -> dict[str, Any]:
    found: dict[str, Any] = _api(hub, "GET", f"/v1/schedules/{name}")
    return found


def _create(hub: Hub, name: str, runbook: str, cron: str, **extra: Any) -> dict[str, Any]:
    made: dict[str, Any] = _api(hub, "POST", "/v1/schedules", status=201, json={
        "name": name, "runbook": runbook, "group": "web", "cron": cron, **extra})
    return made


def _runs(hub: Hub, schedule_id: str) -> list[tuple[float, str | None, int]]:
    """Every run of a schedule, oldest first, read from the hub's database."""
    rows = query(hub.database_url, "SELECT due_at, job_id, missed FROM schedule_runs "
                 f"WHERE schedule_id = '{schedule_id}' ORDER BY due_at")
    return [(float(d), j, int(m)) for d, j, m in rows]


def _jobs_of(hub: Hub, runbook: str) -> list[str]:
    rows = query(hub.database_url, f"SELECT id FROM jobs WHERE runbook_name = '{runbook}'")
    return [r[0] for r in rows]


def _assert_each_due_time_once(hub: Hub, schedule_id: str, runbook: str,
                               period: float = 1.0) -> list[tuple[float, str | None, int]]:
    """Every due time between the first and the last run was started once or counted as
    missed, and every job of the runbook belongs to exactly one run."""
    runs = _runs(hub, schedule_id)
    due = [d for d, _, _ in runs]
    assert due == sorted(set(due)), due
    assert all(d == int(d) for d in due), due  # no spread: whole cron seconds
    for (before, _, _), (after, _, missed) in zip(runs, runs[1:], strict=False):
        assert after - before == period * (1 + missed), runs
    job_ids = [j for _, j, _ in runs]
    assert None not in job_ids
    assert sorted(_jobs_of(hub, runbook)) == sorted(job_ids)  # no job without its run
    log = hub.log()
    assert "could not be fired" not in log and "Traceback" not in log, log
    return runs


def test_help_explains_the_commands() -> None:
    for args in (["schedule", "--help"], ["schedule", "create", "--help"],
                 ["webhook", "--help"], ["webhook", "create", "--help"]):
        done = run_cli(*args)
        assert done.returncode == 0, done.stderr
        assert "Usage" in done.stdout
    assert "--spread" in run_cli("schedule", "create", "--help").stdout


def test_create_list_show_disable_and_remove(hub: Hub, tmp_path: Path) -> None:
    _publish(hub, tmp_path, "nightly", "echo $who\n", "--param", "who")
    made = hub.cli("schedule", "create", "backup", "--runbook", "nightly", "--group", "web",
                   "--cron", "30 2 * * *", "--timezone", "Europe/Berlin", "--spread", "10m",
                   "--param", "who=ops")
    assert made.returncode == 0, made.stderr
    assert "Created schedule backup: nightly on group web, cron '30 2 * * *' " \
           "(Europe/Berlin)" in made.stdout
    assert "next run: " in made.stdout

    [listed] = _json(hub.cli("schedule", "list", "--json"))
    assert (listed["name"], listed["runbook_name"], listed["group_name"], listed["params"]) \
        == ("backup", "nightly", "web", {"who": "ops"})
    assert listed["spread_seconds"] == 600 and 0 <= listed["offset_seconds"] < 600
    # The next run is 02:30 in Berlin plus the schedule's offset, in the future.
    assert listed["next_run_at"] > time.time()
    cron_time = datetime.fromtimestamp(listed["next_run_at"] - listed["offset_seconds"],
                                       ZoneInfo("Europe/Berlin"))
    assert (cron_time.hour, cron_time.minute, cron_time.second) == (2, 30, 0)
    assert listed["next_run"] == datetime.fromtimestamp(
        listed["next_run_at"], ZoneInfo("Europe/Berlin")).isoformat(timespec="milliseconds")

    text = _wide(hub, "schedule", "list")
    assert text.returncode == 0, text.stderr
    for piece in ("backup", "nightly", "30 2 * * * (Europe/Berlin)", "10m (offset",
                  listed["next_run"][:19].replace("T", " "), "never"):
        assert piece in text.stdout, text.stdout
    shown = _wide(hub, "schedule", "show", "backup")
    assert "cron:      30 2 * * * (Europe/Berlin)" in shown.stdout, shown.stdout
    assert "no runs yet" in shown.stdout
    assert _show(hub, "backup")["runs"] == []

    duplicate = _api(hub, "POST", "/v1/schedules", status=409, json={
        "name": "backup", "runbook": "nightly", "group": "web", "cron": "@daily",
        "params": {"who": "x"}})
    assert duplicate["code"] == "E3009"

    assert hub.cli("schedule", "disable", "backup").returncode == 0
    assert _show(hub, "backup")["enabled"] is False
    assert _show(hub, "backup")["next_run"] is None
    enabled = _json(hub.cli("schedule", "enable", "backup", "--json"))
    assert enabled["enabled"] is True and enabled["next_run_at"] == listed["next_run_at"]

    removed = hub.cli("schedule", "remove", "backup")
    assert removed.returncode == 0 and "Removed schedule backup." in removed.stdout
    assert _api(hub, "GET", "/v1/schedules") == []
    _refused(hub.cli("schedule", "show", "backup"), "E3002", 1)
    assert _api(hub, "DELETE", "/v1/schedules/backup", status=404)["code"] == "E3002"


# SQLite only: validation, before anything is stored.
@SQLITE_ONLY
def test_bad_input_is_refused_with_its_code_and_nothing_is_stored(hub: Hub,
                                                                  tmp_path: Path) -> None:
    _publish(hub, tmp_path, "p", "true\n", "--param", "n:int")
    good = {"name": "s", "runbook": "p", "group": "web", "cron": "0 * * * *",
            "params": {"n": "1"}}
    # Through the API: the code, the message, never a 500.
    cases = [
        ({"cron": "61 * * * *"}, "E6001", "out of range"),
        ({"cron": "* * * *"}, "E6001", "it has 4 fields"),
        ({"cron": "0 0 31 2 *"}, "E6001", "matches no date"),
        ({"cron": "H * * * *"}, "E6001", "--spread"),
        ({"cron": "@reboot"}, "E6001", "unknown keyword"),
        ({"cron": "* * * * * * 2030"}, "E6001", "it has 7 fields"),
        ({"timezone": "Mars/Olympus"}, "E6002", "Mars/Olympus"),
        ({"timezone": "../../etc/passwd"}, "E6002", "Unknown time zone"),
        # NUL in any text is refused at the edge, naming the field (one rule on both databases).
        ({"timezone": "UTC\u0000"}, "E3003", "body.timezone: the text contains the NUL"),
        ({"spread": "ten minutes"}, "E7051", "ten minutes"),
        ({"spread": "8d"}, "E7051", "0s to 7d"),
        ({"spread": -5}, "E7051", "not a duration"),
        ({"runbook": "nope"}, "E3002", "No runbook 'nope'"),
        ({"params": {"n": "lots"}}, "E4003", "'n'"),
        ({"params": {"n": 1, "bogus": 1}}, "E4003", "Unknown parameter 'bogus'"),
        ({"params": {}}, "E4004", "'n'"),
        ({"group": "bad group!"}, "E3003", "Invalid group name"),
        ({"name": "bad name!"}, "E3003", "Invalid schedule name"),
    ]
    for change, code, text in cases:
        response = hub.api("POST", "/v1/schedules", json={**good, **change})
        assert 400 <= response.status_code < 500, (change, response.text)
        body = response.json()
        assert body["code"] == code and text in body["message"], (change, body)

    # Through the CLI: the same codes, exit 2 for what was typed wrong, 1 for a refusal.
    def create(*flags: str) -> Any:
        return hub.cli("schedule", "create", "s", "--runbook", "p", "--group", "web",
                       "--param", "n=1", *flags)

    assert "out of range" in _refused(create("--cron", "61 * * * *"), "E6001", 2)
    _refused(create("--cron", "@hourly", "--timezone", "Mars/Olympus"), "E6002", 2)
    _refused(create("--cron", "@hourly", "--spread", "ten minutes"), "E7051", 2)
    _refused(hub.cli("schedule", "create", "s", "--runbook", "nope", "--group", "web",
                     "--cron", "@hourly"), "E3002", 1)
    _refused(hub.cli("schedule", "create", "s", "--runbook", "p", "--group", "web",
                     "--cron", "@hourly", "--param", "n=lots"), "E4003", 2)
    _refused(create("--cron", "@hourly", "--param", "n=2"), "E8042", 2)
    assert _json(hub.cli("schedule", "list", "--json")) == []
    assert query(hub.database_url, "SELECT count(*) FROM schedules") == [(0,)]


def test_a_schedule_starts_its_jobs_on_a_real_agent(hub: Hub, agents: list[Agent],
                                                    tmp_path: Path) -> None:
    _publish(hub, tmp_path, "tick", 'echo "tick $who"\n', "--param", "who")
    agents.append(registered_agent(hub, tmp_path, "w1").start())
    made = _json(hub.cli("schedule", "create", "every-second", "--runbook", "tick",
                         "--group", "web", "--cron", "* * * * * *", "--param", "who=cron",
                         "--json"))

    def two_completed() -> list[dict[str, Any]]:
        runs = [r for r in _show(hub, "every-second")["runs"]
                if r["job_status"] == "Completed"]
        return runs if len(runs) >= 2 else []

    completed = wait_until(two_completed, 20, 0.2, "two scheduled jobs to complete")
    _api(hub, "POST", "/v1/schedules/every-second/disable")
    machine_id = hub.machines()["w1"]["id"]
    for run in completed:
        records = _api(hub, "GET", f"/v1/jobs/{run['job_id']}/output")
        assert [r["text"] for r in records] == ["tick cron"], records
        job = _api(hub, "GET", f"/v1/jobs/{run['job_id']}")
        assert job["params"] == {"who": "cron"} and job["runbook_name"] == "tick"
        assert job["machine_id"] == machine_id
        assert job["created_at"] >= run["due_at"]  # never before its time
    shown = _wide(hub, "schedule", "show", "every-second")
    # The table shows the start of each job id (any unique start is accepted back).
    assert completed[0]["job_id"][:8] in shown.stdout and "Completed" in shown.stdout
    assert completed[0]["job_id"] not in shown.stdout
    last = _show(hub, "every-second")
    assert last["last_run_at"] == max(r["due_at"] for r in last["runs"])
    _assert_each_due_time_once(hub, made["id"], "tick")


def test_each_due_run_starts_once_across_a_killed_hub(hub: Hub, tmp_path: Path) -> None:
    _publish(hub, tmp_path, "tock", "true\n")
    made = _create(hub, "tock", "tock", "* * * * * *")
    wait_until(lambda: len(_runs(hub, made["id"])) >= 3, 10, 0.1, "three runs")
    hub.stop(signal.SIGKILL)  # no graceful shutdown: wherever the loop was
    killed_at = time.time()
    time.sleep(2.5)  # due times pass while no hub runs
    hub.start()
    wait_until(lambda: sum(d > killed_at + 2.5 for d, _, _ in _runs(hub, made["id"])) >= 3,
               10, 0.1, "three runs after the restart")
    _api(hub, "POST", "/v1/schedules/tock/disable")

    runs = _assert_each_due_time_once(hub, made["id"], "tock")
    # The runs due while the hub was down: only the newest was started, the others counted.
    assert any(missed >= 1 for _, _, missed in runs), runs
    assert "started only the one due" in hub.log()


def test_two_hub_processes_on_one_database_start_each_run_once(hub: Hub,
                                                               tmp_path: Path) -> None:
    # A copy of the data directory: the same keys and database, its own log file.
    shutil.copytree(hub.data_dir, tmp_path / "hub2", ignore=shutil.ignore_patterns("*.log"))
    second = Hub(tmp_path / "hub2", free_port(), hub.database_url, hub.init).start()
    try:
        _publish(hub, tmp_path, "tock", "true\n")
        made = _create(hub, "tock", "tock", "* * * * * *")

        if hub.database_url.startswith("sqlite"):
            def fired() -> bool:
                # Each process started some runs, so they really raced for the others.
                return len(_runs(hub, made["id"])) >= 5 and all(
                    "schedule tock started job" in h.log() for h in (hub, second))

            wait_until(fired, 15, 0.2, "runs started by both hub processes")
        else:
            # On PostgreSQL only the replica holding the scheduler's lock fires (leader.py).
            wait_until(lambda: len(_runs(hub, made["id"])) >= 5, 15, 0.2, "five runs")
            roles = [h.api("GET", "/healthz").json()["scheduler"] for h in (hub, second)]
            assert sorted(roles) == ["leader", "standby"], roles
            standby = (hub, second)[roles.index("standby")]
            assert "schedule tock started job" not in standby.log()
        _api(hub, "POST", "/v1/schedules/tock/disable")
    finally:
        second.stop()
    _assert_each_due_time_once(hub, made["id"], "tock")
    assert "could not be fired" not in second.log() and "Traceback" not in second.log()


def test_spread_gives_each_schedule_a_stable_offset(hub: Hub, tmp_path: Path) -> None:
    _publish(hub, tmp_path, "snap", "true\n")
    names = [f"snap-{i}" for i in range(4)]
    for name in names:
        _create(hub, name, "snap", "0 * * * *", spread="30m")
    before = {s["name"]: s for s in _api(hub, "GET", "/v1/schedules")}
    offsets = [before[n]["offset_seconds"] for n in names]
    assert all(0 <= o < 1800 for o in offsets), offsets
    assert len(set(offsets)) == len(offsets), offsets  # the fleet does not fire at once
    for s in before.values():
        assert (s["next_run_at"] - s["offset_seconds"]) % 3600 == 0, s
        assert s["next_run_at"] > time.time()

    hub.stop()
    hub.start()
    after = {s["name"]: s for s in _api(hub, "GET", "/v1/schedules")}
    for name in names:
        assert after[name]["offset_seconds"] == before[name]["offset_seconds"]
        was, now = before[name]["next_run_at"], after[name]["next_run_at"]
        # Unchanged; or it fell due during the restart, fired, and is an hour on.
        assert now == was or (was <= time.time() and now == was + 3600), (was, now)

    # Runs really start at the offset: every 2 s, spread over 2 s.
    offset = _create(hub, "pulse", "snap", "*/2 * * * * *", spread="2s")["offset_seconds"]
    assert 0 <= offset < 2
    runs = wait_until(lambda: (lambda r: r if len(r) >= 2 else None)(
        _show(hub, "pulse")["runs"]), 12, 0.2, "two pulse runs")
    for run in runs:
        assert round(run["due_at"] - offset, 3) % 2 == 0, (run, offset)
        assert run["fired_at"] >= run["due_at"]


def test_another_accounts_schedules_answer_404(hub: Hub, tmp_path: Path) -> None:
    _publish(hub, tmp_path, "nightly", "true\n")
    _create(hub, "mine", "nightly", "@daily")
    other = _api(hub, "POST", "/v1/accounts", status=201, json={"name": "other"})["token"]

    assert _json(hub.cli("schedule", "list", "--json", token=other)) == []
    _refused(hub.cli("schedule", "show", "mine", token=other), "E3002", 1)
    for method, path in (("GET", "/v1/schedules/mine"), ("DELETE", "/v1/schedules/mine"),
                         ("POST", "/v1/schedules/mine/disable"),
                         ("POST", "/v1/schedules/mine/enable")):
        assert _api(hub, method, path, other, status=404)["code"] == "E3002"
    # Nor may another account schedule this account's runbook.
    refused = _api(hub, "POST", "/v1/schedules", other, status=404, json={
        "name": "theirs", "runbook": "nightly", "group": "web", "cron": "@daily"})
    assert refused["code"] == "E3002"

    [mine] = _api(hub, "GET", "/v1/schedules")
    assert mine["name"] == "mine" and mine["enabled"] is True


# Generated schedule and webhook requests: tests/unit/test_api_bad_input.py (the fast
# tier).


def test_schedule_parameters_are_typed_as_a_jobs_are(hub: Hub, agents: list[Agent],
                                                      tmp_path: Path) -> None:
    _publish(hub, tmp_path, "typed", 'echo "n=$n v=$v cfg=$cfg"\n', "--param", "n:int",
             "--param", "v:bool=false", "--param", "cfg:json={}")
    made = _json(hub.cli("schedule", "create", "typed", "--runbook", "typed", "--group", "web",
                         "--cron", "* * * * * *", "--param", "n=5", "--param", "v=yes",
                         "--param", 'cfg={"a": 1}', "--json"))
    # Stored typed, as the job check made them: what was given, not the defaults.
    assert made["params"] == {"n": 5, "v": True, "cfg": {"a": 1}}
    [stored] = query(hub.database_url, "SELECT params FROM schedules WHERE name = 'typed'")
    column = stored[0] if isinstance(stored[0], dict) else json.loads(stored[0])
    assert column == {"n": 5, "v": True, "cfg": {"a": 1}}
    shown = _wide(hub, "schedule", "show", "typed")
    assert 'params:    {"n": 5, "v": true, "cfg": {"a": 1}}' in shown.stdout, shown.stdout

    agents.append(registered_agent(hub, tmp_path, "w1").start())

    def completed() -> dict[str, Any] | None:
        runs = [r for r in _show(hub, "typed")["runs"] if r["job_status"] == "Completed"]
        return runs[0] if runs else None

    run = wait_until(completed, 20, 0.2, "a scheduled job to complete")
    _api(hub, "POST", "/v1/schedules/typed/disable")
    job = _api(hub, "GET", f"/v1/jobs/{run['job_id']}")
    assert job["params"] == {"n": 5, "v": True, "cfg": {"a": 1}}
    records = _api(hub, "GET", f"/v1/jobs/{run['job_id']}/output")
    assert [r["text"] for r in records] == ['n=5 v=true cfg={"a": 1}']

    # A bad value is refused at create with the code 'job start' gives it.
    started = hub.cli("job", "start", "typed", "--group", "web", "--param", "n=five")
    scheduled = hub.cli("schedule", "create", "bad", "--runbook", "typed", "--group", "web",
                        "--cron", "@hourly", "--param", "n=five")
    assert "Parameter 'n': 'five' is not an integer" in _refused(started, "E4003", 2)
    assert "Parameter 'n': 'five' is not an integer" in _refused(scheduled, "E4003", 2)
