"""Fast tier: module packages and deployments on the hub: publishing, pinning, resolution by
priority, the heartbeat's deployment etag (held, no statement per heartbeat), what agents
fetch and report, why a machine has no deployment, bad input, and accounts kept apart."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event

from tests.deploybuild import manifest_yaml, module_package
from tests.inproc import FAST, InprocHub, Machine, running_hub

pytestmark = FAST
GZIP = {"Content-Type": "application/gzip"}


async def publish(hub: InprocHub, name: str = "sensor", version: str = "1.0.0",
                  token: str | None = None, **kw: Any) -> dict[str, Any]:
    made = await hub.api("POST", "/v1/modules", token=token, headers=GZIP,
                         content=module_package(name, version, **kw))
    assert made.status_code == 201, made.text
    info: dict[str, Any] = made.json()
    return info


async def create(hub: InprocHub, name: str, text: str | None = None, *,
                 token: str | None = None, **target: Any) -> Any:
    return await hub.api("POST", "/v1/deployments", token=token, json={
        "name": name, "manifest": text if text is not None else manifest_yaml(),
        **(target or {"group": "web"})})


async def etag(machine: Machine) -> str:
    return str((await machine.heartbeat())["deployment_etag"])


async def test_publish_is_immutable_and_listed_newest_first(fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    first = await publish(hub, "sensor", "1.0.0")
    assert first["sha256"] == hashlib.sha256(module_package("sensor", "1.0.0")).hexdigest()
    again = await hub.api("POST", "/v1/modules", headers=GZIP,
                          content=module_package("sensor", "1.0.0"))
    assert again.status_code == 200 and again.json()["sha256"] == first["sha256"]
    other = await hub.api("POST", "/v1/modules", headers=GZIP,
                          content=module_package("sensor", "1.0.0", content=b"#!/bin/sh\n"))
    assert other.status_code == 409 and other.json()["code"] == "E9151", other.text
    await publish(hub, "sensor", "1.10.0")
    await publish(hub, "sensor", "1.9.0")
    listed = await hub.ok("GET", "/v1/modules")
    assert [(r["name"], r["version"]) for r in listed] == [
        ("sensor", "1.9.0"), ("sensor", "1.10.0"), ("sensor", "1.0.0")]
    versions = await hub.ok("GET", "/v1/modules/sensor")
    assert versions["newest"] == "1.10.0"
    assert [v["version"] for v in versions["versions"]] == ["1.10.0", "1.9.0", "1.0.0"]
    missing = await hub.api("GET", "/v1/modules/nope")
    assert missing.status_code == 404 and missing.json()["code"] == "E9152"
    bad = await hub.api("POST", "/v1/modules", headers=GZIP, content=b"not a tar")
    assert bad.status_code == 422 and bad.json()["code"] == "E9000", bad.text
    wrong_type = await hub.api("POST", "/v1/modules", headers={"Content-Type": "text/plain"},
                               content=module_package())
    assert wrong_type.status_code == 422 and wrong_type.json()["code"] == "E3003"


async def test_create_pins_packages_and_refuses_bad_manifests_naming_line_and_column(
        fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    await hub.machine("m1", "web")
    old = await publish(hub, "sensor", "1.0.0")
    new = await publish(hub, "sensor", "1.2.0")
    made = await create(hub, "edge", manifest_yaml(version=None))
    assert made.status_code == 200, made.text
    body = made.json()
    assert (body["version"], body["created"], body["target"]) == (1, True, "web")
    assert body["manifest"]["modules"]["sensor"]["package"] == {
        "name": "sensor", "version": "1.2.0", "sha256": new["sha256"]}
    again = (await create(hub, "edge", manifest_yaml(version="1.0.0"))).json()
    assert (again["version"], again["created"]) == (2, False)
    assert again["manifest"]["modules"]["sensor"]["package"]["sha256"] == old["sha256"]

    tabbed = await create(hub, "bad", "modules:\n\tsensor: {}\n")
    assert tabbed.status_code == 422 and tabbed.json()["code"] == "E9150", tabbed.text
    assert tabbed.json()["details"]["problems"][0]["line"] == 2
    two = await create(hub, "bad", manifest_yaml().replace('order: 1', 'order: -1')
                       .replace('RATE: "5"', "1BAD: x"))
    assert two.status_code == 422, two.text
    problems = two.json()["details"]["problems"]
    assert {(p["field"], p["line"]) for p in problems} == {
        ("modules.sensor.env", 8), ("modules.filter.order", 11)}, problems
    assert all(p["column"] for p in problems)
    route = await create(hub, "bad", manifest_yaml().replace("outputs/*", "outputs/* WHERE"))
    assert route.status_code == 422 and "line 13" in route.json()["message"], route.text

    unknown = await create(hub, "bad", manifest_yaml(package="nosuch"))
    assert unknown.status_code == 422 and unknown.json()["code"] == "E9153", unknown.text
    assert "nosuch 1.0.0" in unknown.json()["message"]
    assert "line 6" in unknown.json()["message"]
    no_version = await create(hub, "bad", manifest_yaml(version="3.0.0"))
    assert no_version.status_code == 422 and "1.0.0, 1.2.0" in no_version.json()["message"]
    for target, code in (({"group": "nope"}, "E9155"), ({"machine": "nope"}, "E9155")):
        refused = await create(hub, "bad", **target)
        assert refused.status_code == 404 and refused.json()["code"] == code, refused.text
    for body in ({"name": "x", "manifest": "{}"},
                 {"name": "x", "manifest": "{}", "group": "web", "machine": "m1"},
                 {"name": "Bad Name", "manifest": "{}", "group": "web"},
                 {"name": "x", "manifest": "{}", "group": "web", "priority": -1},
                 {"name": "x", "manifest": 5, "group": "web"}):
        refused = await hub.api("POST", "/v1/deployments", json=body)
        assert refused.status_code in (400, 422), (body, refused.text)
        assert refused.json()["code"].startswith("E"), refused.text
    assert [d["name"] for d in await hub.ok("GET", "/v1/deployments")] == ["edge"]
    schema = await hub.ok("GET", "/v1/deployments/schema")
    assert "modules" in schema["properties"]


async def test_the_highest_priority_wins_then_the_most_recently_updated(
        fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    m1, m2 = await hub.machine("m1", "web"), await hub.machine("m2", "web")
    db1 = await hub.machine("db1", "db")
    await publish(hub)
    assert (await create(hub, "base", group="web")).status_code == 200
    assert (await create(hub, "special", machine="m2")).status_code == 200  # newer, same 0
    docs = {m.name: await m.ok("GET", "/v1/agent/deployment") for m in (m1, m2, db1)}
    assert (docs["m1"]["deployment"], docs["m2"]["deployment"]) == ("base", "special")
    assert docs["db1"] == {"etag": "", "deployment": None, "version": 0, "manifest": None}
    assert docs["m1"]["manifest"]["modules"]["sensor"]["package"]["sha256"]
    assert docs["m1"]["etag"] == await etag(m1) and await etag(db1) == ""

    high = await hub.api("POST", "/v1/deployments", json={
        "name": "base", "manifest": manifest_yaml(), "group": "web", "priority": 5})
    assert high.status_code == 200
    assert (await m2.ok("GET", "/v1/agent/deployment"))["deployment"] == "base"
    shown = await hub.ok("GET", "/v1/deployments/special")
    assert shown["machines"] == [{"machine": "m2", "machine_id": m2.id, "group": "web",
                                  "applied": False, "winner": "base",
                                  "winner_priority": 5}]
    assert shown["source"] == manifest_yaml()
    listed = {d["name"]: d for d in await hub.ok("GET", "/v1/deployments")}
    assert (listed["base"]["machines"], listed["base"]["applied"]) == (2, 2)
    assert (listed["special"]["machines"], listed["special"]["applied"]) == (1, 0)

    before = await etag(m1)
    assert (await hub.ok("DELETE", "/v1/deployments/base")) == {"name": "base",
                                                                "deleted": True}
    assert await etag(m1) == "" and before
    assert (await m2.ok("GET", "/v1/agent/deployment"))["deployment"] == "special"
    gone = await hub.api("GET", "/v1/deployments/base")
    assert gone.status_code == 404 and gone.json()["code"] == "E9154"
    assert (await hub.api("DELETE", "/v1/deployments/base")).status_code == 404


async def test_heartbeats_make_no_statement_while_deployments_are_held(
        fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    machines = [await hub.machine(f"m{i}", "web") for i in range(3)]
    await publish(hub)
    assert (await create(hub, "edge")).status_code == 200
    first = await etag(machines[0])  # read once here
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    engine = hub.hub.engine.sync_engine
    event.listen(engine, "before_cursor_execute", seen)
    try:
        loads = hub.hub.deployments.cache.loads
        tags = {await etag(m) for m in machines for _ in range(3)}
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert tags == {first} and first
    assert hub.hub.deployments.cache.loads == loads
    assert [s for s in statements if "deployments" in s or "module_" in s] == []
    # A change drops what is held, in its transaction: the next heartbeat sees it.
    assert (await create(hub, "edge")).status_code == 200
    assert await etag(machines[0]) not in ("", first)


async def test_packages_only_of_the_machines_deployment_and_reports_in_rollout(
        fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    m1, db1 = await hub.machine("m1", "web"), await hub.machine("db1", "db")
    info = await publish(hub)
    await publish(hub, "other", "1.0.0")
    assert (await create(hub, "edge")).status_code == 200

    got = await m1.call("GET", "/v1/agent/modules/sensor/1.0.0/package")
    assert got.status_code == 200 and got.headers["X-Outpost-Sha256"] == info["sha256"]
    assert hashlib.sha256(got.content).hexdigest() == info["sha256"]
    reads = hub.hub.deployments.package_reads
    assert (await m1.call("GET", "/v1/agent/modules/sensor/1.0.0/package")).status_code == 200
    assert hub.hub.deployments.package_reads == reads  # held by sha256
    for machine, path in ((m1, "other/1.0.0"), (m1, "sensor/9.9.9"), (db1, "sensor/1.0.0")):
        refused = await machine.call("GET", f"/v1/agent/modules/{path}/package")
        assert refused.status_code == 403, refused.text
        assert refused.json()["code"] == "E9156"
        assert "published in this account" in refused.json()["message"]

    rollout = await hub.ok("GET", "/v1/deployments/edge/rollout")
    assert [(r["machine"], r["status"], r["desired_version"]) for r in rollout["machines"]] \
        == [("m1", "pending", 1)] and rollout["complete"] is False
    shown = (await hub.ok("GET", "/v1/machines/m1"))["deployment"]
    assert shown["reason"]["code"] == "E9159"  # packages fetched, not the deployment
    now = time.time()
    report = {"deployment": "edge", "version": 1, "etag": await etag(m1), "reported_at": now,
              "modules": [
                  {"name": "sensor", "state": "running", "pid": 10, "restart_count": 0,
                   "last_start_at": now - 5, "version": "1.0.0"},
                  {"name": "filter", "state": "backoff", "exit_code": 1, "restart_count": 3,
                   "last_exit_at": now - 1, "next_try_at": now + 20,
                   "reason": "exited with status 1"}]}
    sent = await m1.call("POST", "/v1/agent/modules/report", report)
    assert sent.status_code == 204, sent.text
    older = {**report, "reported_at": now - 60, "modules": []}
    assert (await m1.call("POST", "/v1/agent/modules/report", older)).status_code == 204
    rollout = await hub.ok("GET", "/v1/deployments/edge/rollout")
    row = rollout["machines"][0]
    assert (row["status"], row["reported_version"]) == ("failing", 1)
    assert [(m["name"], m["state"], m["exit_code"], m["restart_count"]) for m in
            row["modules"]] == [("sensor", "running", None, 0), ("filter", "backoff", 1, 3)]
    report["modules"][1].update(state="running", exit_code=None)
    report["reported_at"] = now + 1
    assert (await m1.call("POST", "/v1/agent/modules/report", report)).status_code == 204
    rollout = await hub.ok("GET", "/v1/deployments/edge/rollout")
    assert rollout["complete"] is True and rollout["machines"][0]["status"] == "applied"
    shown = (await hub.ok("GET", "/v1/machines/m1"))["deployment"]
    assert (shown["name"], shown["reported_version"], shown["modules"], shown["reason"]) == (
        "edge", 1, {"running": 2}, None)
    bad = await m1.call("POST", "/v1/agent/modules/report", {"reported_at": "soon"})
    assert bad.status_code in (400, 422) and bad.json()["code"].startswith("E")


async def test_why_a_machine_has_no_deployment(fast_hub: InprocHub) -> None:
    hub = fast_hub
    m1 = await hub.machine("m1", "web")
    none = (await hub.ok("GET", "/v1/machines/m1"))["deployment"]
    assert (none["name"], none["reason"]["code"]) == (None, "E9158")
    assert none["reason"]["message"] == "No deployment targets this machine."
    await publish(hub)
    assert (await create(hub, "edge")).status_code == 200
    never = (await hub.ok("GET", "/v1/machines/m1"))["deployment"]
    assert (never["name"], never["reason"]["code"]) == ("edge", "E9159")
    await m1.ok("GET", "/v1/agent/deployment")
    fetched = (await hub.ok("GET", "/v1/machines/m1"))["deployment"]
    assert fetched["reason"]["code"] == "E9160"
    assert "last fetched its deployment" in fetched["reason"]["message"]
    failed = {"deployment": "edge", "version": 1, "reported_at": time.time(),
              "error": "E9170 the package could not be fetched (403)"}
    assert (await m1.call("POST", "/v1/agent/modules/report", failed)).status_code == 204
    shown = (await hub.ok("GET", "/v1/machines/m1"))["deployment"]
    assert shown["reason"]["code"] == "E9161" and "403" in shown["reason"]["message"]


async def test_another_accounts_deployments_machines_and_packages_are_not_found(
        fast_hub: InprocHub) -> None:
    hub = fast_hub
    other = await hub.ok("POST", "/v1/accounts", json={"name": "other"})
    theirs = other["token"]
    await hub.machine("m1", "web")
    mine_info = await publish(hub)
    assert (await create(hub, "edge")).status_code == 200
    foreign = await hub.machine("f1", "web", account=other)
    for path in ("/v1/deployments/edge", "/v1/deployments/edge/rollout",
                 "/v1/modules/sensor"):
        seen = await hub.api("GET", path, token=theirs)
        assert seen.status_code == 404, (path, seen.text)
    assert await hub.ok("GET", "/v1/deployments", token=theirs) == []
    assert await hub.ok("GET", "/v1/modules", token=theirs) == []
    assert (await hub.api("DELETE", "/v1/deployments/edge", token=theirs)).status_code == 404
    aimed = await create(hub, "mine", machine="m1", token=theirs)
    assert aimed.status_code == 404 and aimed.json()["code"] == "E9155"
    unknown = await create(hub, "mine", group="web", token=theirs)
    assert unknown.status_code == 422 and unknown.json()["code"] == "E9153"
    assert (await foreign.ok("GET", "/v1/agent/deployment"))["deployment"] is None
    stolen = await foreign.call("GET", "/v1/agent/modules/sensor/1.0.0/package")
    assert stolen.status_code == 403 and mine_info["sha256"] not in stolen.text
    # The same bytes published in the other account are theirs to deploy.
    await publish(hub, token=theirs)
    assert (await create(hub, "mine", group="web", token=theirs)).status_code == 200
    assert (await foreign.ok("GET", "/v1/agent/deployment"))["deployment"] == "mine"


async def test_a_change_on_one_replica_reaches_the_others_heartbeats(
        tmp_path: Path, postgres_url: str, anyio_backend: str) -> None:
    # Two replicas in this process on one PostgreSQL database: the invalidation sent in the
    # change's transaction drops replica b's held deployments well within their TTL.
    async with running_hub(tmp_path / "a", postgres_url) as a, \
            running_hub(tmp_path / "b", postgres_url) as b:
        await publish(a)
        on_a = await a.machine("m1", "web")
        on_b = Machine(b, on_a.id, on_a.name, on_a.group, on_a.key)
        assert await etag(on_b) == ""  # b now holds the account's (no) deployments

        async def changes(old: str) -> tuple[str, float]:
            started = time.monotonic()
            while time.monotonic() - started < 5:
                now = await etag(on_b)
                if now != old:
                    return now, time.monotonic() - started
                await asyncio.sleep(0.02)
            raise AssertionError(f"the etag stayed {old!r}")

        assert (await create(a, "edge")).status_code == 200
        first, took = await changes("")
        assert took < b.hub.deployments.cache.TTL / 10 and first == await etag(on_a)
        assert (await create(a, "edge")).status_code == 200  # replaced: version 2
        second, _ = await changes(first)
        assert (await on_b.ok("GET", "/v1/agent/deployment"))["version"] == 2
        await a.ok("DELETE", "/v1/deployments/edge")
        assert (await changes(second))[0] == ""
