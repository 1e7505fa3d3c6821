"""A schedule of an extension operation end to end (EX-7): a real hub, three real agents in
a group and a fourth machine whose agent never started. One run asks the operation of every
machine once, each at its own offset within the spread; the operations run on the machines
and succeed; the silent machine's operation fails at once (151099) without holding up the
others. (Firing on two replicas, on SQLite and PostgreSQL: tests/unit/test_ext_schedules.py.)
"""

from __future__ import annotations

import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from outpost.agent.extensions.runtime import shared_root
from tests import extbuild
from tests.support import (Agent, Hub, clean_env, healthy_agent, registered_agent, run_cli,
                           wait_until)

STATUS = ("status() { printf '{\"status\":\"%s\",\"code\":%s,\"message\":\"%s\"}' "
          "\"$1\" \"$2\" \"$3\" > \"$OUTPOST_EXT_STATUS_DIR/$OUTPOST_EXT_SEQ.status\"; }\n")
SPREAD = 6.0


def _package(shared: Path) -> bytes:
    def script(body: str) -> tuple[bytes, int]:
        return (f"#!/bin/sh\n{STATUS}{body}\nstatus success 0 ok\n").encode(), 0o755

    files = {f"bin/{h}": script("") for h in
             ("install", "enable", "disable", "update", "uninstall")}
    # Each run appends the time it started and the operation's id.
    files["bin/snap"] = script(f'echo "$(date +%s.%N) $OUTPOST_EXT_OP_ID" >> {shared}/snaps')
    manifest = extbuild.manifest("tiny", "1.0.0", operations={
        "snap": {"run": "bin/snap", "pressure": False, "start_timeout_seconds": 60}})
    return extbuild.package(manifest, files=files)


def _api(hub: Hub, method: str, path: str, status: int = 200, **kw: Any) -> Any:
    response = hub.api(method, path, **kw)
    assert response.status_code == status, response.text
    return response.json()


def _states(hub: Hub) -> dict[str, str]:
    return {r["machine"]: r["state"] for r in _api(hub, "GET", "/v1/extensions/tiny/machines")}


def test_a_scheduled_operation_runs_once_on_each_machine_spread_over_the_window(
        sqlite_hub: Hub, agents: list[Agent], shared: Path, tmp_path: Path) -> None:
    hub = sqlite_hub
    started = [healthy_agent(hub, tmp_path, agents, name) for name in ("w1", "w2", "w3")]
    registered_agent(hub, tmp_path, "w4")  # in the group, its agent never started
    try:
        _api(hub, "POST", "/v1/extensions", 201, content=_package(shared),
             headers={"Content-Type": "application/gzip"})
        _api(hub, "PUT", "/v1/extensions/tiny/targets/group/web", json={})
        wait_until(lambda: all(_states(hub).get(n) == "Ready" for n in ("w1", "w2", "w3")),
                   60, 0.3, f"tiny Ready on w1-w3: {_states(hub)}")

        # Exactly one of --runbook and --extension (with --operation), of --group and
        # --machine: refused with its code, exit 2, nothing stored.
        for flags, code in ((["--group", "web"], "E8125"),
                            (["--runbook", "r", "--extension", "tiny", "--operation", "snap",
                              "--group", "web"], "E8125"),
                            (["--extension", "tiny", "--operation", "snap", "--group", "web",
                              "--machine", "w1"], "E8126")):
            refused = hub.cli("schedule", "create", "bad", "--cron", "@daily", *flags)
            assert refused.returncode == 2, (refused.stdout, refused.stderr)
            assert f"code:   {code}" in refused.stderr and "Traceback" not in refused.stderr
        assert _api(hub, "GET", "/v1/schedules") == []

        # A cron time a few seconds ahead, to the second (6 fields): one run, then a year.
        due = datetime.fromtimestamp(int(time.time()) + 12, timezone.utc)
        cron = f"{due.second} {due.minute} {due.hour} {due.day} {due.month} *"
        made = hub.cli("schedule", "create", "snaps", "--extension", "tiny", "--operation",
                       "snap", "--group", "web", "--cron", cron, "--spread", f"{SPREAD:g}s",
                       "--param", "keep=7", "--json")
        assert made.returncode == 0, made.stderr
        schedule = json.loads(made.stdout)
        assert schedule["next_run_at"] == due.timestamp(), (schedule, due)
        [listed] = _api(hub, "GET", "/v1/schedules")
        assert (listed["kind"], listed["extension"], listed["operation"], listed["target"]) \
            == ("extension", "tiny", "snap", "web"), listed

        def ended() -> list[dict[str, Any]]:
            ops = _api(hub, "GET", "/v1/extension-operations")
            done = [o for o in ops if o["status"] in ("Succeeded", "Failed")]
            return ops if len(ops) == 4 and len(done) == 4 else []

        ops = wait_until(ended, 60, 0.3, "four scheduled operations to end: "
                         f"{_api(hub, 'GET', '/v1/extension-operations')}\n"
                         f"{started[0].log()[-2000:]}")
        by_machine = {o["machine"]: o for o in ops}
        assert sorted(by_machine) == ["w1", "w2", "w3", "w4"]  # one each
        for name in ("w1", "w2", "w3"):
            op = by_machine[name]
            assert op["status"] == "Succeeded", op
            assert op["schedule_id"] == schedule["id"] and op["params"] == {"keep": "7"}
            assert due.timestamp() <= op["not_before"] < due.timestamp() + SPREAD, op
            assert op["started_at"] >= op["not_before"] - 0.05, op  # never before its time
        offsets = sorted(by_machine[n]["not_before"] for n in ("w1", "w2", "w3"))
        assert len(set(offsets)) == 3, offsets  # not at one second
        silent = by_machine["w4"]
        assert (silent["status"], silent["code"]) == ("Failed", "E9080"), silent
        assert "151099" in silent["message"], silent
        # Each machine ran it once, at (or just after) its own start time.
        lines = (shared / "snaps").read_text().split()
        ran = dict(zip(lines[1::2], (float(t) for t in lines[0::2]), strict=True))
        assert sorted(ran) == sorted(by_machine[n]["id"] for n in ("w1", "w2", "w3"))
        for name in ("w1", "w2", "w3"):
            op = by_machine[name]
            assert op["not_before"] - 0.05 <= ran[op["id"]] < op["not_before"] + 10, (op, ran)

        listed_text = run_cli("schedule", "list", "--hub", hub.url, "--token",
                              hub.admin_token, "--ca-fingerprint", hub.fingerprint,
                              env=clean_env(COLUMNS="220"))
        assert listed_text.returncode == 0, listed_text.stderr
        for piece in ("snaps", "tiny snap", "every machine of group web", "6s (each machine"):
            assert piece in listed_text.stdout, listed_text.stdout
        shown = _api(hub, "GET", "/v1/schedules/snaps")
        [run] = shown["runs"]
        assert (run["due_at"], run["operations"], run["skipped"]) == (due.timestamp(), 4, 0)
        assert run["operation_states"] == {"Succeeded": 3, "Failed": 1}, run
        text = run_cli("schedule", "show", "snaps", "--hub", hub.url, "--token",
                       hub.admin_token, "--ca-fingerprint", hub.fingerprint,
                       env=clean_env(COLUMNS="220"))
        assert text.returncode == 0, text.stderr
        for piece in ("operation snap of extension tiny on every machine of group web",
                      "6s (each machine at its own offset)", "1 Failed, 3 Succeeded",
                      "operations of the newest run", "w4", "E9080", by_machine["w2"]["id"]):
            assert piece in text.stdout, text.stdout
        assert "could not be fired" not in hub.log() and "Traceback" not in hub.log()
    finally:
        for agent in agents:
            agent.stop()
        for agent in started:
            shutil.rmtree(shared_root(agent.state_dir), ignore_errors=True)
