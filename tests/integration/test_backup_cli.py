"""'outpost backup now|list|show|restore|forget' and the hub's snapshot catalog, with a real
hub (SQLite and PostgreSQL), a real agent, restic through the bridge, and the CLI as a
user runs it."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from outpost import __version__
from outpost.hub import backup_catalog
from outpost.protocol.errors import OutpostError
from tests.integration.test_backup_store import require_restic
from tests.support import (Agent, Hub, healthy_agent, machine_calls, query, run_cli,
                           wait_until)


def _ready(hub: Hub, agent: Agent, name: str) -> None:
    def ready() -> bool:
        rows = hub.api("GET", f"/v1/machines/{name}/extensions").json()
        return any(r["name"] == "backup" and r["state"] == "Ready" for r in rows)

    wait_until(ready, 90, 0.2, what=f"backup Ready on {name}\n{agent.log()[-3000:]}")


def _files(root: Path) -> dict[str, bytes]:
    (root / "nested").mkdir(parents=True)
    files = {"a.txt": b"hello\n", "empty": b"", "nested/b.bin": os.urandom(200_000),
             "nested/c.txt": b"x" * 50_000}
    for rel, content in files.items():
        (root / rel).write_bytes(content)
    return files


@pytest.mark.timeout(300)  # a snapshot, a restore and a forget through restic, on a busy host
def test_now_list_show_restore_forget(hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    require_restic()
    agent = healthy_agent(hub, tmp_path, agents, "m1")
    data = tmp_path / "data"
    files = _files(data)
    assert hub.cli("backup", "enable", "--machine", "m1", "--paths", str(data)).returncode == 0
    _ready(hub, agent, "m1")
    empty = hub.cli("backup", "list")
    assert empty.returncode == 0 and "No snapshots" in empty.stdout, empty.stdout

    # now: the snapshot's summary, and its row in the catalog.
    now = hub.cli("backup", "now", "m1", "--wait", timeout=180)
    assert now.returncode == 0, now.stdout + now.stderr
    assert "4 files" in now.stdout and "crash-consistent" in now.stdout, now.stdout
    rows = json.loads(hub.cli("backup", "list", "--json").stdout)
    assert len(rows) == 1, rows
    snap = rows[0]
    assert snap["machine"] == "m1" and snap["files"] == len(files)
    assert snap["total_bytes"] == sum(len(c) for c in files.values())
    assert snap["bytes_added"] > 0 and snap["duration_seconds"] > 0
    assert len(snap["snapshot_id"]) == 64 and snap["snapshot_id"].startswith(snap["short_id"])
    assert snap["paths"] == [str(data)] and snap["consistency"] == "crash"
    assert snap["waited_seconds"] is None and snap["forgotten_at"] is None
    assert abs(snap["taken_at"] - snap["created_at"]) < 120
    op = hub.api("GET", f"/v1/extension-operations/{snap['op_id']}").json()
    assert op["operation"] == "snapshot" and op["result"]["snapshot_id"] == snap["snapshot_id"]
    assert json.loads(hub.cli("backup", "list", "m1", "--json").stdout) == rows
    text = hub.cli("backup", "list", "m1").stdout
    assert snap["short_id"] in text and "244.1 KiB" in text, text

    # show: by a start of the id, by 'latest'; a wrong or too short id is refused, coded.
    shown = hub.cli("backup", "show", "m1", snap["short_id"][:5])
    assert shown.returncode == 0, shown.stderr
    assert f"files:        {len(files)}" in shown.stdout and snap["snapshot_id"] in shown.stdout
    latest = json.loads(hub.cli("backup", "show", "m1", "latest", "--json").stdout)
    assert latest == snap
    for ref in ("abc", "ffffffff", "not-hex"):
        wrong = hub.cli("backup", "show", "m1", ref)
        assert wrong.returncode == 1 and "E9110" in wrong.stderr, (ref, wrong.stderr)
    assert hub.api("GET", "/v1/machines/m1/backups/ffffffff").json()["code"] == "E9110"

    # restore into another directory: every file's bytes.
    target = tmp_path / "restored"
    back = hub.cli("backup", "restore", "m1", snap["short_id"][:6], "--target", str(target),
                   "--wait", timeout=180)
    assert back.returncode == 0, back.stdout + back.stderr
    assert f"Restored snapshot {snap['short_id']} of m1 into {target} in" in back.stdout, \
        back.stdout
    for rel, content in files.items():
        assert (target / str(data).lstrip("/") / rel).read_bytes() == content, rel
    relative = hub.cli("backup", "restore", "m1", "--target", "here")
    assert relative.returncode == 2 and "absolute" in relative.stderr
    nowhere = hub.cli("backup", "restore", "m1", "--to", "m9", "--target", str(target))
    assert nowhere.returncode == 1 and "No machine named 'm9'" in nowhere.stderr

    # forget: wrong arguments are refused; then the snapshot leaves the listing.
    neither = hub.cli("backup", "forget", "m1")
    assert neither.returncode == 2 and "E9115" in neither.stderr, neither.stderr
    both = hub.cli("backup", "forget", "m1", snap["short_id"], "--keep-last", "1")
    assert both.returncode == 2 and "not both" in both.stderr
    gone = hub.cli("backup", "forget", "m1", snap["short_id"], "--wait", timeout=180)
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert f"Forgot 1 snapshot of m1: {snap['short_id']}" in gone.stdout, gone.stdout
    assert json.loads(hub.cli("backup", "list", "--json").stdout) == []
    kept = json.loads(hub.cli("backup", "list", "--forgotten", "--json").stdout)
    assert len(kept) == 1 and kept[0]["forgotten_at"] is not None
    assert kept[0]["forgotten_by"] != snap["op_id"]
    again = hub.cli("backup", "restore", "m1", snap["short_id"], "--wait")
    assert again.returncode == 1 and "E9112" in again.stderr, again.stderr
    ops = hub.api("GET", "/v1/extension-operations?machine=m1").json()
    assert [o["operation"] for o in ops] == ["forget", "restore", "snapshot"]


def test_another_accounts_snapshots_are_not_found(hub: Hub, agents: list[Agent],
                                                  tmp_path: Path) -> None:
    require_restic()
    agent = healthy_agent(hub, tmp_path, agents, "m1")
    data = tmp_path / "data"
    _files(data)
    assert hub.cli("backup", "enable", "--machine", "m1", "--paths", str(data)).returncode == 0
    _ready(hub, agent, "m1")
    assert hub.cli("backup", "now", "m1", "--wait", timeout=180).returncode == 0
    [snap] = hub.api("GET", "/v1/backups").json()
    other = hub.api("POST", "/v1/accounts", json={"name": "second"}).json()["token"]

    assert hub.api("GET", "/v1/backups", other).json() == []
    for path in ("/v1/backups?machine=m1", "/v1/machines/m1/backups",
                 f"/v1/machines/m1/backups/{snap['short_id']}",
                 f"/v1/machines/{snap['machine_id']}/backups/latest"):
        response = hub.api("GET", path, other)
        assert response.status_code == 404 and response.json()["code"] == "E3002", path
    for args in (("backup", "list", "m1"), ("backup", "show", "m1", "latest"),
                 ("backup", "now", "m1"), ("backup", "restore", "m1", "--target", "/tmp/x"),
                 ("backup", "forget", "m1", "--keep-last", "1")):
        refused = hub.cli(*args, token=other)
        assert refused.returncode == 1 and "No machine named 'm1'" in refused.stderr, args
    # --to another account's machine: not found either (the same name, not its machine).
    refused = hub.cli("backup", "restore", "m1", "--to", "m1", token=other)
    assert refused.returncode == 1 and "E3002" in refused.stderr
    assert len(hub.api("GET", "/v1/backups").json()) == 1


@pytest.mark.timeout(300)
def test_restore_on_another_machine_of_the_account(sqlite_hub: Hub, agents: list[Agent],
                                                    tmp_path: Path) -> None:
    """m2 restores a snapshot of m1: it reads m1's repository through a read-only grant
    for that one operation, with m1's password (its own goal holds another)."""
    require_restic()
    hub = sqlite_hub
    one = healthy_agent(hub, tmp_path, agents, "m1")
    two = healthy_agent(hub, tmp_path, agents, "m2")
    data = tmp_path / "data"
    files = _files(data)
    enabled = hub.cli("backup", "enable", "--machine", "m1", "--paths", str(data))
    password = enabled.stdout.strip().splitlines()[-1].strip()
    assert hub.cli("backup", "enable", "--machine", "m2", "--paths", str(tmp_path / "other")
                   ).returncode == 0
    _ready(hub, one, "m1")
    _ready(hub, two, "m2")
    assert hub.cli("backup", "now", "m1", "--wait", timeout=180).returncode == 0
    [snap] = hub.api("GET", "/v1/backups").json()

    target = tmp_path / "on-m2"
    moved = hub.cli("backup", "restore", "m1", snap["short_id"], "--to", "m2", "--target",
                    str(target), "--wait", timeout=180)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert f"Restored snapshot {snap['short_id']} of m1 on m2 into {target}" in moved.stdout, \
        moved.stdout
    for rel, content in files.items():
        assert (target / str(data).lstrip("/") / rel).read_bytes() == content, rel
    [op] = [o for o in hub.api("GET", "/v1/extension-operations?machine=m2").json()
            if o["operation"] == "restore"]
    assert op["params"]["source_machine"] == "m1" and op["status"] == "Succeeded"
    assert op["result"]["source_machine_id"] == snap["machine_id"]
    # The grant served that operation only: it was issued once, and is no longer valid.
    grants = query(hub.database_url, "SELECT op_id, source_machine_id FROM backup_grants")
    assert grants == [(op["id"], snap["machine_id"])]
    # Neither the grant nor m1's password reached m2's extension log.
    log = (two.state_dir / "logs" / "extensions" / "backup.log").read_text()
    assert "obg_" not in log and password not in log and "obk_" not in log
    # m2's own token asks for a grant outside a restore: refused.
    mine = hub.api("POST", "/v1/machines/m2/backup-token", json={}).json()["token"]
    with hub.client() as client:
        refused = client.post("/v1/backup-grants", headers={"Authorization": f"Bearer {mine}"})
    assert refused.status_code == 403 and refused.json()["code"] == "E9116", refused.text


def test_a_restore_grant_reads_the_source_only_while_its_operation_runs(
        hub: Hub, tmp_path: Path) -> None:
    """The grant's rules at the hub, the restoring machine played by signed requests: read
    and lock the source's repository, write nothing, open no other repository, one grant
    per operation, none after the operation ended, none for another account's machine."""
    sim = machine_calls(hub, tmp_path / "sim", "sim")
    sim("POST", "/v1/agent/heartbeat", {"agent_version": __version__})
    machine_calls(hub, tmp_path / "src", "src")
    ids = {m["name"]: m["id"] for m in hub.api("GET", "/v1/machines").json()}
    assert hub.cli("backup", "enable", "--machine", "sim", "--paths", "/srv").returncode == 0
    second = hub.api("POST", "/v1/accounts", json={"name": "second"}).json()
    theirs = run_cli("agent", "register", "--hub", hub.url, "--account-id", second["id"],
                     "--account-key", second["primary_key"], "--group", "web",
                     "--ca-fingerprint", hub.fingerprint, "--name", "theirs",
                     "--state-dir", str(tmp_path / "theirs"))
    assert theirs.returncode == 0, theirs.stderr
    foreign = hub.api("GET", "/v1/machines", second["token"]).json()[0]["id"]
    token = hub.api("POST", "/v1/machines/sim/backup-token", json={}).json()["token"]

    def grant() -> httpx.Response:
        with hub.client() as client:
            return client.post("/v1/backup-grants", headers={"Authorization": f"Bearer {token}"})

    def started(source_id: str) -> str:
        op = hub.api("POST", "/v1/machines/sim/extensions/backup/operations/restore",
                     json={"params": {"snapshot": "latest", "source_machine_id": source_id}})
        assert op.status_code == 201, op.text
        sim("POST", f"/v1/agent/ext-ops/{op.json()['id']}/progress",
            {"attempt": 1, "state": "started", "at": time.time()})
        return str(op.json()["id"])

    def repo(method: str, grant_token: str, path: str, body: bytes = b"",
             user: str | None = None) -> httpx.Response:
        # user: HTTP Basic (restic's own REST backend), that user name and the grant.
        with hub.client() as client:
            if user is not None:
                return client.request(method, f"/v1/backup/{path}", content=body,
                                      auth=(user, grant_token))
            return client.request(method, f"/v1/backup/{path}", content=body,
                                  headers={"Authorization": f"Bearer {grant_token}"})

    assert grant().json()["code"] == "E9116"  # no restore runs
    op_id = started(ids["src"])
    answer = grant()
    assert answer.status_code == 201, answer.text
    given = answer.json()
    assert given["machine_id"] == ids["src"] and given["op_id"] == op_id
    assert given["token"].startswith("obg_") and given["password"] is None  # src has none
    granted = given["token"]
    assert grant().json()["code"] == "E9116"  # one grant per operation
    lock = b'{"lock": 1}'
    name = hashlib.sha256(lock).hexdigest()
    src = ids["src"]
    assert repo("GET", granted, f"{src}/config").json()["code"] == "E9065"  # read: allowed
    assert repo("GET", granted, f"{src}/keys/").status_code == 200
    assert repo("POST", granted, f"{src}/locks/{name}", lock).status_code == 200
    assert repo("DELETE", granted, f"{src}/locks/{name}").status_code == 200
    for method, path in (("POST", f"{src}/data/{name}"), ("DELETE", f"{src}/keys/{name}"),
                         ("POST", f"{src}/config"), ("POST", f"{src}/?create=true")):
        refused = repo(method, granted, path, lock)
        assert refused.status_code == 403 and refused.json()["code"] == "E9114", path
    other = repo("GET", granted, f"{ids['sim']}/config")
    assert other.status_code == 403 and other.json()["code"] == "E9061"
    # The same through HTTP Basic, the source's id as user name: reads and locks only.
    assert repo("GET", granted, f"{src}/keys/", user=src).status_code == 200
    assert repo("POST", granted, f"{src}/locks/{name}", lock, user=src).status_code == 200
    assert repo("DELETE", granted, f"{src}/locks/{name}", user=src).status_code == 200
    for method, path in (("POST", f"{src}/data/{name}"), ("DELETE", f"{src}/keys/{name}"),
                         ("POST", f"{src}/config")):
        refused = repo(method, granted, path, lock, user=src)
        assert refused.status_code == 403 and refused.json()["code"] == "E9114", path
    for user, path in ((ids["sim"], f"{src}/keys/"), (ids["sim"], f"{ids['sim']}/keys/")):
        other = repo("GET", granted, path, user=user)
        assert other.status_code == 403 and other.json()["code"] == "E9061", (user, path)
    # The operation ends: the grant opens nothing any more.
    sim("POST", f"/v1/agent/ext-ops/{op_id}/end",
        {"attempt": 1, "status": "succeeded", "at": time.time()})
    assert repo("GET", granted, f"{src}/keys/").json()["code"] == "E9060"
    # A source of another account (asked by hand through the generic route): refused.
    started(foreign)
    refused = grant()
    assert refused.status_code == 403 and "not a machine of its account" in \
        refused.json()["message"]
    # And an operator of the other account cannot name this account's machine at all.
    restore = hub.api("POST", "/v1/machines/src/backups/latest/restore", second["token"],
                      json={"to": "theirs"})
    assert restore.status_code == 404 and restore.json()["code"] == "E3002"


def test_the_catalog_records_what_the_operations_report(hub: Hub, tmp_path: Path) -> None:
    """The catalog as the operations' ends fill it, the machine played by signed requests:
    how long the snapshot waited for the load and why, what its result says; a failed one
    leaves nothing; a forget marks what it removed."""
    sim = machine_calls(hub, tmp_path / "sim", "sim")
    sim("POST", "/v1/agent/heartbeat", {"agent_version": __version__})
    assert hub.cli("backup", "enable", "--machine", "sim", "--paths", "/srv").returncode == 0
    full = "0123abcd" + "5" * 56

    def run(operation: str, end: dict[str, Any], waited: float = 0.0, **params: Any) -> None:
        op = hub.api("POST", f"/v1/machines/sim/extensions/backup/operations/{operation}",
                     json={"params": params}).json()
        at = time.time()
        if waited:
            sim("POST", f"/v1/agent/ext-ops/{op['id']}/progress", {
                "attempt": 1, "state": "waiting", "at": at,
                "message": "waiting: CPU at 97% has been above the 90% threshold for 0 s"})
            sim("POST", f"/v1/agent/ext-ops/{op['id']}/progress", {
                "attempt": 1, "state": "waiting", "at": at + 20,
                "message": "waiting: CPU at 95% has been above the 90% threshold for 20 s"})
        sim("POST", f"/v1/agent/ext-ops/{op['id']}/progress",
            {"attempt": 1, "state": "started", "at": at + waited})
        sim("POST", f"/v1/agent/ext-ops/{op['id']}/end",
            {"attempt": 1, "at": at + waited + 5, **end})

    run("snapshot", {"status": "failed", "code": "9102", "message": "E9102: restic failed"})
    assert hub.api("GET", "/v1/backups").json() == []
    run("snapshot", {"status": "succeeded", "result": {
        "snapshot": "0123abcd", "snapshot_id": full, "time": 1_800_000_000.25, "files": 7,
        "bytes_added": 2 ** 33, "total_bytes": 2 ** 34, "duration_seconds": 4.5,
        "paths": ["/srv"], "consistency": "application"}}, waited=42.5)
    [row] = json.loads(hub.cli("backup", "list", "sim", "--json").stdout)
    assert (row["id"], row["short_id"], row["files"], row["total_bytes"], row["taken_at"]) == (
        full, "0123abcd", 7, 2 ** 34, 1_800_000_000.25)
    assert row["waited_seconds"] == 42.5 and "CPU at 95%" in row["wait_reason"]
    shown = hub.cli("backup", "show", "sim", "0123").stdout
    assert "waited:       42.5 s (waiting: CPU at 95%" in shown, shown
    assert "16.0 GiB (17179869184 bytes)" in shown and "application" in shown, shown
    op = hub.api("GET", f"/v1/extension-operations/{row['op_id']}").json()
    assert op["waited_seconds"] == 42.5 and op["wait_reason"].startswith("waiting: CPU at 95%")

    run("forget", {"status": "succeeded", "result": {"removed": [full]}}, keep_last=1)
    assert hub.api("GET", "/v1/backups").json() == []
    [gone] = hub.api("GET", "/v1/backups?forgotten=true").json()
    assert gone["forgotten_at"] is not None and gone["forgotten_by"] != row["op_id"]
    listed = hub.cli("backup", "list", "--forgotten").stdout
    assert "0123abcd" in listed and "FORGOTTEN" in listed, listed


def test_a_snapshot_held_back_by_load_says_why(sqlite_hub: Hub, agents: list[Agent],
                                               tmp_path: Path) -> None:
    """The machine's memory is over its threshold (0.1 %, always): the snapshot waits,
    'backup now --wait' says why while it waits, stops at its --timeout with E9113, and the
    operation's record keeps the reason."""
    require_restic()
    hub = sqlite_hub
    agent = healthy_agent(hub, tmp_path, agents, "m1", max_memory_percent=0.1,
                          pressure_seconds=0, max_cpu_percent=100)
    data = tmp_path / "data"
    _files(data)
    assert hub.cli("backup", "enable", "--machine", "m1", "--paths", str(data)).returncode == 0
    _ready(hub, agent, "m1")
    waited = hub.cli("backup", "now", "m1", "--wait", "--timeout", "6s", timeout=60)
    assert waited.returncode == 1 and "E9113" in waited.stderr, waited.stderr
    assert "Waiting: waiting: memory at" in waited.stderr, waited.stderr
    [op] = hub.api("GET", "/v1/extension-operations?machine=m1").json()
    assert op["status"] == "Waiting" and op["wait_reason"].startswith("waiting: memory at")
    assert hub.api("GET", "/v1/backups").json() == []


# --- naming a snapshot ----------------------------------------------------------------------
def _row(short: str, full: str | None, forgotten: float | None = None) -> Any:
    return SimpleNamespace(short_id=short, snapshot_id=full, forgotten_at=forgotten)


ROWS = [_row("abcd1234", "abcd1234" + "0" * 56), _row("abce5678", "abce5678" + "1" * 56),
        _row("0badf00d", None, forgotten=1.0)]


@pytest.mark.parametrize(("ref", "want"), [
    ("latest", "abcd1234"), ("LATEST", "abcd1234"), ("abcd", "abcd1234"),
    ("ABCE5", "abce5678"), ("abce5678" + "1" * 56, "abce5678"), ("0badf00d", "0badf00d"),
    ("0bad", "0badf00d")])
def test_a_snapshot_is_named_by_its_id_a_start_of_it_or_latest(ref: str, want: str) -> None:
    assert backup_catalog.pick(ROWS, ref, "m1").short_id == want


@pytest.mark.parametrize(("rows", "ref", "code"), [
    (ROWS, "abc", "E9110"), (ROWS, "abc-", "E9110"), (ROWS, "ffff", "E9110"),
    (ROWS, "abc" + "d" * 70, "E9110"), (ROWS, "abc1", "E9110"), (ROWS, "ab", "E9110"),
    (ROWS[2:], "latest", "E9110"), (ROWS, "abcd12341", "E9110")])
def test_a_name_that_matches_none_is_refused(rows: list[Any], ref: str, code: str) -> None:
    with pytest.raises(OutpostError) as raised:
        backup_catalog.pick(rows, ref, "m1")
    assert raised.value.code == code and "m1" in raised.value.message


def test_an_ambiguous_start_names_the_candidates() -> None:
    rows = [*ROWS, _row("abcd9999", None)]
    with pytest.raises(OutpostError) as raised:
        backup_catalog.pick(rows, "abcd", "m1")
    assert raised.value.code == "E9111"
    assert "abcd1234, abcd9999" in raised.value.message


@pytest.mark.parametrize(("stamp", "seconds"), [
    ("2026-12-05T11:40:01.123456789+00:00", 1796470801.123456),
    ("2026-12-05T12:40:01.5+01:00", 1796470801.5), ("2026-12-05T11:40:01Z", 1796470801.0),
    ("not a time", None)])
def test_restics_times_are_read_to_the_microsecond(stamp: str, seconds: float | None) -> None:
    from outpost.extensions.backup.main import _epoch

    assert _epoch(stamp) == seconds


def test_enable_sets_the_transport_only_when_asked(hub: Hub, tmp_path: Path) -> None:
    """'backup enable --transport bridge' writes the setting into the goal; without the
    option the goal leaves it out (auto); a value it does not know is refused, naming the
    choices, and the goal already set is kept."""
    machine_calls(hub, tmp_path / "sim", "sim")

    def settings() -> dict[str, Any]:
        goals = hub.api("GET", "/v1/extensions/backup").json()["goals"]
        [goal] = [g for g in goals if g["target_kind"] == "machine" and g["target"] == "sim"]
        return dict(goal["settings"])

    bridge = hub.cli("backup", "enable", "--machine", "sim", "--paths", "/srv",
                     "--transport", "bridge")
    assert bridge.returncode == 0, bridge.stderr
    assert settings()["transport"] == "bridge"
    wrong = hub.cli("backup", "enable", "--machine", "sim", "--paths", "/srv",
                    "--transport", "carrier-pigeon")
    assert wrong.returncode == 2 and "carrier-pigeon" in wrong.stderr, wrong.stderr
    assert "bridge" in wrong.stderr and settings()["transport"] == "bridge"
    assert hub.cli("backup", "enable", "--machine", "sim", "--paths", "/srv").returncode == 0
    assert "transport" not in settings()
