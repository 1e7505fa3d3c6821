"""The shipped recovery extension with real parts: a real hub process over HTTPS, real agents
that install it from its goal ('outpost extension set recovery'), the real restic, and the
operations asked as an operator asks them ('outpost extension run recovery ...'): points
(crash- and application-consistent), a recovery on the same machine and on another one
through a restore grant (every file's bytes compared with the source), and a prune that
leaves the backup extension's snapshots in the shared repository alone."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from outpost.extensions import recovery
from tests.integration.test_backup_store import Restic, mixed_tree, require_restic, same_tree
from tests.support import Agent, Hub, healthy_agent, query, wait_until

# One password for the machines' repositories: the backup and recovery goals of a machine
# share its repository, and a target reads a source's with its own password when they match.
PASSWORD = "one repository password for the fleet"


def set_extension(hub: Hub, tmp_path: Path, name: str, machine: str,
                  settings: dict[str, Any], password: str = PASSWORD) -> None:
    """``outpost extension set NAME --machine M`` with settings and protected settings from
    files, run as root (the paths are the test's, not the outpost-ext user's)."""
    files = tmp_path / "goals"
    files.mkdir(exist_ok=True)
    public, protected = files / f"{name}-{machine}.json", files / f"{name}-{machine}.key.json"
    public.write_text(json.dumps(settings))
    protected.write_text(json.dumps({"repository_password": password}))
    done = hub.cli("extension", "set", name, "--machine", machine, "--settings", str(public),
                   "--protected-settings", str(protected), "--run-as", "root")
    assert done.returncode == 0, done.stdout + done.stderr


def wait_ready(hub: Hub, agent: Agent, machine: str, name: str = "recovery") -> dict[str, Any]:
    seq = next(g["seq"] for g in hub.api("GET", f"/v1/extensions/{name}").json()["goals"]
               if g["target"] == machine)

    def ready() -> dict[str, Any] | None:
        rows = hub.api("GET", f"/v1/machines/{machine}/extensions").json()
        row = next((r for r in rows if r["name"] == name), None)
        if row is not None and row["state"] == "Failed":
            raise AssertionError(f"{name} Failed on {machine}: {row}")
        return row if row is not None and row["state"] == "Ready" and \
            row["reported_seq"] == seq else None

    return wait_until(ready, 90, 0.2, what=f"{name} Ready on {machine}\n{agent.log()[-3000:]}")


def ask(hub: Hub, machine: str, operation: str, name: str = "recovery",
        **params: str) -> tuple[int, dict[str, Any]]:
    """``outpost extension run NAME OPERATION --machine M --param K=V ... --wait --json``:
    the exit code and the operation."""
    args = ["extension", "run", name, operation, "--machine", machine, "--wait", "--json"]
    for key, value in params.items():
        args += ["--param", f"{key}={value}"]
    done = hub.cli(*args, timeout=240)
    assert done.stdout.strip(), done.stderr
    return done.returncode, json.loads(done.stdout)


def repository(hub: Hub, machine: str) -> Restic:
    """restic on the machine's repository with the operator's fresh token for it (issued
    while no command of the machine runs: it replaces the agent's)."""
    issued = hub.api("POST", f"/v1/machines/{machine}/backup-token", json={}).json()
    restic = Restic(hub, issued["machine_id"], issued["token"])
    restic.env["RESTIC_PASSWORD"] = PASSWORD
    return restic


def snapshots(restic: Restic) -> dict[str, list[str]]:
    """Each snapshot's full id and its tags."""
    return {s["id"]: sorted(s.get("tags") or [])
            for s in json.loads(restic.ok("snapshots", "--json"))}


# SQLite only: what this test judges is the extension's work on the machine and in the
# repository (files on the hub's disk, read by restic); the database holds only the goal and
# the operations, which the grant test below and tests/*ext_ops* run on PostgreSQL too.
@pytest.mark.timeout(420)  # five points, a backup, a recovery and a prune through restic
def test_points_recovery_and_prune_beside_backups(sqlite_hub: Hub, agents: list[Agent],
                                                  tmp_path: Path) -> None:
    require_restic()
    hub = sqlite_hub
    agent = healthy_agent(hub, tmp_path, agents, "m1")
    data = mixed_tree(tmp_path / "data")
    flag, flushed = tmp_path / "app-may-flush", tmp_path / "flushed"
    # The application's step succeeds only while the flag exists: one script, both outcomes.
    set_extension(hub, tmp_path, "recovery", "m1", {
        "role": "source", "paths": [str(data)], "exclude": ["*.skip"],
        "pre_script": f"test -e {flag} && touch {flushed}", "pre_script_timeout": 30})
    row = wait_ready(hub, agent, "m1")
    assert row["version"] == recovery.version() == "1.0.0", row
    # The backup extension on the same machine, with the same password: the same repository
    # (enabled after recovery made it, so it opens the one there).
    set_extension(hub, tmp_path, "backup", "m1", {"paths": [str(data)]})
    wait_ready(hub, agent, "m1", "backup")
    (data / "scratch.skip").write_text("excluded\n")

    code, first = ask(hub, "m1", "point")
    assert code == 0 and first["status"] == "Succeeded", first
    point = first["result"]
    assert len(point["snapshot_id"]) == 64 and point["snapshot_id"].startswith(point["snapshot"])
    assert point["consistency"] == "crash" and point["pre_script"] is None, point
    assert point["files"] == 5 and point["paths"] == [str(data)], point  # *.skip excluded
    assert point["bytes_added"] > 0 and point["total_bytes"] > 5 * 1024 * 1024
    assert point["time"] > 0 and point["duration_seconds"] > 0
    assert not flushed.exists()  # a crash-consistent point runs no pre_script
    (data / "scratch.skip").unlink()
    expected = tmp_path / "as-of-first-point"
    shutil.copytree(data, expected, symlinks=True)

    # Application-consistent: the pre_script ran first and succeeded.
    (data / "later.txt").write_text("written after the first point\n")
    flag.touch()
    code, app = ask(hub, "m1", "point", consistency="application", tag="nightly")
    assert code == 0 and app["status"] == "Succeeded", app
    assert flushed.exists() and app["result"]["consistency"] == "application", app
    assert app["result"]["pre_script"]["exit_code"] == 0
    assert "application-consistent" in app["message"], app["message"]
    assert app["result"]["files_new"] == 1 and app["result"]["bytes_added"] < 100_000, app
    # The pre_script fails: the point is taken anyway, crash-consistent, with a warning.
    flag.unlink()
    code, warned = ask(hub, "m1", "point", consistency="application")
    assert code == 0 and warned["status"] == "Succeeded", warned
    assert warned["result"]["consistency"] == "crash", warned
    assert warned["result"]["pre_script"]["exit_code"] == 1
    assert "the pre_script step" in warned["message"] and "exited with 1" in warned["message"]
    assert "the point is crash-consistent" in warned["message"], warned["message"]

    code, backed = ask(hub, "m1", "snapshot", name="backup")
    assert code == 0, backed
    backup_id = backed["result"]["snapshot_id"]

    # Both kinds are in the one repository, each with its tag.
    restic = repository(hub, "m1")
    found = snapshots(restic)
    points = [point["snapshot_id"], app["result"]["snapshot_id"],
              warned["result"]["snapshot_id"]]
    assert found == {points[0]: ["outpost-recovery"],
                     points[1]: ["nightly", "outpost-recovery"],
                     points[2]: ["outpost-recovery"], backup_id: ["outpost"]}, found

    # Recover the first point into another directory: the files as they were then.
    target = tmp_path / "recovered"
    code, back = ask(hub, "m1", "recover", point=point["snapshot_id"], target=str(target))
    assert code == 0 and back["status"] == "Succeeded", back
    assert same_tree(expected, target / str(data).lstrip("/")) == []
    # restic counts every entry it restored: files, links and directories, the paths'
    # parents included.
    entries = sum(len(d) + len(f) for _, d, f in os.walk(target))
    assert back["result"]["point"] == point["snapshot_id"], back["result"]
    assert back["result"]["files"] == entries, (back["result"], entries)
    assert back["result"]["target"] == str(target) and "source_machine_id" not in back["result"]
    assert back["result"]["total_bytes"] == point["total_bytes"], back["result"]

    # Prune keeping the newest point: the other points go, the backup snapshot stays.
    code, pruned = ask(hub, "m1", "prune", keep_last="1")
    assert code == 0 and pruned["status"] == "Succeeded", pruned
    assert pruned["result"]["removed"] == sorted(points[:2]), pruned["result"]
    restic = repository(hub, "m1")  # the agent's commands since replaced the token
    assert snapshots(restic) == {points[2]: ["outpost-recovery"], backup_id: ["outpost"]}
    assert "no errors were found" in restic.ok("check")
    # A wrong param fails the operation with the extension's code, naming the field.
    code, refused = ask(hub, "m1", "prune", keep_within="a week")
    # (an extension's own code is the number its status file gave; the message holds
    # the catalog's code)
    assert code == 1 and refused["code"] == "9103", refused
    assert "E9103: params.keep_within" in refused["message"], refused["message"]

    log = (agent.state_dir / "logs" / "extensions" / "recovery.log").read_text()
    assert "recovered point" in log and PASSWORD not in log and "obk_" not in log


# SQLite and PostgreSQL: the grant is the hub's database's (the running operation it is
# issued for, one per operation, kept as a row).
@pytest.mark.timeout(300)
def test_a_point_recovered_on_another_machine_through_a_grant(
        hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    require_restic()
    source_agent = healthy_agent(hub, tmp_path, agents, "m1")
    target_agent = healthy_agent(hub, tmp_path, agents, "m2")
    data = mixed_tree(tmp_path / "data")
    set_extension(hub, tmp_path, "recovery", "m1", {"role": "source", "paths": [str(data)]})
    set_extension(hub, tmp_path, "recovery", "m2", {"role": "target"})
    wait_ready(hub, source_agent, "m1")
    wait_ready(hub, target_agent, "m2")
    code, taken = ask(hub, "m1", "point")
    assert code == 0, taken
    point = taken["result"]["snapshot_id"]
    source_id = hub.machines()["m1"]["id"]
    # The source changes after the point: the recovery is of the point, not of now.
    expected = tmp_path / "as-of-point"
    shutil.copytree(data, expected, symlinks=True)
    (data / "small.txt").write_text("changed after the point\n")

    target = tmp_path / "on-m2"
    code, moved = ask(hub, "m2", "recover", point=point, target=str(target),
                      source_machine_id=source_id, source_machine="m1")
    assert code == 0 and moved["status"] == "Succeeded", moved
    assert same_tree(expected, target / str(data).lstrip("/")) == []
    assert moved["result"]["source_machine_id"] == source_id, moved["result"]
    assert f"recovered point {point[:8]} of machine m1 into {target}" in moved["message"]
    # The grant served that one operation, and m2's own repository was not written.
    grants = query(hub.database_url, "SELECT op_id, source_machine_id FROM backup_grants")
    assert grants == [(moved["id"], source_id)]
    assert not list((hub.data_dir / "backup").glob(f"*/{hub.machines()['m2']['id']}/"
                                                    "snapshots/*"))
    log = (target_agent.state_dir / "logs" / "extensions" / "recovery.log").read_text()
    assert "obg_" not in log and PASSWORD not in log and "obk_" not in log
    # Asked again with the same point: a new operation gets a grant of its own.
    again = tmp_path / "again"
    code, second = ask(hub, "m2", "recover", point=point, target=str(again),
                       source_machine_id=source_id)
    assert code == 0, second
    assert same_tree(expected, again / str(data).lstrip("/")) == []
    # A recovery from a machine the account does not have is refused by the hub: E9116
    # from the grant, the operation failed with it.
    code, refused = ask(hub, "m2", "recover", point=point, target=str(tmp_path / "no"),
                        source_machine_id="f" * 32)
    assert code == 1 and refused["code"] == "9116" and "E9116" in refused["message"], refused
    assert "not a machine of its account" in refused["message"], refused["message"]


@pytest.mark.timeout(180)
def test_an_application_point_without_a_pre_script_is_e9104(
        sqlite_hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    # SQLite only: the code comes from the extension on the machine, not the database.
    require_restic()
    hub = sqlite_hub
    agent = healthy_agent(hub, tmp_path, agents, "m1")
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("x\n")
    set_extension(hub, tmp_path, "recovery", "m1", {"role": "source", "paths": [str(data)]})
    wait_ready(hub, agent, "m1")
    code, op = ask(hub, "m1", "point", consistency="application")
    assert code == 1 and op["code"] == "9104" and "E9104: " in op["message"], op
    assert "no pre_script" in op["message"], op["message"]
    assert snapshots(repository(hub, "m1")) == {}
