"""Fast tier: the recovery module on a hub in this process, its machines' agents simulated
(they report the extension Ready and end the operations the hub asks). The point pass on two
"replicas" at once (two Recovery objects, one database: SQLite and PostgreSQL, where the
conditional updates are the database's), refusals recorded rather than raised, and each
step of failover, test failover and failback.

Real agents, restic and faults are in tests/integration/test_recovery.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from outpost.hub.recovery import Recovery
from tests.extbuild import manifest, package
from tests.inproc import FAST, Clock, InprocHub
from tests.recovery_support import OPS, end_op, point_result, ready, recovery_package

pytestmark = FAST


def _second(hub: InprocHub) -> Recovery:
    h = hub.hub
    return Recovery(h.engine, h.extensions, h.ext_ops, h.backups)


async def _ops(hub: InprocHub, machine: str, operation: str) -> list[dict[str, Any]]:
    rows = await hub.ok("GET", f"/v1/extension-operations?machine={machine}")
    return [r for r in rows if r["operation"] == operation]


async def test_points_at_the_interval_once_across_replicas(
        fast_hub_any: InprocHub, hub_clock: Clock) -> None:
    hub = fast_hub_any
    version = await recovery_package(hub)
    m1 = await hub.machine("m1", "web")
    await m1.heartbeat(interval=30)
    await hub.stop_task("recovery")  # the test runs the pass
    shown = await hub.ok("POST", "/v1/machines/m1/protection",
                         json={"paths": ["/srv"], "rpo": "10s", "app_consistent_every": 2})
    assert shown["interval_seconds"] == 5 and shown["health"] == "Protecting", shown
    assert shown["repository_password"] and shown["extension_version"] == version
    goal = [g for g in (await hub.ok("GET", "/v1/extensions/recovery"))["goals"]
            if g["target"] == "m1"][0]
    assert goal["settings"] == {"role": "source", "paths": ["/srv"]} and goal["protected"]
    a, b = hub.hub.recovery, _second(hub)

    # Not Ready yet: nothing asked, and the reason says why.
    await asyncio.gather(a.tick(), b.tick())
    assert await _ops(hub, "m1", "point") == []
    shown = await hub.ok("GET", "/v1/machines/m1/protection")
    assert "waiting for the recovery extension to be Ready" in shown["reason"], shown

    await ready(m1, version)
    hub_clock.advance(6)
    await asyncio.gather(a.tick(), b.tick(), a.tick())
    [first] = await _ops(hub, "m1", "point")
    assert first["params"] == {"consistency": "crash"}
    hub_clock.advance(6)  # due again, but the last one has not ended: it waits
    await asyncio.gather(a.tick(), b.tick())
    assert len(await _ops(hub, "m1", "point")) == 1

    await end_op(m1, first["id"], result=point_result("abcdef12", ["/srv"]))
    shown = await hub.ok("GET", "/v1/machines/m1/protection")
    assert shown["health"] == "Protecting" and shown["points"] == 1, shown
    assert shown["last_point"].startswith("abcdef12")
    assert shown["message"].startswith("RPO 10s, last point"), shown["message"]
    # The catalog: a recovery point, not a backup.
    assert await hub.ok("GET", "/v1/backups") == []
    [row] = await hub.ok("GET", "/v1/backups?kind=recovery")
    assert row["kind"] == "recovery" and row["op_id"] == first["id"]
    assert len(await hub.ok("GET", "/v1/backups?kind=all")) == 1
    # 'latest' is the newest backup (there is none); a point is shown by its id.
    latest = await hub.api("GET", "/v1/machines/m1/backups/latest")
    assert latest.status_code == 404 and latest.json()["code"] == "E9110"
    assert (await hub.ok("GET", "/v1/machines/m1/backups/abcdef12"))["kind"] == "recovery"

    hub_clock.advance(6)
    await asyncio.gather(a.tick(), b.tick())
    points = await _ops(hub, "m1", "point")
    assert len(points) == 2 and points[0]["params"] == {"consistency": "application"}

    # The agent silent: the next turn's refusal (151099) is the protection's reason, and
    # health says Behind because of the agent.
    await end_op(m1, points[0]["id"], ok=False, code="E9102", message="restic failed: x")
    hub_clock.advance(200)
    await asyncio.gather(a.tick(), b.tick())
    assert len(await _ops(hub, "m1", "point")) == 2
    shown = await hub.ok("GET", "/v1/machines/m1/protection")
    assert "151099" in shown["reason"] and "m1" in shown["reason"], shown
    assert shown["health"] == "Behind", shown
    assert "behind because the agent of m1 is" in shown["message"], shown["message"]


async def test_failover_test_failover_and_failback_step_by_step(
        fast_hub: InprocHub) -> None:
    hub = fast_hub
    version = await recovery_package(hub)
    m1, m2 = await hub.machine("m1", "web"), await hub.machine("m2", "dr")
    silent = await hub.machine("m3", "dr")  # registered, never heard from
    for m in (m1, m2):
        await m.heartbeat(interval=30)
        await ready(m, version)
    await hub.stop_task("recovery")
    await hub.ok("POST", "/v1/runbooks", json={
        "name": "after", "type": "bash", "content": "echo up",
        "params": ["source_machine:string", "target_dir:string"]})
    await hub.ok("POST", "/v1/machines/m1/protection", json={
        "paths": ["/srv"], "rpo": "1h", "target_group": "dr",
        "post_failover_runbook": "after"})
    dr = [g for g in (await hub.ok("GET", "/v1/extensions/recovery"))["goals"]
          if g["target_kind"] == "group"][0]
    assert dr["target"] == "dr" and dr["settings"] == {"role": "target"} and dr["protected"]
    rec = hub.hub.recovery
    await rec.tick()
    [point] = await _ops(hub, "m1", "point")
    await end_op(m1, point["id"], result=point_result("aa11bb22", ["/srv"]))

    # Refusals, each at once with its code.
    silent_target = await hub.api("POST", "/v1/machines/m1/failover", json={"to": "m3"})
    assert silent_target.status_code == 409
    assert silent_target.json()["code"] == "E9080" and "m3" in silent_target.json()["message"]
    assert "151099" in silent_target.json()["message"]
    assert await hub.ok("GET", "/v1/recovery-actions") == []
    itself = await hub.api("POST", "/v1/machines/m1/failover", json={"to": "m1"})
    assert itself.json()["code"] == "E9124"
    not_over = await hub.api("POST", "/v1/machines/m1/failback", json={})
    assert not_over.status_code == 409 and not_over.json()["code"] == "E9122"
    del silent

    # A test failover: recover into a scratch directory, the runbook, the source untouched.
    drill = await hub.ok("POST", "/v1/machines/m1/failover", json={"to": "m2", "test": True})
    assert drill["status"] == "Restoring" and drill["step"] == "recover"
    assert drill["target_dir"].startswith("/var/tmp/outpost-recovery/")
    busy = await hub.api("POST", "/v1/machines/m1/failover", json={"to": "m2", "test": True})
    assert busy.json()["code"] == "E9125"
    [recover] = await _ops(hub, "m2", "recover")
    assert recover["params"] == {"point": "aa11bb22" + "0" * 56, "target": drill["target_dir"],
                                 "source_machine_id": m1.id, "source_machine": "m1"}
    await end_op(m2, recover["id"], result={"point": recover["params"]["point"]})
    await rec.tick()
    drill = await hub.ok("GET", f"/v1/recovery-actions/{drill['id']}")
    assert drill["status"] == "RunningRunbook" and drill["job_id"], drill
    job = await hub.job(drill["job_id"])
    assert job["params"] == {"source_machine": "m1", "target_dir": drill["target_dir"]}
    assert await m2.claimed() == [drill["job_id"]]
    ended = await m2.report(drill["job_id"], started=True, records=[
        {"seq": 0, "stream": "Output", "text": "service up on m2", "at": time.time()}],
        end={"exit_code": 0})
    assert ended.status_code < 300, ended.text
    await rec.tick()
    drill = await hub.ok("GET", f"/v1/recovery-actions/{drill['id']}")
    assert drill["status"] == "Succeeded" and "service up on m2" in drill["output"], drill
    assert (await hub.ok("GET", "/v1/machines/m1/protection"))["state"] == "Protecting"

    # A real failover: the protection is FailedOver and takes no points.
    over = await hub.ok("POST", "/v1/machines/m1/failover", json={"to": "m2"})
    assert over["target_dir"] == "/"
    shown = await hub.ok("GET", "/v1/machines/m1/protection")
    assert shown["health"] == "FailedOver" and shown["active_machine"] == "m2"
    again = await hub.api("POST", "/v1/machines/m1/failover", json={"to": "m2"})
    assert again.json()["code"] == "E9123"
    recover = (await _ops(hub, "m2", "recover"))[0]
    await end_op(m2, recover["id"], ok=False, code="E9102", message="restic failed: disk")
    await rec.tick()
    failed = await hub.ok("GET", f"/v1/recovery-actions/{over['id']}")
    assert failed["status"] == "Failed" and failed["code"] == "E9102", failed
    # A failed failover leaves the source protected.
    assert (await hub.ok("GET", "/v1/machines/m1/protection"))["state"] == "Protecting"

    over = await hub.ok("POST", "/v1/machines/m1/failover", json={"to": "m2"})
    recover = (await _ops(hub, "m2", "recover"))[0]
    await end_op(m2, recover["id"])
    await rec.tick()
    job_id = (await hub.ok("GET", f"/v1/recovery-actions/{over['id']}"))["job_id"]
    assert await m2.claimed() == [job_id]
    await m2.report(job_id, started=True, end={"exit_code": 0})
    await rec.tick()
    assert (await hub.ok("GET", f"/v1/recovery-actions/{over['id']}"))["status"] == \
        "Succeeded"
    await rec.tick()
    assert len(await _ops(hub, "m1", "point")) == 1  # no point while failed over

    # Failback: a point of the paths on m2, recovered on m1, protection resumed.
    back = await hub.ok("POST", "/v1/machines/m1/failback", json={})
    assert back["kind"] == "failback" and back["step"] == "point"
    [taken] = await _ops(hub, "m2", "point")
    assert taken["params"] == {"paths": ["/srv"], "tag": "failback"}
    await end_op(m2, taken["id"], result=point_result("cc33dd44", ["/srv"]))
    await rec.tick()
    back = await hub.ok("GET", f"/v1/recovery-actions/{back['id']}")
    assert back["status"] == "Restoring" and back["step"] == "recover", back
    [home] = await _ops(hub, "m1", "recover")
    assert home["params"] == {"point": "cc33dd44" + "0" * 56, "target": "/",
                              "source_machine_id": m2.id, "source_machine": "m2"}
    await end_op(m1, home["id"])
    await rec.tick()
    back = await hub.ok("GET", f"/v1/recovery-actions/{back['id']}")
    assert back["status"] == "Succeeded", back
    shown = await hub.ok("GET", "/v1/machines/m1/protection")
    assert shown["state"] == "Protecting" and shown["active_machine"] is None
    listed = await hub.ok("GET", "/v1/recovery-actions?machine=m1")
    assert [a["kind"] for a in listed] == ["failback", "failover", "failover", "test"]


async def test_bad_input_each_with_its_code(fast_hub: InprocHub) -> None:
    hub = fast_hub
    await recovery_package(hub)
    await hub.machine("m1", "web")
    other = await hub.ok("POST", "/v1/accounts", json={"name": "second"})
    theirs = await hub.machine("t1", "web", account=other)
    del theirs
    cases = [
        ("POST", "/v1/machines/nope/protection", {"paths": ["/srv"]}, 404, "E3002"),
        ("POST", "/v1/machines/m1/protection", {"paths": ["/srv"], "rpo": "soon"}, 422,
         "E7051"),
        ("POST", "/v1/machines/m1/protection", {"paths": ["srv"]}, 400, "E9120"),
        ("POST", "/v1/machines/m1/protection",
         {"paths": ["/srv"], "post_failover_runbook": "missing"}, 404, "E3002"),
        ("POST", "/v1/machines/m1/protection",
         {"paths": ["/srv"], "target_group": "nogroup"}, 404, "E9007"),
        ("GET", "/v1/machines/m1/protection", None, 404, "E9121"),
        ("POST", "/v1/machines/m1/failback", {}, 404, "E9121"),
        ("GET", "/v1/recovery-actions/0000", None, 404, "E9126"),
    ]
    for method, path, body, status, code in cases:
        answer = await hub.api(method, path, json=body)
        assert (answer.status_code, answer.json()["code"]) == (status, code), \
            (path, body, answer.text)
    await hub.ok("POST", "/v1/machines/m1/protection", json={"paths": ["/srv"]})
    elsewhere = await hub.api("POST", "/v1/machines/m1/failover", json={"to": "t1"})
    assert elsewhere.status_code == 404 and elsewhere.json()["code"] == "E3002"
    assert (await hub.api("GET", "/v1/machines/m1/protection",
                          token=other["token"])).status_code == 404
    assert await hub.ok("GET", "/v1/protections", token=other["token"]) == []


async def test_a_failed_point_is_tried_again_well_before_the_interval(
        fast_hub_any: InprocHub, hub_clock: Clock) -> None:
    hub = fast_hub_any
    version = await recovery_package(hub)
    m1 = await hub.machine("m1", "web")
    await m1.heartbeat(interval=30)
    await ready(m1, version)
    await hub.stop_task("recovery")
    await hub.ok("POST", "/v1/machines/m1/protection", json={"paths": ["/srv"], "rpo": "1h"})
    rec = hub.hub.recovery
    await rec.tick()
    [first] = await _ops(hub, "m1", "point")
    await end_op(m1, first["id"], ok=False, code="E9102", message="restic failed: locked")
    await rec.tick()
    assert len(await _ops(hub, "m1", "point")) == 1  # not at once
    hub_clock.advance(11)  # FAILED_RETRY, not the 30 min interval
    await asyncio.gather(rec.tick(), _second(hub).tick())
    points = await _ops(hub, "m1", "point")
    assert len(points) == 2, points
    shown = await hub.ok("GET", "/v1/machines/m1/protection")
    assert shown["point_op_status"] == "Queued"
    hub_clock.advance(11)  # the retry has not failed: the interval again
    await rec.tick()
    assert len(await _ops(hub, "m1", "point")) == 2


async def test_retention_prunes_and_unprotect_keeps_or_forgets_the_points(
        fast_hub: InprocHub) -> None:
    hub = fast_hub
    version = await recovery_package(hub)
    m1 = await hub.machine("m1", "web")
    await m1.heartbeat(interval=30)
    await ready(m1, version)
    await hub.stop_task("recovery")
    await hub.ok("POST", "/v1/machines/m1/protection",
                 json={"paths": ["/srv"], "rpo": "1h", "retention": "24h"})
    await hub.hub.recovery.tick()
    [prune] = await _ops(hub, "m1", "prune")
    assert prune["params"] == {"keep_within": "24h"}
    [point] = await _ops(hub, "m1", "point")
    await end_op(m1, point["id"], result=point_result("ab12cd34", ["/srv"]))
    full = "ab12cd34" + "0" * 56
    # The point's snapshot file in the machine's repository on the hub.
    snapshots = hub.hub.backups.root / hub.init.account_id / m1.id / "snapshots"
    snapshots.mkdir(parents=True)
    (snapshots / full).write_bytes(b"{}")

    kept = await hub.ok("DELETE", "/v1/machines/m1/protection")
    assert kept == {"machine": "m1", "removed": True, "points_forgotten": 0}
    assert [g for g in (await hub.ok("GET", "/v1/extensions/recovery"))["goals"]] == []
    assert len(await hub.ok("GET", "/v1/backups?kind=recovery")) == 1
    assert (snapshots / full).exists()

    await hub.ok("POST", "/v1/machines/m1/protection", json={"paths": ["/srv"]})
    gone = await hub.ok("DELETE", "/v1/machines/m1/protection?delete_points=true")
    assert gone["points_forgotten"] == 1
    assert not (snapshots / full).exists()
    assert await hub.ok("GET", "/v1/backups?kind=recovery") == []
    [forgotten] = await hub.ok("GET", "/v1/backups?kind=recovery&forgotten=true")
    assert forgotten["forgotten_by"] == "unprotect"
    assert (await hub.api("GET", "/v1/machines/m1/protection")).json()["code"] == "E9121"


async def test_the_extension_codes_appear_in_the_recovery_flow(
        fast_hub: InprocHub, hub_clock: Clock) -> None:
    """151076, 150066 and 151095 for the causes docs/extensions.md gives them, met by
    recovery's own points and failovers (151099: the tests above): the hub's clock moved
    with a test hook, the agents simulated."""
    hub = fast_hub
    version = await recovery_package(hub)
    m1, m2 = await hub.machine("m1", "web"), await hub.machine("m2", "dr")
    m3 = await hub.machine("m3", "web")
    for m in (m1, m2, m3):
        await m.heartbeat(interval=30)
        await ready(m, version)
    await hub.stop_task("recovery")  # the test runs the passes
    await hub.stop_task("extension-operations")
    rec, ops = hub.hub.recovery, hub.hub.ext_ops
    await hub.ok("POST", "/v1/machines/m1/protection",
                 json={"paths": ["/srv"], "rpo": "10m", "target_group": "dr"})
    await rec.tick()
    [point] = await _ops(hub, "m1", "point")

    # 151076: the agent heartbeats but never starts the point; at its start timeout it ends
    # with the code, and the protection says so.
    for _ in range(7):
        hub_clock.advance(100)
        for m in (m1, m2, m3):
            await m.heartbeat(interval=30)
        await ops.tick()
    ended = await hub.ok("GET", f"/v1/extension-operations/{point['id']}")
    assert (ended["status"], ended["code"]) == ("Failed", "151076"), ended
    shown = await hub.ok("GET", "/v1/machines/m1/protection")
    assert shown["health"] == "Behind" and "151076" in shown["message"], shown

    # Points that succeed, of m1 and of m3 (protected to the same target group), for the
    # failovers below.
    await hub.ok("POST", "/v1/machines/m3/protection",
                 json={"paths": ["/srv"], "rpo": "10m", "target_group": "dr"})
    hub_clock.advance(11)
    await rec.tick()
    for m, short in ((m1, "cc33dd44"), (m3, "ee55ff66")):
        pending = [p for p in await _ops(hub, m.name, "point") if p["status"] != "Failed"]
        assert len(pending) == 1, pending
        await end_op(m, pending[0]["id"], result=point_result(short, ["/srv"]))

    # 150066: m1's test failover's recover on m2 runs past its expected time; m3's failover
    # to m2 is refused at once, naming it.
    drill = await hub.ok("POST", "/v1/machines/m1/failover", json={"to": "m2", "test": True})
    [recover] = await _ops(hub, "m2", "recover")
    started = await m2.call("POST", f"/v1/agent/ext-ops/{recover['id']}/progress",
                            {"attempt": 1, "state": "started", "at": time.time()})
    assert started.is_success, started.text
    hub_clock.advance(7300)  # past the recover operation's expected 7200 s
    for m in (m1, m2, m3):
        await m.heartbeat(interval=30)
    overdue = await hub.api("POST", "/v1/machines/m3/failover", json={"to": "m2", "test": True})
    assert overdue.status_code == 409, overdue.text
    assert overdue.json()["code"] == "E9083" and "150066" in overdue.json()["message"]
    assert recover["id"] in overdue.json()["message"]
    assert [a["id"] for a in await hub.ok("GET", "/v1/recovery-actions")] == [drill["id"]]

    # 151095: a recovery version that needs a newer agent than m1's; its next point is
    # refused at once with the code and both versions, recorded as the reason.
    newer = await hub.api("POST", "/v1/extensions",
                          headers={"Content-Type": "application/gzip"},
                          content=package(manifest("recovery", "9.9.9",
                                                   min_agent_version="99.0.0",
                                                   operations=OPS)))
    assert newer.status_code == 201, newer.text
    set_newer = await hub.api("PUT", "/v1/extensions/recovery/targets/machine/m1",
                              json={"version": "9.9.9"})
    assert set_newer.is_success, set_newer.text
    await ready(m1, "9.9.9")
    hub_clock.advance(3700)
    await m1.heartbeat(interval=30)
    await rec.tick()
    shown = await hub.ok("GET", "/v1/machines/m1/protection")
    assert "151095" in shown["reason"] and "99.0.0" in shown["reason"], shown
