"""Schedules of extension operations (EX-7), in the fast tier: each machine's offset within
the spread, an operation held back until its scheduled start (not_before) and timed out from
then, and a run fired by several replicas at once asking each machine once (SQLite and
PostgreSQL)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import sqlalchemy as sa

from outpost.hub.db import extension_operations, schedule_runs, schedules
from outpost.hub.extension_ops import ExtensionOps
from outpost.hub.schedules import Scheduler, machine_offset
from tests.extbuild import manifest, package
from tests.inproc import FAST, Clock, InprocHub

pytestmark = FAST

YEARLY = "0 0 1 1 *"  # never due by itself during a test: the test makes it due


def test_machine_offsets_are_stable_within_the_spread_and_spread_evenly() -> None:
    spread = 7200.0
    machines = [f"machine-{i}" for i in range(2000)]
    offsets = [machine_offset("schedule-a", m, spread) for m in machines]
    assert all(0 <= o < spread for o in offsets), (min(offsets), max(offsets))
    assert offsets == [machine_offset("schedule-a", m, spread) for m in machines]
    assert all(o == round(o, 3) for o in offsets)  # whole milliseconds
    # Roughly uniform: each tenth of the window holds about a tenth of the fleet.
    buckets = [0] * 10
    for o in offsets:
        buckets[int(o / spread * 10)] += 1
    assert all(150 <= b <= 250 for b in buckets), buckets
    assert len(set(offsets)) > 1990  # not one second for the fleet
    # Another schedule places the same machines elsewhere; no spread, no offset.
    other = [machine_offset("schedule-b", m, spread) for m in machines]
    assert sum(a == b for a, b in zip(offsets, other, strict=True)) < 5
    assert {machine_offset("schedule-a", m, 0) for m in machines} == {0.0}


async def _fleet(hub: InprocHub, *, start_timeout: float = 600,
                 expected: float = 3600) -> None:
    """m1..m3 Healthy with extension ops set; m4 set but never heard from; m5 in the group
    without it."""
    data = package(manifest("ops", "1.0.0", operations={
        "snap": {"run": "bin/snap", "start_timeout_seconds": start_timeout,
                 "expected_seconds": expected}}))
    await hub.ok("POST", "/v1/extensions", content=data,
                 headers={"Content-Type": "application/gzip"})
    for name in ("m1", "m2", "m3", "m4", "m5"):
        machine = await hub.machine(name)
        if name != "m4":  # Healthy for a minute, however slow the machine running this
            await machine.heartbeat(interval=60)
        if name != "m5":
            await hub.ok("PUT", f"/v1/extensions/ops/targets/machine/{name}", json={})


async def _schedule(hub: InprocHub, spread: str, **target: str) -> dict[str, Any]:
    made: dict[str, Any] = await hub.ok("POST", "/v1/schedules", json={
        "name": "nightly", "extension": "ops", "operation": "snap", "cron": YEARLY,
        "spread": spread, "params": {"keep": "7"}, **(target or {"group": "web"})})
    return made


async def _make_due(hub: InprocHub, schedule_id: str) -> Any:
    """The schedule's row, due now (as the scheduler reads it)."""
    async with hub.hub.engine.begin() as conn:
        await conn.execute(schedules.update().where(schedules.c.id == schedule_id).values(
            next_run_at=float(int(time.time()))))
        return (await conn.execute(sa.select(schedules).where(
            schedules.c.id == schedule_id))).one()


async def _ops(hub: InprocHub) -> dict[str, dict[str, Any]]:
    listed = await hub.ok("GET", "/v1/extension-operations")
    return {o["machine"]: o for o in listed}


async def test_a_run_fired_by_several_replicas_asks_each_machine_once(
        fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    await _fleet(hub)
    made = await _schedule(hub, "2h")
    assert (made["kind"], made["extension"], made["operation"]) == ("extension", "ops", "snap")
    assert (made["target_kind"], made["target"], made["runbook_name"]) == ("group", "web",
                                                                           None)
    row = await _make_due(hub, made["id"])
    # Three replicas reach the same due run at once (the hub's own loop may be a fourth).
    replicas = [Scheduler(hub.hub.engine, hub.hub.dispatcher, ext_ops=ExtensionOps(
        hub.hub.engine, hub.hub.extensions.cache)) for _ in range(3)]
    fired = await asyncio.gather(*(r._fire(row) for r in replicas))
    assert sum(fired) <= 1, fired
    async with hub.hub.engine.connect() as conn:
        runs = (await conn.execute(sa.select(schedule_runs).where(
            schedule_runs.c.schedule_id == made["id"]))).all()
        count = (await conn.execute(sa.select(sa.func.count()).select_from(
            extension_operations))).scalar()
    assert len(runs) == 1 and count == 4, (runs, count)
    assert (runs[0].operations, runs[0].skipped) == (4, 1), runs  # m5 has no goal
    ops = await _ops(hub)
    assert sorted(ops) == ["m1", "m2", "m3", "m4"]
    due = runs[0].due_at
    for name in ("m1", "m2", "m3"):
        op = ops[name]
        offset = machine_offset(made["id"], hub.machines[name].id, 7200)
        assert op["not_before"] == due + offset and 0 <= offset < 7200, op
        assert op["schedule_id"] == made["id"] and op["params"] == {"keep": "7"}
        assert op["requested_by"] == "schedule nightly"
        if offset > 1:
            assert op["status"] == "Queued" and op["message"].startswith(
                "scheduled: starts at "), op
            assert "of spread 2h)" in op["message"], op
        # The start timeout counts from the scheduled start, not from the run.
        assert op["start_deadline"] == max(op["not_before"], op["created_at"]) + 600, op
    assert len({ops[n]["not_before"] for n in ("m1", "m2", "m3")}) == 3
    # The machine whose agent never answered: its operation failed at once, with the code
    # 'extension run' answers (151099), and the others went on.
    assert (ops["m4"]["status"], ops["m4"]["code"]) == ("Failed", "E9080"), ops["m4"]
    assert "151099" in ops["m4"]["message"], ops["m4"]

    shown = await hub.ok("GET", "/v1/schedules/nightly")
    [run] = shown["runs"]
    assert (run["operations"], run["skipped"], run["job_id"]) == (4, 1, None), run
    assert run["operation_states"]["Failed"] == 1, run
    assert sum(run["operation_states"].values()) == 4, run
    latest = {o["machine"]: o for o in shown["latest_operations"]}
    assert sorted(latest) == ["m1", "m2", "m3", "m4"]
    for name in ("m1", "m2", "m3"):
        assert latest[name]["offset_seconds"] == round(ops[name]["not_before"] - due, 3)
    # Fired again for the same due run (a replica that read it late): nothing more.
    assert await replicas[0]._fire(row) is False
    assert len(await hub.ok("GET", "/v1/extension-operations")) == 4


async def test_a_scheduled_operation_starts_at_its_offset_and_times_out_from_it(
        fast_hub: InprocHub, hub_clock: Clock) -> None:
    hub = fast_hub
    await _fleet(hub, start_timeout=60)
    made = await _schedule(hub, "1h", machine="m2")
    assert (made["target_kind"], made["target"], made["group_name"]) == ("machine", "m2",
                                                                         None)
    row = await _make_due(hub, made["id"])
    assert await hub.hub.scheduler._fire(row) is True
    [op] = (await _ops(hub)).values()
    assert op["machine"] == "m2" and op["status"] == "Queued", op
    wait = op["not_before"] - time.time()
    machine = hub.machines["m2"]
    if wait > 2:
        await hub.hub.ext_ops.tick()
        assert await machine.poll() == []  # not before its time
        assert op["message"].startswith("scheduled: starts at"), op
        hub_clock.advance(wait - 1)
        await hub.hub.ext_ops.tick()
        assert await machine.poll() == []
        assert (await _ops(hub))["m2"]["status"] == "Queued"  # 151076 counts from its start
    hub_clock.advance(max(op["not_before"] - time.time(), 0) + 1)
    await hub.hub.ext_ops.tick()
    polled = await machine.poll()
    assert len(polled) == 1, (polled, await _ops(hub))
    [item] = polled
    assert item["kind"] == "ext_op" and item["payload"]["op_id"] == op["id"]
    assert item["payload"]["deadline"] == op["not_before"] + 60
    handed = (await _ops(hub))["m2"]
    assert handed["status"] == "Queued" and handed["message"] == "", handed
    # Never started by the agent: failed 60 s after its scheduled start.
    hub_clock.advance(60)
    await hub.hub.ext_ops.tick()
    failed = (await _ops(hub))["m2"]
    assert (failed["status"], failed["code"]) == ("Failed", "151076"), failed


async def test_a_run_refuses_an_overdue_machine_and_reinstalls_an_uninstalled_one(
        fast_hub_any: InprocHub, hub_clock: Clock) -> None:
    hub = fast_hub_any
    await _fleet(hub, expected=5)
    m1 = hub.machines["m1"]
    # m1 runs an operation asked by hand, past its expected 5 s (150066 for the next one).
    asked = await hub.ok("POST", "/v1/machines/m1/extensions/ops/operations/snap", json={})
    [item] = await m1.poll()
    assert item["payload"]["op_id"] == asked["id"]
    started = await m1.call("POST", f"/v1/agent/ext-ops/{asked['id']}/progress", {
        "attempt": 1, "state": "started", "at": time.time()})
    assert started.status_code == 204, started.text
    # m2: uninstalled from the machine by the operator; the next operation reinstalls it.
    await hub.ok("POST", "/v1/machines/m2/extensions/ops/uninstall")
    hub_clock.advance(10)
    for name in ("m1", "m2", "m3"):
        await hub.machines[name].heartbeat(interval=60)
    made = await _schedule(hub, "1h")
    row = await _make_due(hub, made["id"])
    assert await hub.hub.scheduler._fire(row) is True
    ops = {o["machine"]: o for o in await hub.ok("GET", "/v1/extension-operations")
           if o["schedule_id"] == made["id"]}
    assert sorted(ops) == ["m1", "m2", "m3", "m4"]
    assert (ops["m1"]["status"], ops["m1"]["code"]) == ("Failed", "E9083"), ops["m1"]
    assert "150066" in ops["m1"]["message"] and asked["id"] in ops["m1"]["message"]
    assert ops["m1"]["version"] == "1.0.0"
    assert ops["m2"]["status"] == "Waiting", ops["m2"]
    assert ops["m2"]["message"].startswith("waiting for extension ops to be installed "
                                           "again on m2"), ops["m2"]
    assert "; scheduled: starts at" in ops["m2"]["message"], ops["m2"]
    assert ops["m3"]["status"] == "Queued" and ops["m4"]["status"] == "Failed"
    async with hub.hub.engine.connect() as conn:
        holds = (await conn.execute(sa.text("SELECT count(*) FROM extension_holds"))).scalar()
    assert holds == 0  # released: m2's agent installs it again
    shown = await hub.ok("GET", "/v1/schedules/nightly")
    assert shown["runs"][0]["operation_states"] == {"Failed": 2, "Waiting": 1, "Queued": 1}


async def test_bad_targets_are_refused_with_their_codes(fast_hub: InprocHub) -> None:
    hub = fast_hub
    await _fleet(hub)
    await hub.runbook("noop")
    base = {"name": "s", "cron": YEARLY}
    cases = [
        ({"group": "web"}, 422, "E8125", "neither"),
        ({"runbook": "noop", "extension": "ops", "operation": "snap", "group": "web"}, 422,
         "E8125", "both"),
        ({"extension": "ops", "group": "web"}, 422, "E8125", "--operation"),
        ({"runbook": "noop", "operation": "snap", "group": "web"}, 422, "E8125",
         "with an extension"),
        ({"extension": "ops", "operation": "snap"}, 422, "E8126", "neither"),
        ({"extension": "ops", "operation": "snap", "group": "web", "machine": "m1"}, 422,
         "E8126", "both"),
        ({"runbook": "noop", "machine": "m1"}, 422, "E8126", "not a machine"),
        ({"extension": "nope", "operation": "snap", "group": "web"}, 404, "E9004",
         "No extension 'nope'"),
        ({"extension": "ops", "operation": "restore", "group": "web"}, 404, "E8127",
         "its operations: snap"),
        ({"extension": "ops", "operation": "snap", "machine": "ghost"}, 404, "E3002",
         "ghost"),
        ({"extension": "ops", "operation": "snap", "group": "bad group!"}, 422, "E3003",
         "Invalid group name"),
    ]
    for change, status, code, text in cases:
        response = await hub.api("POST", "/v1/schedules", json={**base, **change})
        body = response.json()
        assert response.status_code == status and body["code"] == code, (change, body)
        assert text in body["message"], (change, body)
    assert await hub.ok("GET", "/v1/schedules") == []
    # A runbook's schedule is as it was: its kind and target say so.
    made = await hub.ok("POST", "/v1/schedules", json={**base, "runbook": "noop",
                                                        "group": "web"})
    assert (made["kind"], made["target_kind"], made["target"], made["extension"]) == (
        "runbook", "group", "web", None)
    assert "latest_operations" not in made and made["runs"] == []
