"""``outpost extension ...`` end to end: the CLI in its own process against a real hub on
SQLite and PostgreSQL, and a registered machine that speaks for itself (signed requests, no
agent daemon: what the agent does with its goals is tested with the agent)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from outpost import __version__
from tests.extbuild import manifest, package
from tests.support import Hub, machine_calls, query

SCHEMA = {"type": "object", "properties": {"paths": {"type": "array",
                                                     "items": {"type": "string"}}},
          "required": ["paths"]}
SECRET = "s3cret-repository-password"


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _json(done: Any) -> Any:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_publish_set_show_retry_and_remove(hub: Hub, tmp_path: Path) -> None:
    # The hub publishes the shipped backup and recovery extensions at its start; nothing
    # else yet.
    shipped = hub.cli("extension", "list")
    assert shipped.returncode == 0, shipped.stderr
    assert "backup" in shipped.stdout, shipped.stdout
    assert [e["name"] for e in _json(hub.cli("extension", "list", "--json"))] == [
        "backup", "recovery"]

    bad = hub.cli("extension", "publish", _write(tmp_path / "bad.tar.gz", package(
        manifest("snapper", "1.0.0", settings_schema=SCHEMA), links={"bin/x": "/etc"})))
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "E9000" in bad.stderr and "the member 'bin/x' is a link" in bad.stderr

    first = _write(tmp_path / "snapper-1.0.0.tar.gz",
                   package(manifest("snapper", "1.0.0", settings_schema=SCHEMA)))
    done = hub.cli("extension", "publish", first)
    assert done.returncode == 0, done.stderr
    assert "Published extension snapper 1.0.0" in done.stdout
    again = hub.cli("extension", "publish", first)
    assert again.returncode == 0 and "nothing changed" in again.stdout, again.stderr
    clash = hub.cli("extension", "publish", _write(tmp_path / "clash.tar.gz", package(
        manifest("snapper", "1.0.0", settings_schema=SCHEMA, description="other"))))
    assert clash.returncode == 1 and "E9003" in clash.stderr, clash.stderr
    newer = hub.cli("extension", "publish", _write(tmp_path / "snapper-1.1.0.tar.gz", package(
        manifest("snapper", "1.1.0", settings_schema=SCHEMA))), "--json")
    assert _json(newer)["version"] == "1.1.0"
    assert [(e["name"], e["versions"]) for e in _json(hub.cli("extension", "list",
                                                              "--json"))
            if e["name"] not in ("backup", "recovery")] == [("snapper", ["1.0.0", "1.1.0"])]
    versions = hub.cli("extension", "versions", "snapper")
    assert versions.returncode == 0 and "1.1.0" in versions.stdout, versions.stderr

    call = machine_calls(hub, tmp_path / "m1", "m1")
    settings = tmp_path / "settings.yaml"
    settings.write_text("paths:\n  - /srv/data\n")
    protected = tmp_path / "protected.json"
    protected.write_text(json.dumps({"password": SECRET}))
    both = hub.cli("extension", "set", "snapper", "--group", "web", "--machine", "m1")
    assert both.returncode == 2, both.stderr
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("paths: /srv/data\n")
    refused = hub.cli("extension", "set", "snapper", "--group", "web", "--settings", str(wrong))
    assert refused.returncode == 2 and "E9006" in refused.stderr, refused.stderr
    assert "settings.paths" in refused.stderr
    broken = tmp_path / "broken.json"
    broken.write_text('{"password": "' + SECRET + '"\n  oops: [')
    unread = hub.cli("extension", "set", "snapper", "--group", "web",
                     "--protected-settings", str(broken))
    assert unread.returncode == 2 and "E9010" in unread.stderr, unread.stderr
    assert SECRET not in unread.stderr + unread.stdout

    saved = hub.cli("extension", "set", "snapper", "--group", "web", "--settings",
                    str(settings), "--protected-settings", str(protected), "--version", "1.0.0",
                    "--run-as", "backup")
    assert saved.returncode == 0, saved.stderr
    assert "set for group 'web': version 1.0.0, enabled" in saved.stdout
    assert "protected settings set" in saved.stdout and SECRET not in saved.stdout
    stored = query(hub.database_url, "SELECT settings, protected FROM extension_goals")
    assert len(stored) == 1 and SECRET not in repr(stored)

    beat = {"agent_version": __version__, "heartbeat_interval": 30, "running_jobs": 0,
            "jobs": []}
    goals = call("GET", "/v1/agent/extensions")
    assert [(g["name"], g["version"], g["settings"], g["run_as"]) for g in goals["goals"]] == [
        ("snapper", "1.0.0", {"paths": ["/srv/data"]}, "backup")]
    assert goals["goals"][0]["protected"] and SECRET not in json.dumps(goals)
    assert call("POST", "/v1/agent/heartbeat", beat)["extensions_etag"] == goals["etag"]
    call("POST", "/v1/agent/extensions/status", {"extensions": [{
        "name": "snapper", "target_version": "1.0.0", "state": "Failed", "step": "enable",
        "message": "enable did not finish within 300 s; killed", "changed_at": time.time(),
        "seq": goals["goals"][0]["seq"], "failed_versions": ["1.0.0"]}]})

    shown = _json(hub.cli("extension", "show", "snapper", "--json"))
    assert [(m["machine"], m["state"], m["step"]) for m in shown["machines"]] == [
        ("m1", "Failed", "enable")]
    assert shown["goals"][0]["protected"] is True and SECRET not in json.dumps(shown)
    text = hub.cli("extension", "show", "snapper")
    assert text.returncode == 0, text.stderr
    assert "Failed at" in text.stdout and "group web" in text.stdout  # folded at 80 columns
    one = hub.cli("extension", "show", "snapper", "--machine", "m1")
    assert one.returncode == 0, one.stderr
    assert "enable did not finish within 300 s; killed" in one.stdout
    assert "extension retry snapper --machine m1" in one.stdout

    retried = hub.cli("extension", "retry", "snapper", "--machine", "m1")
    assert retried.returncode == 0 and "(retry 1)" in retried.stdout, retried.stderr
    after = call("POST", "/v1/agent/heartbeat", beat)["extensions_etag"]
    assert after not in ("", goals["etag"])
    assert call("GET", "/v1/agent/extensions")["goals"][0]["retry"] == 1

    removed = hub.cli("extension", "remove", "snapper", "--group", "web")
    assert removed.returncode == 0, removed.stderr
    assert "removed from group 'web'" in removed.stdout
    assert call("POST", "/v1/agent/heartbeat", beat)["extensions_etag"] == ""
    gone = _json(hub.cli("extension", "show", "snapper", "--machine", "m1", "--json"))
    assert (gone["goal"], gone["state"]) == (None, "Failed")
    twice = hub.cli("extension", "remove", "snapper", "--group", "web")
    assert twice.returncode == 1 and "E9008" in twice.stderr, twice.stderr
