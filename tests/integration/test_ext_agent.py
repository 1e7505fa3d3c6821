"""Extensions end to end: a real hub and a real agent process, on SQLite (the agent's side is
the subject; the hub's goals and reports run on both databases in tests/unit/test_ext_goals.py).
The operator publishes packages and sets goals through the hub's API; the agent notices the
heartbeat's etag, fetches its goals and packages, runs the handlers (as the extension user
when root, in the extension's control group) and reports each state, which the hub shows.

The packages' handlers append to a trace file in a directory every user may write, so the
test reads what ran, in which order, and as whom.
"""

from __future__ import annotations

import io
import json
import os
import pwd
import re
import shutil
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any

from outpost.agent.extensions.runtime import shared_root
from tests.support import SQLITE_ONLY, Agent, Hub, healthy_agent, run_cli, wait_until

NAME = "demo"
OK = 'status success 0 "all good"'


def build(version: str, trace: Path, bodies: dict[str, str] | None = None,
          timeout: float = 30) -> bytes:
    files: dict[str, tuple[bytes, int]] = {}
    handlers = {}
    for handler in ("install", "enable", "disable", "update", "uninstall"):
        script = (
            "#!/bin/sh\n"
            "status() { printf '{\"status\":\"%s\",\"code\":%s,\"message\":\"%s\"}' "
            "\"$1\" \"$2\" \"$3\" > \"$OUTPOST_EXT_STATUS_DIR/$OUTPOST_EXT_SEQ.status\"; }\n"
            f"echo \"{handler} $OUTPOST_EXT_VERSION $(id -u)\" >> {trace}\n"
            f"{(bodies or {}).get(handler, OK)}\n")
        files[f"bin/{handler}"] = (script.encode(), 0o755)
        handlers[handler] = {"run": f"bin/{handler}", "timeout_seconds": timeout}
    manifest = {"name": NAME, "version": version, "handlers": handlers,
                "limits": {"memory_mb": 64}}
    files["outpost-extension.json"] = (json.dumps(manifest).encode(), 0o644)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for path, (data, mode) in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def publish(hub: Hub, data: bytes) -> None:
    response = hub.api("POST", "/v1/extensions", content=data,
                       headers={"Content-Type": "application/gzip"})
    assert response.status_code in (200, 201), response.text


def set_goal(hub: Hub, machine: str, **change: Any) -> None:
    response = hub.api("PUT", f"/v1/extensions/{NAME}/targets/machine/{machine}",
                       json=change)
    assert response.status_code == 200, response.text


def state(hub: Hub, machine: str) -> dict[str, Any] | None:
    response = hub.api("GET", f"/v1/machines/{machine}/extensions")
    assert response.status_code == 200, response.text
    return next((row for row in response.json() if row["name"] == NAME), None)


def ran(trace: Path) -> list[tuple[str, str]]:
    if not trace.exists():
        return []
    return [(line.split()[0], line.split()[1]) for line in trace.read_text().splitlines()]


def wait_state(hub: Hub, agent: Agent, machine: str, want: dict[str, Any],
               timeout: float = 30) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        row = state(hub, machine)
        if row is not None and all(row.get(k) == v for k, v in want.items()):
            return row
        return None
    found: dict[str, Any] = wait_until(check, timeout, 0.1,
                                       what=f"{NAME} {want} on {machine}: {state(hub, machine)}"
                                       f"\n{agent.log()[-3000:]}")
    return found


# SQLite only: the agent's handlers (the hub's goals and reports on both databases:
# tests/unit/test_ext_goals.py).
@SQLITE_ONLY
def test_an_extension_installs_updates_rolls_back_and_uninstalls(
        hub: Hub, agents: list[Agent], shared: Path, tmp_path: Path) -> None:
    agent = healthy_agent(hub, tmp_path, agents, "m1")
    trace = shared / "trace"
    stdin_copy = shared / "stdin"
    secret = f"pw-{uuid.uuid4().hex}"
    try:
        publish(hub, build("1.0.0", trace, {"enable": f"cat > {stdin_copy}; {OK}"}))
        set_goal(hub, "m1", version="1.0.0", settings={"paths": ["/srv"]},
                 protected_settings={"password": secret})
        row = wait_state(hub, agent, "m1", {"state": "Ready", "version": "1.0.0"})
        assert row["failed_versions"] == [] and row["last_ready_version"] == "1.0.0"
        assert ran(trace) == [("install", "1.0.0"), ("enable", "1.0.0")]
        # The protected settings reached the handler on stdin, decrypted, and no file on
        # the machine holds them.
        assert json.loads(stdin_copy.read_text()) == {"settings": {"paths": ["/srv"]},
                                                       "protected": {"password": secret}}
        stdin_copy.unlink()
        for root in (agent.state_dir, shared_root(agent.state_dir)):
            for path in root.rglob("*"):
                if path.is_file():
                    assert secret.encode() not in path.read_bytes(), path
        if os.geteuid() == 0:
            uid = pwd.getpwnam("outpost-ext").pw_uid
            assert {line.split()[2] for line in trace.read_text().splitlines()} == {str(uid)}

        # 'outpost agent status' shows it.
        shown = run_cli("agent", "status", "--state-dir", str(agent.state_dir), "--json")
        assert shown.returncode == 0, shown.stderr
        [ext] = json.loads(shown.stdout)["extensions"]
        assert (ext["name"], ext["version"], ext["state"]) == (NAME, "1.0.0", "Ready")
        text = run_cli("agent", "status", "--state-dir", str(agent.state_dir)).stdout
        assert f"{NAME} 1.0.0: Ready" in text, text

        # An update to a version whose enable fails rolls back to 1.0.0 (EX-8)...
        publish(hub, build("2.0.0", trace, {"enable": 'echo broken >&2; exit 4'}))
        set_goal(hub, "m1", version="2.0.0")
        row = wait_state(hub, agent, "m1", {"state": "Ready", "version": "1.0.0",
                                            "failed_versions": ["2.0.0"]})
        assert "rolled back to 1.0.0" in row["message"], row
        assert "exited with code 4" in row["message"], row
        assert ran(trace)[2:] == [
            ("disable", "1.0.0"), ("update", "2.0.0"), ("uninstall", "1.0.0"),
            ("install", "2.0.0"), ("enable", "2.0.0"), ("disable", "2.0.0"),
            ("uninstall", "2.0.0"), ("install", "1.0.0"), ("enable", "1.0.0")]
        # ...and is not tried again until the operator asks, not even by an agent started
        # again (which looks at its goals once at start, and runs no step that succeeded).
        count = len(ran(trace))
        agent.stop()
        restarted = time.time()
        agent.start()
        wait_until(lambda: _settled_since(agent, restarted), 20,
                   what=f"the goals fetched again\n{agent.log()[-2000:]}")
        assert len(ran(trace)) == count, ran(trace)[count:]
        assert state(hub, "m1")["state"] == "Ready"  # type: ignore[index]
        # What the operator sees of it...
        shown = hub.cli("extension", "show", NAME, "--machine", "m1")
        assert shown.returncode == 0, shown.stderr
        assert re.search(r"^state: +Ready$", shown.stdout, re.M), shown.stdout
        assert re.search(r"^failed: +2\.0\.0$", shown.stdout, re.M), shown.stdout
        assert "rolled back to 1.0.0" in shown.stdout
        # ...and asks for the retry.
        retried = hub.cli("extension", "retry", NAME, "--machine", "m1")
        assert retried.returncode == 0, retried.stderr
        wait_until(lambda: ran(trace).count(("enable", "2.0.0")) == 2, 30,
                   what=f"the retry of 2.0.0\n{agent.log()[-2000:]}")
        wait_state(hub, agent, "m1", {"state": "Ready", "version": "1.0.0"})

        # Removed: disabled, uninstalled, its files gone.
        response = hub.api("DELETE", f"/v1/extensions/{NAME}/targets/machine/m1")
        assert response.status_code == 200, response.text
        wait_until(lambda: ran(trace)[-1] == ("uninstall", "1.0.0"), 30,
                   what=f"the uninstall\n{agent.log()[-2000:]}")
        wait_until(lambda: not (shared_root(agent.state_dir) / NAME).exists(), 10,
                   what="the extension's files removed")
        wait_until(lambda: (state(hub, "m1") or {}).get("state") in (None, "NotInstalled"),
                   15, what=f"NotInstalled reported: {state(hub, 'm1')}")
    finally:
        for agent_ in agents:
            agent_.stop()
        shutil.rmtree(shared_root(agent.state_dir), ignore_errors=True)


def _settled_since(agent: Agent, since: float) -> bool:
    """The agent fetched its goals after ``since`` and works on none now."""
    status = agent.status()
    return bool(status and (status.get("extensions_fetched_at") or 0) > since
                and not any(e["running"] for e in status["extensions"]))


# SQLite only: the agent's handler timeout, not the database.
@SQLITE_ONLY
def test_a_hung_enable_is_failed_at_its_timeout_and_removal_still_works(
        hub: Hub, agents: list[Agent], shared: Path, tmp_path: Path) -> None:
    agent = healthy_agent(hub, tmp_path, agents, "m2")
    trace = shared / "trace"
    pids = shared / "pids"
    try:
        publish(hub, build("1.0.0", trace, {"enable": f"sleep 300 & echo $! >> {pids}; "
                                                      "sleep 300"}, timeout=2))
        set_goal(hub, "m2", version="1.0.0")
        row = wait_state(hub, agent, "m2", {"state": "Failed", "step": "enable"})
        assert "E9030" in row["message"] and "hung" in row["message"], row
        for pid in pids.read_text().split():
            assert not Path(f"/proc/{pid}").exists() or \
                Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
        response = hub.api("DELETE", f"/v1/extensions/{NAME}/targets/machine/m2")
        assert response.status_code == 200, response.text
        wait_until(lambda: ran(trace)[-1:] == [("uninstall", "1.0.0")], 30,
                   what=f"the uninstall\n{agent.log()[-2000:]}")
        wait_until(lambda: (state(hub, "m2") or {}).get("state") in (None, "NotInstalled"),
                   15, what=f"NotInstalled reported: {state(hub, 'm2')}")
    finally:
        for agent_ in agents:
            agent_.stop()
        shutil.rmtree(shared_root(agent.state_dir), ignore_errors=True)
