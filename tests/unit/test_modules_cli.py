"""The modules' diagnosis on the machine through the real CLI (a subprocess each):
``outpost agent logs MODULE``, ``outpost agent restart MODULE`` without an agent, the
``deployment`` check's reasons, and the support bundle's module members (env values gone)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from outpost.agent import bundle
from outpost.agent.checks import AgentContext, deployment
from outpost.agent.state import StateDir, write_checked

OUTPOST = str(Path(sys.executable).with_name("outpost"))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([OUTPOST, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200"})


def state_with_a_module(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    logs = state / "logs" / "modules"
    logs.mkdir(parents=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (logs / "m.log").write_text(f"--- {stamp} outpost: starting m\none\ntwo\nthree\n")
    (state / "modules").mkdir()
    write_checked(state / "modules" / "supervisor.json", {
        "doc": {"etag": "e1", "deployment": "d", "version": 3, "manifest": {"modules": {
            "m": {"command": ["/bin/sleep", "300"], "env": {"SERVICE_PASSWORD": "hunter2",
                                                            "PLAIN": "visible-value"}}}}},
        "modules": {}})
    return state


def test_agent_logs_module_tail_and_unknown(tmp_path: Path) -> None:
    state = state_with_a_module(tmp_path)
    shown = cli("agent", "logs", "m", "--state-dir", str(state), "--tail", "2")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == ["two", "three"]
    missing = cli("agent", "logs", "nope", "--state-dir", str(state))
    assert missing.returncode != 0
    assert "E9172" in missing.stderr + missing.stdout
    assert "Traceback" not in missing.stderr
    bad = cli("agent", "logs", "../../etc/passwd", "--state-dir", str(state))
    assert bad.returncode != 0 and "E9172" in bad.stderr + bad.stdout


def test_agent_restart_module_without_an_agent_says_so(tmp_path: Path) -> None:
    state = state_with_a_module(tmp_path)
    answer = cli("agent", "restart", "m", "--state-dir", str(state))
    assert answer.returncode != 0
    assert "E9172" in answer.stderr + answer.stdout
    assert "Traceback" not in answer.stderr


def test_the_deployment_check_says_why_there_is_none(tmp_path: Path) -> None:
    state = tmp_path / "empty"
    state.mkdir()
    ctx = AgentContext(StateDir(state), None)
    never = deployment(ctx)
    assert never.result == "ok" and "never fetched" in never.details
    ctx.status = {"modules": None}
    none = deployment(ctx)
    assert none.result == "ok" and "none targets" in none.details
    ctx.status = {"modules": {"deployment": None, "version": 0, "modules": [],
                              "fetch_error": "E2004 the hub cannot be reached"}}
    failed = deployment(ctx)
    assert failed.result == "error" and "E2004" in failed.details
    ctx = AgentContext(StateDir(state_with_a_module(tmp_path / 'x')), None)
    assert deployment(ctx).details == "deployment d version 3"


def test_the_support_bundle_holds_module_states_and_log_tails(tmp_path: Path) -> None:
    state = state_with_a_module(tmp_path)
    out = tmp_path / "b.tar.gz"
    done = bundle.write(StateDir(state), out, None, {}, run_checks=False)
    names = {n.split("/", 1)[1] for n in done["members"]}
    assert {"modules.json", "logs/modules/m.log"} <= names
    with tarfile.open(out) as tar:
        members = {m.name.split("/", 1)[1]: tar.extractfile(m).read()  # type: ignore[union-attr]
                   for m in tar.getmembers()}
    saved = json.loads(members["modules.json"])
    env = saved["doc"]["manifest"]["modules"]["m"]["env"]
    assert env == {"SERVICE_PASSWORD": "[redacted]", "PLAIN": "[redacted]"}
    assert b"hunter2" not in b"".join(members.values())
    assert b"visible-value" not in members["modules.json"]
    assert io.BytesIO(members["logs/modules/m.log"]).read().endswith(b"three\n")
