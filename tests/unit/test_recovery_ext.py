"""Fast tier: the shipped recovery extension's package (deterministic, valid, built by the
backup extension's builder, published at the hub's start with a schema that wants paths for a
source only) and its programs' checks of settings and params (E9103 naming the field), which
come before restic or the hub is reached."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from outpost.extensions import archive, backup, recovery
from outpost.extensions.recovery import main as programs
from outpost.protocol import extpackage
from tests.inproc import InprocHub

GZIP = {"Content-Type": "application/gzip"}
FULL = "ab" * 32


def test_the_package_builds_deterministically_and_is_valid() -> None:
    first, second = recovery.build(), recovery.build()
    assert hashlib.sha256(first).digest() == hashlib.sha256(second).digest()
    assert first == archive.build(recovery.PACKAGE_DIR)  # the one builder, shared with backup
    assert backup.build() == archive.build(backup.PACKAGE_DIR)
    manifest = extpackage.read(first).manifest
    assert (manifest.name, manifest.version) == ("recovery", "1.0.0") == (
        recovery.NAME, recovery.version())
    assert manifest.credentials == ["backup"]
    assert set(manifest.handlers) == {"install", "enable", "disable", "update", "uninstall"}
    ops = manifest.operations
    assert set(ops) == {"point", "recover", "prune"}
    assert (ops["point"].pressure, ops["point"].start_timeout_seconds,
            ops["point"].expected_seconds, ops["point"].timeout_seconds) == (
        True, 600, 3600, 86400)
    assert (ops["recover"].pressure, ops["recover"].start_timeout_seconds,
            ops["recover"].expected_seconds, ops["recover"].timeout_seconds) == (
        False, 600, 7200, 86400)
    assert ops["prune"].pressure is True
    # restic restoring a GiB needs more than the agent's default 256 MiB for an extension
    assert manifest.limits is not None and manifest.limits.memory_mb == 1024
    assert extpackage.read(first).executables == {"bin/recovery"}
    with tarfile.open(fileobj=io.BytesIO(first), mode="r:gz") as archived:
        assert [m.name for m in archived.getmembers()] == [
            "bin", "bin/recovery", "outpost-extension.json"]
        handle = archived.extractfile("bin/recovery")
        assert handle is not None
        wrapper = handle.read().decode()
    assert 'exec "$OUTPOST_AGENT_PYTHON" -m outpost.extensions.recovery.main' in wrapper



@pytest.mark.anyio
async def test_the_hub_publishes_it_and_its_schema_wants_paths_for_a_source(
        fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    data = recovery.build()
    [version] = (await hub.ok("GET", "/v1/extensions/recovery"))["versions"]
    assert (version["version"], version["sha256"]) == ("1.0.0", hashlib.sha256(data).hexdigest())
    again = await hub.api("POST", "/v1/extensions", content=data, headers=GZIP)
    assert again.status_code == 200, again.text
    machine = await hub.machine("m1")
    path = f"/v1/extensions/recovery/targets/machine/{machine.name}"
    protected = {"repository_password": "x" * 32}
    for settings, named in (({"paths": ["/srv"]}, "role"),
                            ({"role": "primary", "paths": ["/srv"]}, "role"),
                            ({"role": "source"}, "paths"),
                            ({"role": "source", "paths": ["srv"]}, "paths"),
                            ({"role": "source", "paths": ["/srv"], "pre_script_timeout": 0},
                             "pre_script_timeout")):
        refused = await hub.api("PUT", path, json={"settings": settings,
                                                   "protected_settings": protected})
        assert refused.status_code == 422 and named in refused.json()["message"], (
            settings, refused.text)
    short = await hub.api("PUT", path, json={
        "settings": {"role": "target"}, "protected_settings": {"repository_password": "short"}})
    assert short.status_code == 422 and "repository_password" in short.text, short.text
    for settings in ({"role": "target"},
                     {"role": "source", "paths": ["/srv"], "exclude": ["*.tmp"],
                      "pre_script": "sync", "pre_script_timeout": 30, "transport": "bridge"}):
        done = await hub.api("PUT", path, json={"settings": settings,
                                                "protected_settings": protected,
                                                "run_as": "root"})
        assert done.status_code == 200, done.text


class _Stdin:
    def __init__(self, text: str) -> None:
        self.text = text

    def read(self) -> str:
        return self.text


def _run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, command: str,
         settings: dict[str, Any], params: dict[str, Any] | None = None) -> dict[str, Any]:
    monkeypatch.setenv("OUTPOST_EXT_STATUS_DIR", str(tmp_path))
    monkeypatch.setenv("OUTPOST_EXT_SEQ", "7")
    monkeypatch.setattr(sys, "stdin", _Stdin(json.dumps({
        "settings": settings, "protected": {"repository_password": "p" * 16},
        "params": params or {}})))
    code = programs.main([command])
    status: dict[str, Any] = json.loads((tmp_path / "7.status").read_text())
    assert code == (0 if status["status"] in ("success", "warning") else 1), status
    return status


SOURCE = {"role": "source", "paths": ["/srv"]}
BAD: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("enable", {"paths": ["/srv"]}, {}, "settings.role"),
    ("enable", {"role": "primary"}, {}, "settings.role"),
    ("enable", {"role": "source"}, {}, "settings.paths"),
    ("enable", {"role": "source", "paths": ["srv"]}, {}, "settings.paths"),
    ("enable", {**SOURCE, "exclude": "*.tmp"}, {}, "settings.exclude"),
    ("enable", {**SOURCE, "pre_script": ["sync"]}, {}, "settings.pre_script"),
    ("enable", {**SOURCE, "pre_script_timeout": 0}, {}, "settings.pre_script_timeout"),
    ("enable", {**SOURCE, "pre_script_timeout": True}, {}, "settings.pre_script_timeout"),
    ("point", SOURCE, {"consistency": "full"}, "params.consistency"),
    ("point", SOURCE, {"paths": ["relative"]}, "params.paths"),
    ("point", {"role": "target"}, {}, "params.paths"),
    ("point", SOURCE, {"tag": "a,b"}, "params.tag"),
    ("point", SOURCE, {"tag": "-x"}, "params.tag"),
    ("point", SOURCE, {"tag": "outpost-recovery"}, "params.tag"),
    ("recover", {"role": "target"}, {}, "params.point"),
    ("recover", {"role": "target"}, {"point": "abcd1234"}, "params.point"),
    ("recover", {"role": "target"}, {"point": "--help"}, "params.point"),
    ("recover", {"role": "target"}, {"point": FULL, "target": "here"}, "params.target"),
    ("recover", {"role": "target"}, {"point": FULL, "source_machine_id": "-x"},
     "params.source_machine_id"),
    ("prune", SOURCE, {}, "keep_within"),
    ("prune", SOURCE, {"keep_last": 0}, "params.keep_last"),
    ("prune", SOURCE, {"keep_last": True}, "params.keep_last"),
    ("prune", SOURCE, {"keep_last": "x"}, "params.keep_last"),
    ("prune", SOURCE, {"keep_within": "3 days"}, "params.keep_within"),
    ("prune", SOURCE, {"keep_within": "--keep-last=1"}, "params.keep_within"),
]


@pytest.mark.parametrize(("command", "settings", "params", "named"), BAD,
                         ids=[f"{b[0]}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_a_bad_setting_or_param_is_e9103_naming_the_field(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, command: str,
        settings: dict[str, Any], params: dict[str, Any], named: str) -> None:
    status = _run(monkeypatch, tmp_path, command, settings, params)
    assert status["status"] == "error" and status["code"] == programs.SETTINGS_INVALID, status
    assert status["message"].startswith("E9103: ") and named in status["message"], status


def test_good_params_are_read_as_restic_arguments() -> None:
    assert programs.point_params(SOURCE, {}) == ("crash", ["/srv"], ["outpost-recovery"])
    assert programs.point_params({"role": "target"}, {
        "consistency": "application", "paths": "/data", "tag": "failback"}) == (
        "application", ["/data"], ["outpost-recovery", "failback"])
    assert programs.recover_params({"point": FULL}) == (FULL, "/", None)
    assert programs.recover_params({"point": FULL, "target": "/mnt/x",
                                    "source_machine_id": "m-1"}) == (FULL, "/mnt/x", "m-1")
    assert programs.prune_args({"keep_last": "3"}) == [
        "forget", "--prune", "--tag", "outpost-recovery", "--keep-last", "3"]
    assert programs.prune_args({"keep_within": "1y2m3d4h", "keep_last": 2}) == [
        "forget", "--prune", "--tag", "outpost-recovery", "--keep-within", "1y2m3d4h",
        "--keep-last", "2"]
    assert programs.check_settings({"role": "target"}) == "target"


def test_an_unknown_command_is_refused(monkeypatch: pytest.MonkeyPatch,
                                       tmp_path: Path) -> None:
    monkeypatch.setenv("OUTPOST_EXT_STATUS_DIR", str(tmp_path))
    monkeypatch.setenv("OUTPOST_EXT_SEQ", "7")
    monkeypatch.setattr(sys, "stdin", _Stdin("{}"))
    assert programs.main(["snapshot"]) == 2  # the backup extension's, not this one's
    status = json.loads((tmp_path / "7.status").read_text())
    assert "E9103" in status["message"] and "point, recover, prune" in status["message"]
