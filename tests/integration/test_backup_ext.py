"""The shipped backup extension with real parts: a real hub process over HTTPS, the real
restic (Debian's package) through the real bridge, and the package's own programs run by
the agent's handler runner (``handler.run`` with the Spec the agent builds, credentials
from the hub's credentials route included), then by a real agent that reconciles the goal
to Ready. restic itself judges the repository the hub serves (``check --read-data``)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from outpost.agent.extensions import handler
from outpost.agent.extensions.outlog import ExtensionLog, secret_values
from outpost.extensions import backup
from outpost.extensions.backup import main as programs
from outpost.protocol import extpackage
from tests.integration.test_backup_store import (
    Restic,
    mixed_tree,
    require_direct_restic,
    require_restic,
    same_tree,
)
from tests.support import Agent, Hub, healthy_agent, machine_calls, wait_until

ROUTE = "/v1/agent/credentials/backup"
PASSWORD = "a repository password of the machine's"


class Runner:
    """The backup package unpacked as the agent unpacks it, its commands run as the agent
    runs them."""

    def __init__(self, root: Path, credentials: dict[str, Any],
                 settings: dict[str, Any]) -> None:
        self.root = root
        data = backup.build()
        self.package = extpackage.unpack(data, root / "package", extpackage.digest(data))
        self.credentials = credentials
        self.settings = settings
        self.protected = {"repository_password": PASSWORD}
        self.log = root / "logs" / "backup.log"
        self.seq = 0
        self.data_dir: Path | None = None  # OUTPOST_EXT_DATA_DIR: none, as an older agent

    def run(self, which: str, params: dict[str, Any] | None = None,
            **settings: Any) -> tuple[handler.Outcome, dict[str, Any] | None]:
        manifest = self.package.manifest
        command = manifest.handlers.get(which) or manifest.operations[which]  # type: ignore[call-overload]
        self.seq += 1
        spec = handler.Spec(
            name="backup", version=manifest.version, handler=which, seq=self.seq,
            command=command, package_dir=self.root / "package",
            config_dir=self.root / "config", status_dir=self.root / "status",
            log_dir=self.root / "ext-logs", data_dir=self.data_dir,
            output=ExtensionLog(self.log, secrets=secret_values(
                [self.protected, self.credentials])),
            settings={**self.settings, **settings}, protected=self.protected,
            credentials={"backup": self.credentials}, params=params)
        outcome = asyncio.run(handler.run(spec))
        result = outcome.status.result if outcome.status is not None else None
        return outcome, result


def credentials(hub: Hub, tmp_path: Path) -> dict[str, Any]:
    call = machine_calls(hub, tmp_path / "m1", "m1")
    issued: dict[str, Any] = call("POST", ROUTE, {})
    assert issued["hub"] == hub.url.rstrip("/"), issued
    return issued


@pytest.mark.parametrize("how", ["auto", "bridge"])
def test_snapshot_then_restore_through_the_hub(sqlite_hub: Hub, tmp_path: Path,
                                               how: str) -> None:
    # auto: restic 0.17 or later speaks to the hub directly; bridge: forced, as any restic
    # (Debian 12's 0.14) does.
    if how == "auto":
        require_direct_restic()
    require_restic()
    hub = sqlite_hub
    issued = credentials(hub, tmp_path)
    source = mixed_tree(tmp_path / "source")
    runner = Runner(tmp_path / "ext", issued, {"paths": [str(source)],
                                               "exclude": ["*.skip"], "transport": how})
    (source / "scratch.skip").write_text("not backed up\n")

    outcome, _ = runner.run("install")
    assert outcome.result == "success" and "found at" in outcome.message, outcome
    said = "directly" if how == "auto" else "through the bridge"
    assert f"reaches the hub {said} (transport {how})" in outcome.message, outcome
    outcome, _ = runner.run("enable")
    assert outcome.result == "success", outcome
    assert "created on the hub" in outcome.message
    repo_dirs = list((hub.data_dir / "backup").glob(f"*/{issued['machine_id']}"))
    assert len(repo_dirs) == 1 and (repo_dirs[0] / "config").is_file()
    again, _ = runner.run("enable")  # an existing repository is kept
    assert again.result == "success" and "is ready" in again.message, again

    outcome, result = runner.run("snapshot")
    assert outcome.result == "success", outcome
    assert result is not None and len(result["snapshot"]) >= 8
    assert result["files"] == 5 and result["bytes_added"] > 0
    assert result["total_bytes"] >= 5 * 1024 * 1024 + 300_000
    assert result["duration_seconds"] > 0 and result["consistency"] == "crash"
    assert result["snapshot"][:8] in outcome.message and "5 files" in outcome.message
    (source / "scratch.skip").unlink()

    # Into another place: every file's bytes, links and directories as they were.
    elsewhere = tmp_path / "restored"
    outcome, _ = runner.run("restore", {"snapshot": result["snapshot"],
                                        "target": str(elsewhere)})
    assert outcome.result == "success", outcome
    assert same_tree(source, elsewhere / str(source).lstrip("/")) == []
    # Only what 'include' names.
    partial = tmp_path / "partial"
    outcome, _ = runner.run("restore", {"target": str(partial),
                                        "include": [str(source / "small.txt")]})
    assert outcome.result == "success", outcome
    assert [p.name for p in partial.rglob("*") if p.is_file()] == ["small.txt"]
    # Back into the original place (the default target) after the files were lost.
    shutil.rmtree(source)
    outcome, _ = runner.run("restore", {})
    assert outcome.result == "success" and "latest" in outcome.message, outcome
    assert same_tree(elsewhere / str(source).lstrip("/"), source) == []

    # restic judges the repository the hub serves.
    restic = Restic(hub, issued["machine_id"], issued["token"])
    restic.env["RESTIC_PASSWORD"] = PASSWORD
    assert "no errors were found" in restic.ok("check", "--read-data")

    # forget by id prunes it away.
    outcome, _ = runner.run("forget", {"snapshot": result["snapshot"]})
    assert outcome.result == "success", outcome
    assert json.loads(restic.ok("snapshots", "--json")) == []
    # Neither the token nor the password reached the extension's log.
    logged = runner.log.read_text()
    assert "restore" in logged and issued["token"] not in logged and PASSWORD not in logged


def answered(hub: Hub) -> int:
    """The requests the hub has answered so far (its /metrics counts the one that reads it
    once it is answered)."""
    text = hub.api("GET", "/metrics").text
    return round(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith("outpost_http_requests_total{")))


def test_restics_cache_is_kept_between_commands(sqlite_hub: Hub, tmp_path: Path) -> None:
    # With the agent's data directory, restic's cache outlives the command: the next
    # snapshot reads the index and the last snapshot's trees from it, not from the hub.
    require_direct_restic()
    hub = sqlite_hub
    issued = credentials(hub, tmp_path)
    source = mixed_tree(tmp_path / "source")
    runner = Runner(tmp_path / "ext", issued, {"paths": [str(source)]})
    runner.data_dir = tmp_path / "ext" / "data"
    runner.data_dir.mkdir(parents=True)
    assert runner.run("enable")[0].result == "success"
    assert runner.run("snapshot")[0].result == "success"
    # One directory per repository (and restic's CACHEDIR.TAG).
    [cache] = [p for p in (runner.data_dir / "restic-cache").iterdir() if p.is_dir()]
    assert (cache / "snapshots").is_dir() and any((cache / "index").iterdir()), cache

    def requests_of_a_snapshot(change: str) -> int:
        (source / change).write_text(f"{change}\n")
        before = answered(hub)
        outcome, _ = runner.run("snapshot")
        assert outcome.result == "success", outcome
        return answered(hub) - before - 1

    warm = requests_of_a_snapshot("one")
    runner.data_dir = None  # a new cache in the command's temporary directory
    cold = requests_of_a_snapshot("two")
    assert warm < cold, (warm, cold)


def test_a_pre_snapshot_step_over_its_timeout_is_ended_and_named(sqlite_hub: Hub,
                                                                  tmp_path: Path) -> None:
    require_restic()
    issued = credentials(sqlite_hub, tmp_path)
    source = tmp_path / "data"
    source.mkdir()
    (source / "db.dump").write_bytes(b"rows\n" * 1000)
    marker = tmp_path / "flushed"
    runner = Runner(tmp_path / "ext", issued, {"paths": [str(source)]})
    assert runner.run("enable")[0].result == "success"

    # The application's step finishes in time: an application-consistent snapshot.
    outcome, result = runner.run("snapshot", pre_snapshot=f"touch {marker}",
                                 pre_snapshot_timeout=30)
    assert outcome.result == "success", outcome
    assert marker.exists() and result is not None
    assert result["consistency"] == "application" and not result["pre_snapshot"]["timed_out"]

    # It overruns: ended (its whole process group) at its timeout, the snapshot taken
    # crash-consistent, and the step and its time named in the result and the message.
    child = tmp_path / "child-alive"
    hang = f"(sleep 60; touch {child}) & sleep 60"
    outcome, result = runner.run("snapshot", pre_snapshot=hang, pre_snapshot_timeout=1)
    assert outcome.result == "warning", outcome
    assert result is not None and result["consistency"] == "crash"
    assert result["pre_snapshot"]["timed_out"] is True
    assert 1 <= result["pre_snapshot"]["seconds"] < 10
    assert "pre_snapshot step" in outcome.message and "crash-consistent" in outcome.message
    assert "timeout of 1 s" in outcome.message and len(result["snapshot"]) >= 8

    # Required application consistency: no snapshot, E9104 naming the step.
    outcome, result = runner.run("snapshot", pre_snapshot=hang, pre_snapshot_timeout=1,
                                 consistency="application")
    assert outcome.result == "error" and outcome.code == programs.PRE_SNAPSHOT_FAILED
    assert "E9104" in outcome.message and "pre_snapshot step" in outcome.message
    restic = Restic(sqlite_hub, issued["machine_id"], issued["token"])
    restic.env["RESTIC_PASSWORD"] = PASSWORD
    assert len(json.loads(restic.ok("snapshots", "--json"))) == 2
    assert not child.exists()  # the step's own children were ended too


def test_an_agent_installs_and_enables_it_to_ready(sqlite_hub: Hub, agents: list[Agent],
                                                   tmp_path: Path) -> None:
    require_restic()
    hub = sqlite_hub
    agent = healthy_agent(hub, tmp_path, agents, "m1")
    relative = hub.cli("backup", "enable", "--machine", "m1", "--paths", "srv")
    assert relative.returncode == 2 and "absolute" in relative.stderr, relative.stderr
    done = hub.cli("backup", "enable", "--machine", "m1", "--paths", str(tmp_path),
                   "--exclude", "*.tmp")
    assert done.returncode == 0, done.stderr
    assert "run as root" in done.stdout and "shown this once" in done.stdout, done.stdout
    password = done.stdout.strip().splitlines()[-1].strip()
    assert len(password) >= 32

    def state(want: str) -> dict[str, Any] | None:
        rows = hub.api("GET", "/v1/machines/m1/extensions").json()
        row = next((r for r in rows if r["name"] == "backup"), None)
        return row if row is not None and row["state"] == want else None

    row = wait_until(lambda: state("Ready"), 90, 0.2,
                     what=f"backup Ready on m1\n{agent.log()[-3000:]}")
    assert row["version"] == backup.version(), row
    goal = hub.api("GET", "/v1/extensions/backup").json()["goals"][0]
    assert (goal["run_as"], goal["protected"], goal["settings"]) == (
        "root", True, {"paths": [str(tmp_path)], "exclude": ["*.tmp"],
                       "consistency": "crash"})
    # Enabling again keeps the password (a new one would not open the repository).
    again = hub.cli("backup", "enable", "--machine", "m1", "--paths", str(tmp_path))
    assert again.returncode == 0 and "set before is kept" in again.stdout, again.stdout
    assert password not in again.stdout
    # (its enable runs again with the new settings: waited for, as it rotates the token)
    seq = hub.api("GET", "/v1/extensions/backup").json()["goals"][0]["seq"]
    wait_until(lambda: (found := state("Ready")) is not None and found["reported_seq"] == seq, 90,
               0.2, what=f"backup Ready at seq {seq}\n{agent.log()[-3000:]}")
    # enable made the repository on the hub, through the bridge, with a fresh token.
    [config] = list((hub.data_dir / "backup").glob("*/*/config"))
    assert config.stat().st_size > 0
    log = agent.state_dir / "logs" / "extensions" / "backup.log"
    text = log.read_text()
    assert "repository was created on the hub" in text, text
    assert password not in text and "obk_" not in text
    # The repository opens with the password the command printed.
    token = hub.api("POST", "/v1/machines/m1/backup-token", json={}).json()
    restic = Restic(hub, token["machine_id"], token["token"])
    restic.env["RESTIC_PASSWORD"] = password
    assert json.loads(restic.ok("snapshots", "--json")) == []

    disabled = hub.cli("backup", "disable", "--machine", "m1", "--json")
    assert disabled.returncode == 0 and json.loads(disabled.stdout)["enabled"] is False
    wait_until(lambda: state("NotReady"), 60, 0.2,
               what=f"backup NotReady on m1\n{agent.log()[-3000:]}")


def test_install_names_the_package_when_restic_is_missing(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(programs.shutil, "which", lambda _name: None)
    monkeypatch.setattr(programs, "RESTIC_FALLBACK", str(tmp_path / "no-restic"))
    monkeypatch.setenv("OUTPOST_EXT_STATUS_DIR", str(tmp_path))
    monkeypatch.setenv("OUTPOST_EXT_SEQ", "3")
    monkeypatch.setattr(sys, "stdin", _Stdin("{}"))
    assert programs.main(["install"]) == 1
    status = json.loads((tmp_path / "3.status").read_text())
    assert status["status"] == "error" and status["code"] == programs.RESTIC_MISSING
    assert "E9101" in status["message"] and "install the package 'restic'" in \
        status["message"]


class _Stdin:
    def __init__(self, text: str) -> None:
        self.text = text

    def read(self) -> str:
        return self.text


def test_snapshot_and_restore_as_operations_asked_on_the_hub(
        sqlite_hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    """The whole path: 'outpost backup enable', then 'outpost extension run backup snapshot'
    dispatched to the real agent (which fetches the machine's credentials for it), then a
    restore into another directory that holds every file's bytes."""
    require_restic()
    hub = sqlite_hub
    agent = healthy_agent(hub, tmp_path, agents, "m1")
    data = tmp_path / "data"
    (data / "nested" / "deeper").mkdir(parents=True)
    files = {"a.txt": b"hello\n", "empty": b"", "nested/b.bin": os.urandom(300_000),
             "nested/deeper/c.txt": b"x" * 70_000}
    for rel, content in files.items():
        (data / rel).write_bytes(content)
    done = hub.cli("backup", "enable", "--machine", "m1", "--paths", str(data))
    assert done.returncode == 0, done.stderr

    def ready() -> bool:
        rows = hub.api("GET", "/v1/machines/m1/extensions").json()
        return any(r["name"] == "backup" and r["state"] == "Ready" for r in rows)

    wait_until(ready, 90, 0.2, what=f"backup Ready on m1\n{agent.log()[-3000:]}")
    snap = hub.cli("extension", "run", "backup", "snapshot", "--machine", "m1", "--wait",
                   "--json", timeout=180)
    assert snap.returncode == 0, snap.stdout + snap.stderr
    result = json.loads(snap.stdout)["result"]
    assert result["files"] == len(files) and result["snapshot"], result
    target = tmp_path / "restored"
    back = hub.cli("extension", "run", "backup", "restore", "--machine", "m1",
                   "--param", f"target={target}", "--wait", "--json", timeout=180)
    assert back.returncode == 0, back.stdout + back.stderr
    for rel, content in files.items():
        # restic restores a path under the target as it was (absolute path kept).
        assert (target / str(data).lstrip("/") / rel).read_bytes() == content, rel
    log = (agent.state_dir / "logs" / "extensions" / "backup.log").read_text()
    assert "obk_" not in log
