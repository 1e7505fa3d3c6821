"""Disaster recovery end to end (docs/recovery.md): a real hub, real agents, the shipped
recovery extension and real restic; the CLI as an operator runs it.

Every machine of a test runs on this one host, so a source and its target share one file
system: a failover restores into a directory of the test's (``--target-dir``), and what
"the target changed" is written where the failback's point on the target reads it.

The database matters in the points' pass and the catalog: ``test_points_and_a_test_failover``
runs on SQLite and PostgreSQL (the ``hub`` fixture); the other tests look at agents,
processes and restic, and run on SQLite only (the fast tier, tests/unit/test_recovery_pass.py,
has the conditional updates on both databases).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_backup_store import require_restic
from tests.recovery_support import group_agent
from tests.support import Agent, Hub, registered_agent, wait_until
from tests.tcp_proxy import tcp_proxy


def _files(root: Path) -> dict[str, bytes]:
    (root / "nested").mkdir(parents=True, exist_ok=True)
    files = {"a.txt": b"hello\n", "empty": b"", "nested/b.bin": os.urandom(300_000),
             "nested/c.txt": b"x" * 70_000}
    for rel, content in files.items():
        (root / rel).write_bytes(content)
    return files


def _ext_state(hub: Hub, machine: str) -> dict[str, Any]:
    rows = hub.api("GET", f"/v1/machines/{machine}/extensions").json()
    return next((r for r in rows if r["name"] == "recovery"), {})


def _protection(hub: Hub, machine: str) -> dict[str, Any]:
    answer: dict[str, Any] = hub.api("GET", f"/v1/machines/{machine}/protection").json()
    return answer


def _points(hub: Hub, machine: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = hub.api(
        "GET", f"/v1/machines/{machine}/backups?kind=recovery").json()
    return rows


def _cli_json(hub: Hub, *args: str, timeout: float = 60) -> Any:
    done = hub.cli(*args, "--json", timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


@pytest.mark.timeout(420)  # restic points every 5 s and a restore, on a busy 2-core host
def test_points_and_a_test_failover(hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    require_restic()
    src = group_agent(hub, tmp_path, agents, "src", "web")
    group_agent(hub, tmp_path, agents, "t1", "dr")
    data = tmp_path / "data"
    files = _files(data)
    done = hub.cli("protect", "src", "--paths", str(data), "--rpo", "10s", "--target-group",
                   "dr", "--wait", "--timeout", "180", timeout=200)
    assert done.returncode == 0, done.stdout + done.stderr + src.log()[-3000:]
    assert "Machine src is protected" in done.stdout and "a point every 5s" in done.stdout
    assert "The repository password is shown this once" in done.stdout
    assert "health: Protecting" in done.stdout, done.stdout

    # Points at the interval: each asked 5 s (or more, while the last one ran) after the one
    # before.
    wait_until(lambda: len(_points(hub, "src")) >= 3, 120, 0.5,
               what=f"3 points of src\n{json.dumps(_protection(hub, 'src'))}")
    points = sorted(_points(hub, "src"), key=lambda r: r["created_at"])
    assert all(p["kind"] == "recovery" and p["paths"] == [str(data)] for p in points)
    asked = sorted(o["created_at"] for o in hub.api(
        "GET", "/v1/extension-operations?machine=src").json() if o["operation"] == "point")
    gaps = [b - a for a, b in zip(asked, asked[1:], strict=False)]
    assert gaps and min(gaps) >= 4.9, gaps
    assert hub.api("GET", "/v1/backups").json() == []  # backups only, by default
    listed = _cli_json(hub, "protection", "list")
    assert [(r["machine"], r["health"]) for r in listed] == [("src", "Protecting")], listed
    text = hub.cli("protection", "show", "src").stdout
    assert "health:        Protecting" in text and "RPO 10s, last point" in text, text

    # A test failover of a chosen point: every file's bytes as they were at that point,
    # though the source changed since; the source's points go on.
    chosen = points[-1]
    (data / "a.txt").write_bytes(b"changed after the point\n")
    drill_dir = tmp_path / "drill"
    drill = hub.cli("failover", "src", "--to", "t1", "--test", "--point",
                    chosen["short_id"][:6], "--target-dir", str(drill_dir), "--wait",
                    timeout=240)
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert "Restoring (recover)" in drill.stderr and "status:       Succeeded" in drill.stdout
    for rel, content in files.items():
        assert (drill_dir / str(data).lstrip("/") / rel).read_bytes() == content, rel
    [action] = _cli_json(hub, "protection", "actions", "src")
    assert (action["kind"], action["status"], action["target"]) == ("test", "Succeeded", "t1")
    assert action["point"] == chosen["snapshot_id"]
    op = hub.api("GET", f"/v1/extension-operations/{action['op_id']}").json()
    assert (op["machine"], op["operation"]) == ("t1", "recover")
    assert op["params"]["source_machine"] == "src"
    assert _protection(hub, "src")["state"] == "Protecting"
    before = len(_points(hub, "src"))
    wait_until(lambda: len(_points(hub, "src")) > before, 60, 0.5,
               what="a point of src after the test failover")


@pytest.mark.timeout(480)
def test_failover_with_a_runbook_then_failback(sqlite_hub: Hub, agents: list[Agent],
                                               tmp_path: Path, shared: Path) -> None:
    require_restic()
    hub = sqlite_hub
    group_agent(hub, tmp_path, agents, "src", "web")
    group_agent(hub, tmp_path, agents, "t1", "dr")
    data = shared / "data"
    _files(data)
    os.chmod(data, 0o777)
    script = (f"echo \"started on $target_machine for $source_machine\"\n"
              f"echo changed-on-target > {data}/changed.txt\n")
    made = hub.api("POST", "/v1/runbooks", json={
        "name": "start-app", "type": "bash", "content": script,
        "params": ["source_machine:string", "target_machine:string"]})
    assert made.status_code == 201, made.text
    done = hub.cli("protect", "src", "--paths", str(data), "--rpo", "1h", "--target-group",
                   "dr", "--post-failover-runbook", "start-app", "--wait", timeout=200)
    assert done.returncode == 0, done.stdout + done.stderr

    over = hub.cli("failover", "src", "--to", "t1", "--target-dir", str(tmp_path / "over"),
                   "--wait", timeout=240)
    assert over.returncode == 0, over.stdout + over.stderr
    assert "RunningRunbook" in over.stderr, over.stderr
    assert "started on t1 for src" in over.stdout, over.stdout
    assert (data / "changed.txt").read_bytes() == b"changed-on-target\n"
    shown = _protection(hub, "src")
    assert (shown["health"], shown["active_machine"]) == ("FailedOver", "t1"), shown
    [action] = hub.api("GET", "/v1/recovery-actions?machine=src").json()
    job = hub.api("GET", f"/v1/jobs/{action['job_id']}").json()
    assert job["status"] == "Completed" and job["machine_id"] == \
        hub.machines()["t1"]["id"], job
    asked = len(hub.api("GET", "/v1/extension-operations?machine=src").json())
    time.sleep(3)  # failed over: no point of src is asked
    assert len(hub.api("GET", "/v1/extension-operations?machine=src").json()) == asked

    back_dir = tmp_path / "back"
    back = hub.cli("failback", "src", "--target-dir", str(back_dir), "--wait", timeout=300)
    assert back.returncode == 0, back.stdout + back.stderr
    assert (back_dir / str(data).lstrip("/") / "changed.txt").read_bytes() == \
        b"changed-on-target\n"
    [failback_point] = _points(hub, "t1")  # the target's own point, tagged failback
    assert failback_point["paths"] == [str(data)]
    shown = _protection(hub, "src")
    assert shown["state"] == "Protecting" and shown["active_machine"] is None, shown
    before = len(_points(hub, "src"))
    wait_until(lambda: len(_points(hub, "src")) > before, 90, 0.5,
               what="protection resumed: a new point of src")


@pytest.mark.timeout(420)
def test_a_killed_target_is_refused_at_once_and_another_one_works(
        sqlite_hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    require_restic()
    hub = sqlite_hub
    group_agent(hub, tmp_path, agents, "src", "web")
    t1 = group_agent(hub, tmp_path, agents, "t1", "dr")
    group_agent(hub, tmp_path, agents, "t2", "dr")
    data = tmp_path / "data"
    files = _files(data)
    done = hub.cli("protect", "src", "--paths", str(data), "--rpo", "1h", "--target-group",
                   "dr", "--wait", timeout=200)
    assert done.returncode == 0, done.stdout + done.stderr
    t1.stop(signal.SIGKILL)
    wait_until(lambda: hub.machines()["t1"]["status"] != "Healthy", 30, 0.2,
               what="t1 unresponsive")
    started = time.monotonic()
    refused = hub.cli("failover", "src", "--to", "t1", "--test")
    assert time.monotonic() - started < 15
    assert refused.returncode == 1, refused.stdout
    assert "151099" in refused.stderr and "machine t1" in refused.stderr, refused.stderr
    assert hub.api("GET", "/v1/recovery-actions").json() == []

    elsewhere = tmp_path / "drill"
    other = hub.cli("failover", "src", "--to", "t2", "--test", "--target-dir",
                    str(elsewhere), "--wait", timeout=240)
    assert other.returncode == 0, other.stdout + other.stderr
    for rel, content in files.items():
        assert (elsewhere / str(data).lstrip("/") / rel).read_bytes() == content, rel


@pytest.mark.timeout(480)
def test_the_source_killed_mid_point_publishes_nothing_and_the_next_point_completes(
        sqlite_hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    require_restic()
    hub = sqlite_hub
    src = group_agent(hub, tmp_path, agents, "src", "web")
    data = tmp_path / "data"
    _files(data)
    # Every point application-consistent, its pre-script slow: the point is mid-way when
    # its agent is killed.
    made = hub.api("POST", "/v1/runbooks", json={"name": "flush", "type": "sh",
                                                 "content": "sleep 8\n"})
    assert made.status_code == 201, made.text
    done = hub.cli("protect", "src", "--paths", str(data), "--rpo", "1h", "--pre-script",
                   "flush", "--app-consistent-every", "1")
    assert done.returncode == 0, done.stdout + done.stderr

    def running() -> dict[str, Any] | None:
        ops = hub.api("GET", "/v1/extension-operations?machine=src").json()
        return next((o for o in ops if o["operation"] == "point"
                     and o["status"] == "Running"), None)

    op = wait_until(running, 120, 0.2, what=f"a point Running\n{src.log()[-2000:]}")
    assert op is not None and op["params"] == {"consistency": "application"}
    src.stop(signal.SIGKILL)
    src.start()

    def ended() -> dict[str, Any]:
        found: dict[str, Any] = hub.api("GET", f"/v1/extension-operations/{op['id']}").json()
        return found if found["status"] in ("Succeeded", "Failed") else {}

    lost = wait_until(ended, 60, 0.3, what="the killed point ended")
    assert (lost["status"], lost["code"]) == ("Failed", "E9093"), lost
    assert not any(p["op_id"] == op["id"] for p in _points(hub, "src"))
    wait_until(lambda: len(_points(hub, "src")) >= 1, 180, 0.5,
               what=f"the next point\n{json.dumps(_protection(hub, 'src'))}")
    [point] = _points(hub, "src")
    assert point["op_id"] != op["id"] and point["consistency"] == "application"


@pytest.mark.timeout(420)
def test_a_network_cut_turns_behind_with_the_cause_then_protecting(
        sqlite_hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    require_restic()
    hub = sqlite_hub
    host, port = hub.url.removeprefix("https://").rsplit(":", 1)
    with tcp_proxy((host, int(port))) as proxy:
        agent = registered_agent(hub, tmp_path, "src", "web",
                                 hub_urls=[f"https://{host}:{proxy.port}"])
        agents.append(agent.start())
        wait_until(lambda: hub.machines()["src"]["status"] == "Healthy", 30,
                   what="src healthy through the proxy")
        data = tmp_path / "data"
        _files(data)
        done = hub.cli("protect", "src", "--paths", str(data), "--rpo", "10s", "--wait",
                       timeout=200)
        assert done.returncode == 0, done.stdout + done.stderr
        with proxy.outage():
            cut = time.monotonic()
            behind = wait_until(lambda: _protection(hub, "src")["health"] == "Behind"
                                and _protection(hub, "src"), 60, 0.5,
                                what="Behind during the cut")
            assert "behind because the agent of src is" in behind["message"], behind
            assert "RPO 10s, last point" in behind["message"], behind
            text = hub.cli("protection", "list").stdout
            assert "Behind" in text and "the agent of src" in text, text
            time.sleep(max(0.0, 30 - (time.monotonic() - cut)))
        wait_until(lambda: _protection(hub, "src")["health"] == "Protecting", 120, 0.5,
                   what=f"Protecting after the cut\n{json.dumps(_protection(hub, 'src'))}")


BROKEN = b"""#!/bin/sh
# A recovery extension broken on the machine: its handler runs a while, then writes a status
# file that is not JSON.
sleep 6
echo '{not json' > "$OUTPOST_EXT_STATUS_DIR/$OUTPOST_EXT_SEQ.status"
"""


@pytest.mark.timeout(480)
def test_a_broken_extension_shows_its_step_and_repair_keeps_the_points(
        sqlite_hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    require_restic()
    hub = sqlite_hub
    src = group_agent(hub, tmp_path, agents, "src", "web")
    data = tmp_path / "data"
    _files(data)
    done = hub.cli("protect", "src", "--paths", str(data), "--rpo", "1h", "--wait",
                   timeout=200)
    assert done.returncode == 0, done.stdout + done.stderr
    [kept] = _points(hub, "src")
    version = _ext_state(hub, "src")["version"]
    [program] = [p for p in tmp_path.glob(f"**/recovery/{version}/bin/recovery")]
    program.write_bytes(BROKEN)

    # New settings run the enable handler again: Transitioning at step enable, then the
    # malformed status file fails it (E9032).
    again = hub.cli("protect", "src", "--paths", str(data), "--exclude", "*.tmp", "--rpo", "1h")
    assert again.returncode == 0, again.stdout + again.stderr
    wait_until(lambda: _protection(hub, "src")["extension_state"] == "Transitioning", 30, 0.2,
               what="Transitioning")
    shown = _protection(hub, "src")
    assert shown["extension_step"] == "enable", shown
    text = hub.cli("protection", "show", "src").stdout
    assert "Transitioning at step enable" in text, text
    wait_until(lambda: _protection(hub, "src")["health"] == "Failed", 60, 0.3,
               what=f"Failed\n{src.log()[-2000:]}")
    failed = _protection(hub, "src")
    assert "the recovery extension is Failed at step enable" in failed["message"], failed
    assert "E9032" in failed["message"], failed

    repaired = hub.cli("protect", "src", "--paths", str(data), "--rpo", "1h", "--repair",
                       "--wait", timeout=240)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr + src.log()[-3000:]
    assert "being reinstalled" in repaired.stdout
    assert _ext_state(hub, "src")["state"] == "Ready"
    points = _points(hub, "src")
    assert kept["id"] in [p["id"] for p in points] and len(points) >= 2, points
    assert b"not json" not in program.read_bytes()  # the package was installed again


def test_bad_input_is_refused_with_its_code(sqlite_hub: Hub, agents: list[Agent],
                                            tmp_path: Path) -> None:
    hub = sqlite_hub
    group_agent(hub, tmp_path, agents, "src", "web")
    other = hub.api("POST", "/v1/accounts", json={"name": "second"}).json()
    cases = [
        (("protect", "nope", "--paths", "/srv"), 1, "No machine named 'nope'"),
        (("protect", "src", "--paths", "/srv", "--rpo", "soon"), 1, "E7051"),
        (("protect", "src", "--paths", "srv"), 2, "absolute"),
        (("protect", "src", "--paths", "/srv", "--post-failover-runbook", "nothere"), 1,
         "No runbook 'nothere'"),
        (("protection", "show", "src"), 1, "E9121"),
        (("failback", "src"), 1, "E9121"),
    ]
    for args, code, text in cases:
        done = hub.cli(*args)
        assert done.returncode == code and text in done.stderr, (args, done.stderr)
    assert hub.cli("protect", "src", "--paths", "/srv", "--rpo", "1h").returncode == 0
    not_over = hub.cli("failback", "src")
    assert not_over.returncode == 1 and "E9122" in not_over.stderr, not_over.stderr
    # Another account's machines are not found (a target of it: tests/unit/
    # test_recovery_pass.py); nor is this one from the other account.
    mine = hub.cli("failover", "src", "--to", "elsewhere")
    assert mine.returncode == 1 and "No machine named 'elsewhere'" in mine.stderr
    foreign = hub.cli("protection", "show", "src", token=other["token"])
    assert foreign.returncode == 1 and "No machine named 'src'" in foreign.stderr
    explained = hub.cli("explain", "E9122")
    assert explained.returncode == 0 and "not failed over" in explained.stdout
