"""``outpost module ...`` and ``outpost deployment ...`` end to end: the CLI in its own
process against a real hub on SQLite and PostgreSQL, and registered machines that speak for
themselves (signed requests, no agent daemon: what the agent does with its deployment is
tested with the agent)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from outpost.protocol.errors import HubRefused
from tests.deploybuild import RUN, manifest_yaml, module_manifest, module_package
from tests.support import Hub, machine_calls


def _json(done: Any) -> Any:
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def _fetch_bytes(hub: Hub, state_root: Path, path: str) -> tuple[bytes, dict[str, str]]:
    """A signed GET of a package, as the machine registered in ``state_root`` makes it."""
    from outpost.agent.registration import client_for
    from outpost.agent.state import StateDir
    from outpost.agent.transport import Clock

    state = StateDir(state_root)
    reg = state.registration()
    assert reg is not None

    async def once() -> tuple[bytes, dict[str, str]]:
        client = client_for(state, reg, Clock())
        try:
            return await client.fetch_bytes(path)
        finally:
            await client.aclose()
    return asyncio.run(once())


def test_publish_create_rollout_and_delete_through_the_cli(hub: Hub, tmp_path: Path) -> None:
    # A directory is packed into the archive; the same files give the same digest.
    source = tmp_path / "sensor"
    (source / "bin").mkdir(parents=True)
    (source / "outpost-module.json").write_text(json.dumps(module_manifest("sensor",
                                                                           "1.0.0")))
    (source / "bin" / "run").write_bytes(RUN)
    (source / "bin" / "run").chmod(0o755)
    published = _json(hub.cli("module", "publish", str(source), "--json"))
    assert (published["name"], published["version"]) == ("sensor", "1.0.0")
    again = hub.cli("module", "publish", str(source))
    assert again.returncode == 0 and "sensor 1.0.0" in again.stdout, again.stderr
    archive = tmp_path / "sensor-1.1.0.tar.gz"
    archive.write_bytes(module_package("sensor", "1.1.0"))
    assert hub.cli("module", "publish", str(archive)).returncode == 0
    clash = tmp_path / "clash.tar.gz"
    clash.write_bytes(module_package("sensor", "1.1.0", content=b"#!/bin/sh\nexit 1\n"))
    refused = hub.cli("module", "publish", str(clash))
    assert refused.returncode == 1 and "E9151" in refused.stderr, refused.stderr
    listed = _json(hub.cli("module", "list", "--json"))
    assert [(r["name"], r["version"]) for r in listed] == [("sensor", "1.1.0"),
                                                           ("sensor", "1.0.0")]
    assert "sensor" in hub.cli("module", "list").stdout

    m1_state, m2_state = tmp_path / "m1", tmp_path / "m2"
    m1 = machine_calls(hub, m1_state, "m1", group="web")
    m2 = machine_calls(hub, m2_state, "m2", group="web")
    never = _json(hub.cli("machine", "show", "m1", "--json"))["deployment"]
    assert never["reason"]["code"] == "E9158"

    # A manifest with errors: every problem printed with its line and column.
    bad = tmp_path / "bad.yaml"
    bad.write_text(manifest_yaml().replace("order: 1", "order: -1")
                   .replace('RATE: "5"', "1BAD: x"))
    invalid = hub.cli("deployment", "create", "edge", str(bad), "--group", "web")
    assert invalid.returncode != 0 and "E9150" in invalid.stderr, invalid.stderr
    assert "modules.filter.order (line 11, column 12)" in invalid.stderr, invalid.stderr
    assert "modules.sensor.env (line 8, column 7)" in invalid.stderr, invalid.stderr
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(manifest_yaml(package="nosuch"))
    missing = hub.cli("deployment", "create", "edge", str(unknown), "--group", "web")
    assert missing.returncode != 0 and "E9153" in missing.stderr, missing.stderr
    assert "nosuch 1.0.0" in missing.stderr
    both = hub.cli("deployment", "create", "edge", str(bad), "--group", "web",
                   "--machine", "m1")
    assert both.returncode == 2, both.stderr

    good = tmp_path / "edge.yaml"
    good.write_text(manifest_yaml(version=None))
    made = _json(hub.cli("deployment", "create", "edge", str(good), "--group", "web",
                         "--json"))
    assert made["manifest"]["modules"]["sensor"]["package"]["version"] == "1.1.0"
    one = tmp_path / "one.yaml"
    one.write_text(manifest_yaml(version="1.0.0"))
    text = hub.cli("deployment", "create", "pinned", str(one), "--machine", "m2",
                   "--priority", "5")
    assert text.returncode == 0 and "Created deployment pinned version 1" in text.stdout
    listed = {d["name"]: d for d in _json(hub.cli("deployment", "list", "--json"))}
    assert (listed["edge"]["machines"], listed["edge"]["applied"]) == (2, 1)
    shown = _json(hub.cli("deployment", "show", "edge", "--json"))
    assert {(m["machine"], m["applied"], m["winner"]) for m in shown["machines"]} == {
        ("m1", True, "edge"), ("m2", False, "pinned")}
    assert "pinned (priority 5)" in hub.cli("deployment", "show", "edge").stdout
    assert "modules" in _json(hub.cli("deployment", "schema"))["properties"]

    # The machines fetch what they run, and their packages; nothing else.
    beat = m1("POST", "/v1/agent/heartbeat", {"agent_version": "0", "heartbeat_interval": 1,
                                               "running_jobs": 0, "jobs": []})
    doc = m1("GET", "/v1/agent/deployment")
    assert doc["deployment"] == "edge" and doc["etag"] == beat["deployment_etag"] != ""
    data, headers = _fetch_bytes(hub, m1_state, "/v1/agent/modules/sensor/1.1.0/package")
    assert hashlib.sha256(data).hexdigest() == headers["x-outpost-sha256"]
    with pytest.raises(HubRefused) as caught:
        _fetch_bytes(hub, m1_state, "/v1/agent/modules/sensor/1.0.0/package")
    assert caught.value.status == 403 and caught.value.code == "E9156"
    assert "published in this account" in caught.value.message
    assert m2("GET", "/v1/agent/deployment")["deployment"] == "pinned"
    assert _fetch_bytes(hub, m2_state, "/v1/agent/modules/sensor/1.0.0/package")[0]
    waiting = _json(hub.cli("machine", "show", "m1", "--json"))["deployment"]
    assert waiting["reason"]["code"] == "E9160"

    rollout = _json(hub.cli("deployment", "rollout", "edge", "--json"))
    assert [(m["machine"], m["status"]) for m in rollout["machines"]] == [
        ("m1", "pending"), ("m2", "superseded")]
    late = hub.cli("deployment", "rollout", "edge", "--wait", "0.5")
    assert late.returncode != 0 and "E9157" in late.stderr, late.stderr

    # The machine reports while a waiting rollout watches: it returns once it is applied.
    waited: dict[str, Any] = {}
    watcher = threading.Thread(target=lambda: waited.update(done=hub.cli(
        "deployment", "rollout", "edge", "--wait", "30", "--json")))
    watcher.start()
    time.sleep(1.0)
    now = time.time()
    m1("POST", "/v1/agent/modules/report", {
        "deployment": "edge", "version": 1, "etag": doc["etag"], "reported_at": now,
        "modules": [{"name": "sensor", "state": "running", "restart_count": 2,
                     "last_start_at": now - 3, "version": "1.1.0"},
                    {"name": "filter", "state": "running", "last_start_at": now - 2}]})
    watcher.join(60)
    final = _json(waited["done"])
    assert final["complete"] is True and final["machines"][0]["status"] == "applied"
    assert [(x["name"], x["state"], x["restart_count"]) for x in
            final["machines"][0]["modules"]] == [("sensor", "running", 2),
                                                 ("filter", "running", 0)]
    table = hub.cli("deployment", "rollout", "edge")
    assert table.returncode == 0 and "sensor=running" in table.stdout, table.stderr
    shown = _json(hub.cli("machine", "show", "m1", "--json"))["deployment"]
    assert (shown["name"], shown["reason"], shown["modules"]) == ("edge", None,
                                                                 {"running": 2})
    shown_text = hub.cli("machine", "show", "m1").stdout
    assert "edge version 1; reported edge version 1" in shown_text, shown_text
    assert "2 running" in shown_text

    # Another account sees none of it.
    other = hub.api("POST", "/v1/accounts", json={"name": "other"})
    assert other.status_code == 201, other.text
    theirs = other.json()["token"]
    for args, code in ((("deployment", "show", "edge"), "E9154"),
                       (("deployment", "rollout", "edge"), "E9154"),
                       (("deployment", "delete", "edge"), "E9154"),
                       (("machine", "show", "m1"), "E3002")):
        hidden = hub.cli(*args, token=theirs)
        assert hidden.returncode != 0 and code in hidden.stderr, (args, hidden.stderr)
    assert _json(hub.cli("deployment", "list", "--json", token=theirs)) == []
    assert _json(hub.cli("module", "list", "--json", token=theirs)) == []
    assert hub.api("GET", "/v1/modules/sensor", token=theirs).status_code == 404

    gone = _json(hub.cli("deployment", "delete", "edge", "--json"))
    assert gone == {"name": "edge", "deleted": True}
    assert m1("GET", "/v1/agent/deployment")["deployment"] is None
    assert _json(hub.cli("machine", "show", "m1", "--json"))["deployment"]["reason"][
        "code"] == "E9158"
    assert "No deployment targets this machine. (E9158)" in hub.cli(
        "machine", "show", "m1").stdout
    absent = hub.cli("deployment", "show", "edge")
    assert absent.returncode != 0 and "E9154" in absent.stderr
