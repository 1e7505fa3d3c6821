"""EX-5 seen from the machine: ``outpost check`` on a machine whose extension's enable hung
names the extension, the failed step, the code and the command to retry, and exits 1.

A real hub (SQLite: the check reads only the agent's own files) and a real agent process;
the enable handler sleeps past its timeout_seconds, so the agent kills it and records the
extension Failed in <state>/extensions/state.json, which ``outpost check`` reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests import extbuild
from tests.support import Agent, Hub, healthy_agent, run_cli, wait_until

NAME = "stuck"
OK = (b"#!/bin/sh\necho '{\"status\": \"success\"}' > "
      b"\"$OUTPOST_EXT_STATUS_DIR/$OUTPOST_EXT_SEQ.status\"\n")


def _state(hub: Hub, machine: str) -> dict[str, Any]:
    rows = hub.api("GET", f"/v1/machines/{machine}/extensions").json()
    return next((r for r in rows if r["name"] == NAME), {})


def test_check_names_a_hung_enable_its_code_and_the_retry_command(
        sqlite_hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    hub = sqlite_hub
    agent = healthy_agent(hub, tmp_path, agents, "m1")
    handlers = {h: {"run": f"bin/{h}"} for h in ("install", "disable", "uninstall")}
    handlers["enable"] = {"run": "bin/enable", "timeout_seconds": 1}
    files = {f"bin/{h}": (OK, 0o755) for h in ("install", "disable", "uninstall")}
    files["bin/enable"] = (b"#!/bin/sh\nsleep 60\n", 0o755)
    package = extbuild.package(extbuild.manifest(NAME, "1.0.0", handlers=handlers),
                               files=files)
    published = hub.api("POST", "/v1/extensions", content=package,
                        headers={"Content-Type": "application/gzip"})
    assert published.status_code == 201, published.text
    goal = hub.api("PUT", f"/v1/extensions/{NAME}/targets/machine/m1", json={})
    assert goal.status_code == 200, goal.text
    wait_until(lambda: _state(hub, "m1").get("state") == "Failed", 30,
               what=f"{NAME} Failed on m1\n{agent.log()[-2000:]}")

    done = run_cli("check", "--state-dir", str(agent.state_dir), "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    body = json.loads(done.stdout)
    found = {c["id"]: c for c in body["checks"]}["extensions"]
    assert (found["result"], found["code"]) == ("error", "E9030"), found
    assert found["details"].startswith(f"{NAME}: Failed at step enable at 1.0.0: E9030: "), \
        found
    assert f"outpost extension retry {NAME} --machine m1" in found["fix"], found
    [row] = found["data"]["extensions"]
    assert (row["state"], row["step"], row["failed_versions"]) == ("Failed", "enable",
                                                                   ["1.0.0"]), row

    # The text output says the same, with the code to explain.
    text = run_cli("check", "--state-dir", str(agent.state_dir))
    assert text.returncode == 1
    assert "[FAIL] extensions" in text.stdout, text.stdout
    assert "fix:   The enable handler hung" in text.stdout, text.stdout
    assert "code:  E9030 (ext_handler_hung)" in text.stdout, text.stdout
