"""Consistent commands against a real hub: job id prefixes and short ids, runbook remove
and unchanged publish, duplicate --param, empty stdin, one duration code, did-you-mean."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.support import Hub, publish_script, register, run_cli


def _cli(hub: Hub, *args: str, input: str | None = None, columns: int = 80
         ) -> tuple[int, str, str]:
    from tests.support import clean_env

    done = run_cli(*args, "--hub", hub.url, "--token", hub.admin_token, "--ca-fingerprint",
                   hub.fingerprint, input=input, env=clean_env(COLUMNS=str(columns)))
    return done.returncode, done.stdout, done.stderr


def _execute(database_url: str, sql: str) -> None:
    """One statement, committed (tests.support.query reads)."""
    if database_url.startswith("sqlite:///"):
        import sqlite3

        with sqlite3.connect(database_url[len("sqlite:///"):]) as conn:
            conn.execute(sql)
        return
    import psycopg

    with psycopg.connect(database_url) as pg:  # commits on leaving
        pg.execute(sql)  # type: ignore[arg-type]


def _start(hub: Hub, runbook: str = "greet", group: str = "web") -> str:
    answer = hub.api("POST", "/v1/jobs", json={"runbook": runbook, "group": group})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def test_job_ids_by_unique_prefix_and_short_in_tables(hub: Hub, tmp_path: Path) -> None:
    publish_script(hub, tmp_path, "greet", "echo hello\n")
    first, second, third = _start(hub), _start(hub), _start(hub)
    # Two ids sharing their first 9 characters, as uuid4 gives now and then.
    a, b = "abcd1234-0000-4000-8000-00000000000a", "abcd1234-5000-4000-8000-00000000000b"
    _execute(hub.database_url, f"UPDATE jobs SET id = '{a}' WHERE id = '{first}'")
    _execute(hub.database_url, f"UPDATE jobs SET id = '{b}' WHERE id = '{second}'")

    code, out, err = _cli(hub, "job", "show", "abcd")
    assert code == 2 and "E8040" in err, err
    assert a in err and b in err  # the candidates are named
    code, out, err = _cli(hub, "job", "show", "abcd1234-0", "--json")
    assert code == 0 and json.loads(out)["id"] == a, err
    code, out, err = _cli(hub, "job", "show", third[:6], "--json")
    assert code == 0 and json.loads(out)["id"] == third, err
    code, out, err = _cli(hub, "job", "show", third[:3])
    assert code == 1 and "E3002" in err and "at least 4" in err, err
    code, out, err = _cli(hub, "job", "output", third[:5], "--json")
    assert code == 0 and json.loads(out) == [], err
    code, out, err = _cli(hub, "job", "stop", "abcd1234-5", "--json")
    assert code == 0 and json.loads(out)["id"] == b and json.loads(out)["status"] == "Stopped"
    # The API takes prefixes too.
    assert hub.api("GET", f"/v1/jobs/{third[:8]}").json()["id"] == third
    assert hub.api("GET", "/v1/jobs/abcd").json()["code"] == "E8040"

    code, out, err = _cli(hub, "job", "list")
    assert code == 0, err
    assert all(len(line) <= 80 for line in out.splitlines()), out
    shown = {line.split()[0] for line in out.splitlines()[1:] if line.strip()}
    assert {"abcd1234-0", "abcd1234-5", third[:8]} <= shown, out  # unique, as short as may be
    assert third not in out
    code, out, err = _cli(hub, "job", "list", "--json")
    assert {a, b, third} <= {j["id"] for j in json.loads(out)}


def test_unknown_group_and_runbook_say_did_you_mean(sqlite_hub: Hub, tmp_path: Path) -> None:
    hub = sqlite_hub
    assert register(hub, tmp_path / "agent", "m1", "local").returncode == 0
    publish_script(hub, tmp_path, "greet", "echo hello\n")

    code, out, err = _cli(hub, "job", "start", "greet", "--group", "lcoal")
    assert code == 0, err
    assert "warning: no group 'lcoal'; did you mean 'local'?" in err
    answer = hub.api("POST", "/v1/jobs", json={"runbook": "greet", "group": "lcoal"}).json()
    assert answer["warnings"] == ["no group 'lcoal'; did you mean 'local'?"]
    assert hub.api("POST", "/v1/jobs", json={"runbook": "greet", "group": "local"}
                   ).json()["warnings"] == []
    job = hub.api("GET", f"/v1/jobs/{out.strip()}").json()
    assert job["status"] == "Queued" and job["group_name"] == "lcoal"  # queued all the same
    code, out, err = _cli(hub, "job", "start", "greet", "--group", "lcoal", "--count", "2")
    assert code == 0 and err.count("did you mean 'local'?") == 1, err
    code, out, err = _cli(hub, "job", "start", "greet", "--group", "local")
    assert code == 0 and "did you mean" not in err, err

    code, out, err = _cli(hub, "job", "start", "gret", "--group", "local")
    assert code == 1 and "No runbook 'gret' in this account." in err
    assert "Did you mean 'greet'?" in err
    code, out, err = _cli(hub, "schedule", "create", "s", "--runbook", "gret", "--group",
                          "local", "--cron", "@hourly")
    assert code == 1 and "Did you mean 'greet'?" in err, err


def test_runbook_remove_and_unchanged_publish(sqlite_hub: Hub, tmp_path: Path) -> None:
    hub = sqlite_hub
    script = tmp_path / "greet.sh"
    script.write_text("#!/bin/bash\necho hello\n")
    publish = ("runbook", "publish", "greet", str(script), "--param", "body:string=",
               "--description", "says hello")
    code, out, err = _cli(hub, *publish)
    assert code == 0 and "version 1" in out, err
    code, out, err = _cli(hub, *publish)
    assert code == 0 and out.startswith("Unchanged: greet version 1"), out
    assert hub.api("GET", "/v1/runbooks").json()[0]["versions"] == 1
    body = {"name": "greet", "content": script.read_text(), "filename": "greet.sh",
            "params": ["body:string="], "description": "says hello"}
    same = hub.api("POST", "/v1/runbooks", json=body)
    assert same.status_code == 200 and same.json()["unchanged"] is True, same.text
    assert same.json()["version"] == 1
    changed = hub.api("POST", "/v1/runbooks", json={**body, "description": "greets"})
    assert changed.status_code == 201 and changed.json()["version"] == 2, changed.text
    assert changed.json()["unchanged"] is False

    assert _cli(hub, "schedule", "create", "nightly", "--runbook", "greet", "--group", "web",
                "--cron", "0 3 * * *")[0] == 0
    assert _cli(hub, "webhook", "create", "deploy", "--runbook", "greet", "--group",
                "web")[0] == 0
    job = _start(hub)
    code, out, err = _cli(hub, "runbook", "remove", "greet")
    assert code == 1 and "E8041" in err, err
    assert "schedule 'nightly'" in err and "webhook 'deploy'" in err and job in err
    assert _cli(hub, "schedule", "remove", "nightly")[0] == 0
    assert _cli(hub, "webhook", "remove", "deploy")[0] == 0
    code, out, err = _cli(hub, "runbook", "remove", "greet")
    assert code == 1 and f"job {job}" in err and "schedule 'nightly'" not in err, err
    assert _cli(hub, "job", "stop", job)[0] == 0
    code, out, err = _cli(hub, "runbook", "remove", "greet")
    assert code == 0 and out.strip() == "Removed runbook greet (2 versions).", out + err
    assert hub.api("GET", "/v1/runbooks").json() == []
    assert hub.api("GET", "/v1/runbooks/greet").json()["code"] == "E3002"
    # The job's history stays readable, and a new greet does not reuse the number it ran.
    shown = hub.api("GET", f"/v1/jobs/{job}").json()
    assert (shown["runbook_name"], shown["runbook_version"]) == ("greet", 2)
    code, out, err = _cli(hub, *publish)
    assert code == 0 and "version 3" in out, out + err
    code, out, err = _cli(hub, "runbook", "remove", "gret")
    assert code == 1 and "Did you mean 'greet'?" in err, err


def test_duplicate_params_and_empty_stdin_are_refused(sqlite_hub: Hub,
                                                      tmp_path: Path) -> None:
    hub = sqlite_hub
    publish_script(hub, tmp_path, "greet", "echo $x\n", "--param", "x:int=0", "--param",
                   "body:string=")
    for command in (("job", "start", "greet", "--group", "web"),
                    ("schedule", "create", "s", "--runbook", "greet", "--group", "web",
                     "--cron", "@hourly"),
                    ("webhook", "create", "w", "--runbook", "greet", "--group", "web")):
        code, out, err = _cli(hub, *command, "--param", "x=1", "--param", "x=2")
        assert code == 2 and "E8042" in err and "Parameter 'x' is given twice" in err, err
    assert hub.api("GET", "/v1/jobs").json() == []
    assert hub.api("GET", "/v1/schedules").json() == []
    assert hub.api("GET", "/v1/webhooks").json() == []

    code, out, err = _cli(hub, "asset", "variable", "set", "v", input="")
    assert code == 2 and "E8043" in err and "--allow-empty" in err, err
    assert hub.api("GET", "/v1/assets").json() == []
    code, out, err = _cli(hub, "asset", "variable", "set", "v", "-", input="\n")
    assert code == 2 and "E8043" in err, err
    code, out, err = _cli(hub, "asset", "variable", "set", "v", "--allow-empty", input="")
    assert code == 0, err
    assert hub.api("GET", "/v1/assets/variables/v").json()["value"] == ""
    code, out, err = _cli(hub, "asset", "variable", "set", "v", input="value\n")
    assert code == 0 and hub.api("GET", "/v1/assets/variables/v").json()["value"] == "value"


def test_durations_have_one_parser_and_one_code(sqlite_hub: Hub, tmp_path: Path) -> None:
    hub = sqlite_hub
    publish_script(hub, tmp_path, "greet", "echo hello\n")
    for field, path, extra in (("timeout", "/v1/jobs", {}),
                               ("spread", "/v1/schedules",
                                {"name": "s1", "cron": "@hourly"})):
        body = {"runbook": "greet", "group": "web", **extra}
        refused = hub.api("POST", path, json={**body, field: "5x"})
        assert refused.status_code == 422 and refused.json()["code"] == "E7051", refused.text
        assert f"{field} '5x' is not a duration" in refused.json()["message"]
        taken = hub.api("POST", path, json={**body, field: "10min"})
        assert taken.status_code == 201, taken.text
        assert taken.json()[f"{field}_seconds"] == 600
    too_long = hub.api("POST", "/v1/jobs", json={"runbook": "greet", "group": "web",
                                                  "timeout": "8d"})
    assert too_long.json()["code"] == "E7051" and "to 7d" in too_long.json()["message"]

    code, out, err = _cli(hub, "schedule", "create", "s2", "--runbook", "greet", "--group",
                          "web", "--cron", "@hourly", "--spread", "10min", "--json")
    assert code == 0 and json.loads(out)["spread_seconds"] == 600, err
    code, out, err = _cli(hub, "job", "start", "greet", "--group", "web", "--timeout",
                          "1h30m", "--json")
    assert code == 0 and json.loads(out)["timeout_seconds"] == 5400, err
    for args in (("job", "start", "greet", "--group", "web", "--timeout", "5x"),
                 ("schedule", "create", "s3", "--runbook", "greet", "--group", "web",
                  "--cron", "@hourly", "--spread", "5x"),
                 ("machine", "ping", "m1", "--timeout", "5x")):
        code, out, err = _cli(hub, *args)
        assert code == 2 and "E7051" in err and re.search(r"--\w+ '5x'", err), (args, err)
