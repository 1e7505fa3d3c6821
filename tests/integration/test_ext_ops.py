"""Extension operations end to end: a real hub (SQLite and PostgreSQL) and a real agent
process. The operator asks for an operation through the CLI or the API; the hub hands it to
the agent as an ext_op work item; the agent runs the operation's command (as the extension
user when root) and reports its start and end, which the hub shows.

The operations' scripts write into a directory every user may write, so the test reads
what they were given and when they ran.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from outpost.agent.extensions.runtime import shared_root
from tests import extbuild
from tests.support import Agent, Hub, healthy_agent, run_cli, wait_until

NAME = "ops"
STATUS = ("status() { printf '{\"status\":\"%s\",\"code\":%s,\"message\":\"%s\"%s}' "
          "\"$1\" \"$2\" \"$3\" \"$4\" > \"$OUTPOST_EXT_STATUS_DIR/$OUTPOST_EXT_SEQ.status\"; }\n")


def _script(body: str) -> tuple[bytes, int]:
    return (f"#!/bin/sh\n{STATUS}{body}\n").encode(), 0o755


def build(shared: Path) -> bytes:
    ok = 'status success 0 ok ""'
    operations = {
        "snap": {"run": "bin/snap", "start_timeout_seconds": 20, "pressure": False},
        "flaky": {"run": "bin/flaky", "pressure": False},
        "slow": {"run": "bin/slow", "expected_seconds": 3, "pressure": False},
        "quick": {"run": "bin/quick", "start_timeout_seconds": 2, "pressure": False},
        "broken": {"run": "bin/broken", "pressure": False},
    }
    files = {f"bin/{h}": _script(ok) for h in ("install", "enable", "update", "uninstall")}
    files["bin/disable"] = _script(f"if [ -e {shared}/slow-disable ]; then sleep 1; fi\n{ok}")
    files["bin/snap"] = _script(
        f"cat > {shared}/snap-stdin\necho snapshot taken\n"
        f"date +%s.%N >> {shared}/snap-times\n"
        'status success 0 "snapshot taken" \',"result":{"id":"snap-1","files":3}\'')
    files["bin/flaky"] = _script(
        f"if [ -e {shared}/flaky-once ]; then status success 0 second ''; exit 0; fi\n"
        f"touch {shared}/flaky-once\necho repository locked\n"
        "status error 7 'repository locked' ',\"transient\":true'")
    files["bin/slow"] = _script(f"sleep 6\ndate +%s.%N >> {shared}/slow-end\n{ok}")
    files["bin/quick"] = _script(ok)
    files["bin/broken"] = _script("echo disk on fire >&2\nexit 3")
    manifest = extbuild.manifest(NAME, "1.0.0", operations=operations)
    return extbuild.package(manifest, files=files)


def ask(hub: Hub, machine: str, operation: str, name: str = NAME,
        **params: Any) -> Any:
    return hub.api("POST", f"/v1/machines/{machine}/extensions/{name}/operations/{operation}",
                   json={"params": params})


def op(hub: Hub, op_id: str) -> dict[str, Any]:
    response = hub.api("GET", f"/v1/extension-operations/{op_id}")
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def wait_op(hub: Hub, agent: Agent, op_id: str, status: str,
            timeout: float = 30) -> dict[str, Any]:
    found: dict[str, Any] = wait_until(
        lambda: (row := op(hub, op_id))["status"] == status and row, timeout, 0.1,
        what=f"operation {op_id} {status}: {op(hub, op_id)}\n{agent.log()[-3000:]}")
    return found


def ext_state(hub: Hub, machine: str) -> str | None:
    rows = hub.api("GET", f"/v1/machines/{machine}/extensions").json()
    return next((r["state"] for r in rows if r["name"] == NAME), None)


def refused(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["code"] == code, body
    return body


def test_operations_run_retry_queue_and_are_refused_when_they_cannot_run(
        hub: Hub, agents: list[Agent], shared: Path, tmp_path: Path) -> None:
    agent = healthy_agent(hub, tmp_path, agents, "m1")
    try:
        response = hub.api("POST", "/v1/extensions", content=build(shared),
                           headers={"Content-Type": "application/gzip"})
        assert response.status_code == 201, response.text
        newer = extbuild.manifest("newer", "1.0.0", min_agent_version="99.0",
                                  operations={"snap": {"run": "bin/snap"}})
        response = hub.api("POST", "/v1/extensions", content=extbuild.package(newer),
                           headers={"Content-Type": "application/gzip"})
        assert response.status_code == 201, response.text
        for name in (NAME, "newer"):
            response = hub.api("PUT", f"/v1/extensions/{name}/targets/machine/m1",
                               json={"settings": {"where": "/srv"}})
            assert response.status_code == 200, response.text
        wait_until(lambda: ext_state(hub, "m1") == "Ready", 30,
                   what=f"{NAME} Ready\n{agent.log()[-2000:]}")

        # An operation that succeeds, with its result, through the CLI.
        done = hub.cli("extension", "run", NAME, "snap", "--machine", "m1", "--param",
                       "path=/data", "--wait", "--json")
        assert done.returncode == 0, done.stdout + done.stderr + agent.log()[-2000:]
        shown = json.loads(done.stdout)
        assert shown["status"] == "Succeeded" and shown["result"] == {"id": "snap-1",
                                                                      "files": 3}, shown
        assert "snapshot taken" in shown["output"], shown
        assert shown["requested_by"] == "admin" and shown["attempt"] == 1, shown
        assert json.loads((shared / "snap-stdin").read_text()) == {
            "settings": {"where": "/srv"}, "protected": {}, "params": {"path": "/data"}}
        listed = hub.cli("extension", "operations", "--machine", "m1", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [r["id"] for r in json.loads(listed.stdout)] == [shown["id"]]
        text = hub.cli("extension", "operation", shown["id"])
        assert text.returncode == 0 and "Succeeded" in text.stdout, text.stdout

        # A transient failure is tried again with backoff (EX-12), visible meanwhile.
        flaky = ask(hub, "m1", "flaky").json()
        between = wait_until(
            lambda: (row := op(hub, flaky["id"]))["attempt"] == 2 and row, 30, 0.05,
            what=f"the second attempt: {op(hub, flaky['id'])}")
        assert "attempt 1 of 3 failed (7: repository locked)" in between["message"], between
        assert between["next_try_at"] is not None
        ended = wait_op(hub, agent, flaky["id"], "Succeeded")
        assert ended["attempt"] == 2, ended

        # Refused at once: an agent older than the extension needs (151095), an unknown
        # operation, an extension the machine does not have.
        body = refused(ask(hub, "m1", "snap", name="newer"), 409, "E9082")
        assert "151095" in body["message"] and "99.0" in body["message"], body
        refused(ask(hub, "m1", "nope"), 404, "E9086")
        refused(ask(hub, "m1", "snap", name="absent"), 404, "E9085")

        # One operation at a time per extension: the next waits behind the running one;
        # past its expected time, a new one is refused (150066).
        slow = ask(hub, "m1", "slow").json()
        wait_op(hub, agent, slow["id"], "Running")
        behind = ask(hub, "m1", "snap")
        assert behind.status_code == 201, behind.text
        assert behind.json()["status"] == "Queued"
        wait_until(lambda: time.time() > (op(hub, slow["id"])["expected_end"] or 0) + 0.2, 10)
        body = refused(ask(hub, "m1", "snap"), 409, "E9083")
        assert "150066" in body["message"] and slow["id"] in body["message"], body
        slow_done = wait_op(hub, agent, slow["id"], "Succeeded")
        snap_done = wait_op(hub, agent, behind.json()["id"], "Succeeded")
        assert snap_done["started_at"] >= slow_done["ended_at"] - 0.5, (slow_done, snap_done)

        # Uninstalled from the machine; the next operation installs it again (EX-5).
        gone = hub.cli("extension", "uninstall", NAME, "--machine", "m1")
        assert gone.returncode == 0, gone.stderr
        wait_until(lambda: ext_state(hub, "m1") in (None, "NotInstalled"), 30,
                   what=f"uninstalled\n{agent.log()[-2000:]}")
        again = ask(hub, "m1", "snap").json()
        assert again["status"] == "Waiting" and "installed again" in again["message"], again
        wait_op(hub, agent, again["id"], "Succeeded")
        assert ext_state(hub, "m1") == "Ready"
        # Asked while the agent has not yet uninstalled it (its disable handler takes a
        # second): the hold stays until the agent reports it uninstalled, so the machine
        # still uninstalls and installs it again rather than keeping what it had.
        uninstalled = f"extension {NAME}: uninstalled"
        before = agent.log().count(uninstalled)
        (shared / "slow-disable").touch()
        held = hub.api("POST", f"/v1/machines/m1/extensions/{NAME}/uninstall")
        assert held.status_code == 200, held.text
        soon = ask(hub, "m1", "snap").json()
        assert soon["status"] == "Waiting", soon
        assert f"waiting for extension {NAME} to be uninstalled on m1 and installed again" \
            in soon["message"], soon
        wait_op(hub, agent, soon["id"], "Succeeded")
        assert agent.log().count(uninstalled) == before + 1, agent.log()[-3000:]
        assert ext_state(hub, "m1") == "Ready"
        (shared / "slow-disable").unlink()

        # A failing operation: --wait exits 1 and shows why.
        failing = hub.cli("extension", "run", NAME, "broken", "--machine", "m1", "--wait")
        assert failing.returncode == 1, failing.stdout + failing.stderr
        assert "Failed" in failing.stdout and "E9089" in failing.stdout, failing.stdout
        assert "disk on fire" in failing.stdout, failing.stdout

        # Extensions installed (one refused as too new), Ready, reported, uninstalled and
        # installed again, operations run, retried, queued and failed: the agent never
        # loaded pydantic (it reads and writes the extensions' wire with
        # protocol/extreaders.py: its memory budget, docs/architecture.md).
        assert agent.proc is not None
        assert "_pydantic_core" not in Path(f"/proc/{agent.proc.pid}/maps").read_text()
        local = json.loads(run_cli("agent", "status", "--state-dir", str(agent.state_dir),
                                   "--json").stdout)
        assert {e["name"]: e["state"] for e in local["extensions"]}[NAME] == "Ready", local

        # The agent killed: an operation asked before the hub notices is not started within
        # its start timeout (151076); once the heartbeats are missed, refused at once (151099).
        agent.stop(signal.SIGKILL)
        lost = ask(hub, "m1", "quick")
        assert lost.status_code == 201, lost.text
        failed = wait_op(hub, agent, lost.json()["id"], "Failed", 15)
        assert failed["code"] == "151076", failed
        assert failed["message"].startswith("Job execution timed out while tracking for "
                                            "extension operation to be started"), failed
        wait_until(lambda: hub.machines()["m1"]["status"] in ("Unresponsive",
                                                              "Disconnected"), 15)
        body = refused(ask(hub, "m1", "quick"), 409, "E9080")
        assert "151099" in body["message"] and "unresponsive" in body["message"], body
        assert "last heard from" in body["message"], body

        # Stopped by its service manager (SIGTERM): refused at once saying so (EX-10).
        agent.start()
        wait_until(lambda: hub.machines()["m1"]["status"] == "Healthy", 15)
        agent.stop()
        wait_until(lambda: hub.machines()["m1"]["status"] == "Stopped", 15)
        body = refused(ask(hub, "m1", "quick"), 409, "E9081")
        assert "stopping at" in body["message"], body
        cli = hub.cli("extension", "run", NAME, "quick", "--machine", "m1")
        assert cli.returncode == 1 and "E9081" in cli.stdout + cli.stderr, cli
        explained = run_cli("explain", "151076")
        assert explained.returncode == 0 and "E9084" in explained.stdout, explained.stdout
    finally:
        for agent_ in agents:
            agent_.stop()
        shutil.rmtree(shared_root(agent.state_dir), ignore_errors=True)
