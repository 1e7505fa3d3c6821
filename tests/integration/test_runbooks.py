"""Runbooks: publish versions, list, show and get them back, on both databases."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support import SQLITE_ONLY, Hub


def test_publish_versions_list_show_and_get(hub: Hub, tmp_path: Path) -> None:
    script = tmp_path / "deploy.sh"
    script.write_text("#!/bin/bash\necho deploying $target\n")
    first = hub.cli("runbook", "publish", "deploy", str(script), "--description", "Deploy",
                    "--param", "target", "--param", "count:int=2", "--log-verbose", "--json")
    assert first.returncode == 0, first.stderr
    stored = json.loads(first.stdout)
    assert (stored["version"], stored["type"], stored["log_verbose"]) == (1, "bash", True)
    assert stored["params"][0] == {"name": "target", "type": "string", "required": True,
                                   "default": None}

    script.write_text("#!/bin/bash\necho v2\n")
    second = hub.cli("runbook", "publish", "deploy", str(script))
    assert second.returncode == 0, second.stderr
    assert "Published deploy version 2 (bash" in second.stdout

    py = tmp_path / "report.py"
    py.write_text("print('hi')\n")
    assert hub.cli("runbook", "publish", "report", str(py)).returncode == 0

    listing = json.loads(hub.cli("runbook", "list", "--json").stdout)
    assert [(r["name"], r["version"], r["versions"], r["type"]) for r in listing] == [
        ("deploy", 2, 2, "bash"), ("report", 1, 1, "python")]
    text = hub.cli("runbook", "list")
    assert "deploy" in text.stdout and "2 of 2" in text.stdout

    old = json.loads(hub.cli("runbook", "show", "deploy", "--version", "1", "--json").stdout)
    assert old["content"] == "#!/bin/bash\necho deploying $target\n"
    assert old["description"] == "Deploy"
    shown = hub.cli("runbook", "show", "deploy")
    assert "deploy version 2 (bash)" in shown.stdout and "echo v2" in shown.stdout

    target = tmp_path / "out.sh"
    got = hub.cli("runbook", "get", "deploy", "--version", "1", "-o", str(target))
    assert got.returncode == 0, got.stderr
    assert target.read_text() == old["content"]


# SQLite only: validation, before anything is stored.
@SQLITE_ONLY
def test_bad_runbooks_are_refused_and_nothing_is_stored(hub: Hub, tmp_path: Path) -> None:
    plain = tmp_path / "script"
    plain.write_text("echo no shebang\n")
    unknown = hub.cli("runbook", "publish", "x", str(plain))
    assert unknown.returncode == 2 and "E4001" in unknown.stderr
    assert "--type" in unknown.stderr

    bad_param = hub.cli("runbook", "publish", "x", str(plain), "--type", "sh",
                        "--param", "n:int=ten")
    assert bad_param.returncode == 2 and "E4002" in bad_param.stderr
    assert "'ten' is not an integer" in bad_param.stderr

    bad_type = hub.cli("runbook", "publish", "x", str(plain), "--type", "cobol")
    assert bad_type.returncode == 2 and "Unknown runbook type 'cobol'" in bad_type.stderr

    missing = hub.cli("runbook", "show", "x")
    assert missing.returncode == 1 and "E3002" in missing.stderr
    assert json.loads(hub.cli("runbook", "list", "--json").stdout) == []

    big = hub.api("POST", "/v1/runbooks", json={"name": "big", "type": "sh",
                                                "content": "#" * (1024 * 1024 + 1)})
    assert big.status_code == 413 and big.json()["code"] == "E4005"


def test_runbooks_are_private_to_their_account(hub: Hub, tmp_path: Path) -> None:
    script = tmp_path / "a.sh"
    script.write_text("#!/bin/sh\ntrue\n")
    assert hub.cli("runbook", "publish", "secret", str(script)).returncode == 0
    other = json.loads(hub.cli("account", "create", "other", "--json").stdout)
    assert json.loads(hub.cli("runbook", "list", "--json", token=other["token"]).stdout) == []
    hidden = hub.cli("runbook", "show", "secret", token=other["token"])
    assert hidden.returncode == 1 and "E3002" in hidden.stderr
