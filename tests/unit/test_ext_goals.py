"""Fast tier: extension goals per group and machine, what each agent is told (its goals,
the heartbeat's etag, the packages), protected settings, status reports and retries."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from nacl.exceptions import CryptoError
from nacl.public import SealedBox
from nacl.signing import SigningKey
from sqlalchemy import event

from tests.extbuild import manifest, package
from tests.inproc import FAST, InprocHub, Machine

pytestmark = FAST
GZIP = {"Content-Type": "application/gzip"}
SCHEMA = {"type": "object", "properties": {"port": {"type": "integer", "minimum": 1}},
          "required": ["port"], "additionalProperties": False}
PROTECTED_SCHEMA = {"type": "object", "properties": {
    "password": {"type": "string", "minLength": 12}}}


async def publish(hub: InprocHub, name: str = "hello", version: str = "1.0.0",
                  token: str | None = None, **extra: Any) -> dict[str, Any]:
    made = await hub.api("POST", "/v1/extensions", token=token, headers=GZIP,
                         content=package(manifest(name, version, **extra)))
    assert made.status_code == 201, made.text
    info: dict[str, Any] = made.json()
    return info


def target(name: str, kind: str, where: str) -> str:
    return f"/v1/extensions/{name}/targets/{kind}/{where}"


async def put(hub: InprocHub, path: str, token: str | None = None,
              **body: Any) -> httpx.Response:
    return await hub.api("PUT", path, token=token, json=body)


async def goals(machine: Machine) -> dict[str, Any]:
    answer: dict[str, Any] = await machine.ok("GET", "/v1/agent/extensions")
    return answer


async def etag(machine: Machine) -> str:
    return str((await machine.heartbeat())["extensions_etag"])


def opened(key: SigningKey, sealed: str) -> Any:
    box = SealedBox(key.to_curve25519_private_key())
    return json.loads(box.decrypt(base64.b64decode(sealed)))


async def test_a_machine_goal_overrides_its_group_and_none_follows_the_newest(
        fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    first = await publish(hub, "hello", "1.0.0")
    m1, m2 = await hub.machine("m1", "web"), await hub.machine("m2", "web")
    db1 = await hub.machine("db1", "db")
    saved = await put(hub, target("hello", "group", "web"), settings={"greeting": "hi"})
    assert saved.status_code == 200, saved.text
    assert (saved.json()["created"], saved.json()["resolved_version"]) == (True, "1.0.0")
    own = await put(hub, target("hello", "machine", "m2"), version="1.0.0",
                    settings={"greeting": "own"}, run_as="backup", enabled=False)
    assert own.status_code == 200, own.text

    one = (await goals(m1))["goals"]
    assert [(g["name"], g["version"], g["sha256"], g["settings"], g["enabled"])
            for g in one] == [("hello", "1.0.0", first["sha256"], {"greeting": "hi"}, True)]
    two = (await goals(m2))["goals"]
    assert [(g["version"], g["settings"], g["enabled"], g["run_as"]) for g in two] == [
        ("1.0.0", {"greeting": "own"}, False, "backup")]
    assert await goals(db1) == {"etag": "", "goals": []}
    assert two[0]["seq"] > one[0]["seq"]

    newer = await publish(hub, "hello", "1.2.0")  # the group's goal follows; m2's is pinned
    assert [(g["version"], g["sha256"]) for g in (await goals(m1))["goals"]] == [
        ("1.2.0", newer["sha256"])]
    assert [g["version"] for g in (await goals(m2))["goals"]] == ["1.0.0"]

    removed = await hub.api("DELETE", target("hello", "machine", "m2"))
    assert removed.json() == {"name": "hello", "target_kind": "machine", "target": "m2",
                              "removed": True}
    assert [(g["version"], g["settings"]) for g in (await goals(m2))["goals"]] == [
        ("1.2.0", {"greeting": "hi"})]
    await hub.ok("DELETE", target("hello", "group", "web"))
    assert await goals(m1) == {"etag": "", "goals": []}


async def test_the_etag_changes_with_set_remove_and_retry_and_not_otherwise(
        fast_hub: InprocHub) -> None:
    hub = fast_hub
    m1 = await hub.machine("m1", "web")
    await hub.machine("db1", "db")
    assert await etag(m1) == ""
    await publish(hub)
    assert await etag(m1) == ""  # published, not wanted
    await hub.ok("PUT", target("hello", "group", "web"), json={})
    first = await etag(m1)
    assert first and first == (await goals(m1))["etag"]
    assert await etag(m1) == first
    await hub.ok("PUT", target("hello", "group", "db"), json={})  # another group's goal
    report = await m1.call("POST", "/v1/agent/extensions/status", {"extensions": [
        {"name": "hello", "version": "1.0.0", "state": "Ready", "changed_at": time.time()}]})
    assert report.status_code == 204, report.text
    assert await etag(m1) == first

    await hub.ok("PUT", target("hello", "group", "web"), json={"settings": {"a": 1}})
    changed = await etag(m1)
    assert changed not in ("", first)
    retried = await hub.ok("POST", "/v1/machines/m1/extensions/hello/retry")
    assert retried["retry"] == 1
    after_retry = await etag(m1)
    assert after_retry not in (first, changed)
    assert (await goals(m1))["goals"][0]["retry"] == 1
    await hub.ok("DELETE", target("hello", "group", "web"))
    assert await etag(m1) == ""


async def test_heartbeats_read_no_goals_while_they_are_held(fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    await publish(hub)
    machines = [await hub.machine(f"m{i}", "web") for i in range(3)]
    await hub.ok("PUT", target("hello", "group", "web"), json={})
    await etag(machines[0])  # the account's goals are read here, once
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    engine = hub.hub.engine.sync_engine
    event.listen(engine, "before_cursor_execute", seen)
    try:
        loads = hub.hub.extensions.cache.loads
        tags = {await etag(m) for m in machines for _ in range(3)}
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert len(tags) == 1 and "" not in tags
    assert hub.hub.extensions.cache.loads == loads
    # The operations' periodic pass (hub/extension_ops.py) reads extension_operations, the
    # scheduler schedules (which name an extension), and the recovery pass protections
    # (hub/recovery.py), on their own clocks meanwhile; none is a heartbeat's read.
    background = ("FROM extension_operations", "FROM schedules", "FROM protections")
    assert [s for s in statements
            if "extension" in s and not any(b in s for b in background)] == []


async def test_protected_settings_open_only_with_the_machines_key_and_are_sealed_at_rest(
        fast_hub_any: InprocHub, caplog: pytest.LogCaptureFixture) -> None:
    hub = fast_hub_any
    caplog.set_level(logging.DEBUG)
    secret = {"password": "correct horse battery staple"}
    await publish(hub, protected_settings_schema=PROTECTED_SCHEMA)
    m1, m2 = await hub.machine("m1", "web"), await hub.machine("m2", "web")
    saved = await put(hub, target("hello", "group", "web"), protected_settings=secret,
                      settings={"public": "yes"})
    assert saved.status_code == 200, saved.text
    assert "correct horse" not in saved.text and saved.json()["protected"] is True

    sealed1 = (await goals(m1))["goals"][0]["protected"]
    sealed2 = (await goals(m2))["goals"][0]["protected"]
    assert opened(m1.key, sealed1) == secret and opened(m2.key, sealed2) == secret
    with pytest.raises(CryptoError):
        opened(m2.key, sealed1)
    with pytest.raises(CryptoError):
        opened(SigningKey.generate(), sealed1)

    async with hub.hub.engine.connect() as conn:
        rows = (await conn.execute(sa.text(
            "SELECT settings, protected FROM extension_goals"))).all()
    assert len(rows) == 1 and rows[0][1]
    assert "correct horse" not in repr(rows) and "correct horse" not in rows[0][1]
    shown = await hub.api("GET", "/v1/extensions/hello")
    assert "correct horse" not in shown.text
    assert shown.json()["goals"][0]["protected"] is True

    # Changing only the version or a public setting keeps them.
    await hub.ok("PUT", target("hello", "group", "web"), json={"settings": {"public": "no"}})
    assert opened(m1.key, (await goals(m1))["goals"][0]["protected"]) == secret
    await hub.ok("PUT", target("hello", "group", "web"), json={"protected_settings": None})
    assert (await goals(m1))["goals"][0]["protected"] is None
    assert "correct horse" not in caplog.text


async def test_settings_against_the_schema_name_the_field_and_never_quote_a_secret(
        fast_hub: InprocHub) -> None:
    hub = fast_hub
    await publish(hub, settings_schema=SCHEMA, protected_settings_schema=PROTECTED_SCHEMA)
    await hub.machine("m1", "web")
    path = target("hello", "group", "web")
    for settings, named in (({"port": "x"}, "settings.port: 'x' is not of type 'integer'"),
                            ({}, "settings: 'port' is a required property"),
                            ({"port": 0}, "settings.port: 0 is less than the minimum of 1"),
                            ({"port": 1, "other": 2}, "settings: Additional properties")):
        refused = await put(hub, path, settings=settings)
        assert refused.status_code == 422, refused.text
        body = refused.json()
        assert body["code"] == "E9006" and named in body["message"], body
    refused = await put(hub, path, settings={"port": 8080},
                        protected_settings={"password": "too-short"})
    assert refused.status_code == 422 and refused.json()["code"] == "E9006"
    assert "protected_settings.password: does not satisfy 'minLength' (12)" in \
        refused.json()["message"]
    assert "too-short" not in refused.text
    assert (await hub.ok("GET", "/v1/extensions/hello"))["goals"] == []
    assert (await put(hub, path, settings={"port": 8080})).status_code == 200


async def test_unknown_targets_versions_and_goals_are_refused(fast_hub: InprocHub) -> None:
    hub = fast_hub
    await hub.machine("m1", "web")
    nothing = await put(hub, target("hello", "group", "web"))
    assert (nothing.status_code, nothing.json()["code"]) == (404, "E9004")
    await publish(hub)
    for path, body, code in (
            (target("hello", "group", "nosuch"), {}, "E9007"),
            (target("hello", "machine", "nosuch"), {}, "E9007"),
            (target("hello", "group", "web"), {"version": "9.9"}, "E9005")):
        refused = await put(hub, path, **body)
        assert (refused.status_code, refused.json()["code"]) == (404, code), refused.text
    kind = await put(hub, target("hello", "rack", "web"))
    assert kind.status_code == 422, kind.text
    gone = await hub.api("DELETE", target("hello", "group", "web"))
    assert (gone.status_code, gone.json()["code"]) == (404, "E9008")
    retry = await hub.api("POST", "/v1/machines/m1/extensions/hello/retry")
    assert (retry.status_code, retry.json()["code"]) == (404, "E9008")
    user = await put(hub, target("hello", "group", "web"), run_as="Root; rm")
    assert (user.status_code, user.json()["code"]) == (422, "E3003")


async def test_a_goal_by_machine_id_is_stored_under_its_name(fast_hub: InprocHub) -> None:
    hub = fast_hub
    await publish(hub)
    m1 = await hub.machine("m1", "web")
    saved = await hub.ok("PUT", target("hello", "machine", m1.id), json={})
    assert saved["target"] == "m1"
    assert (await hub.ok("DELETE", target("hello", "machine", m1.id)))["target"] == "m1"


async def test_a_package_goes_only_to_machines_whose_goals_name_it(
        fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    info = await publish(hub)
    await publish(hub, "other")
    m1, db1 = await hub.machine("m1", "web"), await hub.machine("db1", "db")
    await hub.ok("PUT", target("hello", "group", "web"), json={})
    got = await m1.call("GET", "/v1/agent/extensions/hello/1.0.0/package")
    assert got.status_code == 200, got.text
    assert got.headers["content-type"] == "application/gzip"
    assert got.headers["x-outpost-sha256"] == info["sha256"]
    assert hashlib.sha256(got.content).hexdigest() == info["sha256"]
    reads = hub.hub.extensions.package_reads
    again = await m1.call("GET", "/v1/agent/extensions/hello/1.0.0/package")
    assert again.content == got.content  # the second machine's download costs no read
    assert hub.hub.extensions.package_reads == reads
    for machine, path in ((db1, "hello/1.0.0"), (m1, "other/1.0.0"), (m1, "hello/2.0.0")):
        refused = await machine.call("GET", f"/v1/agent/extensions/{path}/package")
        assert refused.status_code == 404, refused.text
        assert refused.json()["code"] == "E9009"

    # Another account with its own 'hello' 1.0.0: each machine gets its own account's.
    other = await hub.ok("POST", "/v1/accounts", json={"name": "other"})
    theirs = await hub.api("POST", "/v1/extensions", token=other["token"], headers=GZIP,
                           content=package(manifest("hello", "1.0.0", description="theirs")))
    assert theirs.status_code == 201, theirs.text
    stranger = await hub.machine("s1", "db", account=other)
    refused = await stranger.call("GET", "/v1/agent/extensions/hello/1.0.0/package")
    assert refused.status_code == 404 and refused.json()["code"] == "E9009"
    await hub.ok("PUT", target("hello", "group", "db"), token=other["token"], json={})
    got = await stranger.call("GET", "/v1/agent/extensions/hello/1.0.0/package")
    assert got.headers["x-outpost-sha256"] == theirs.json()["sha256"] != info["sha256"]
    assert (await goals(db1))["goals"] == []  # the other account's goal is not db1's


async def test_status_reports_are_stored_newest_first_and_shown(
        fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    await publish(hub)
    m1, m2 = await hub.machine("m1", "web"), await hub.machine("m2", "web")
    await hub.ok("PUT", target("hello", "group", "web"), json={})
    now = time.time()
    failed = {"name": "hello", "version": None, "target_version": "1.0.0", "state": "Failed",
              "step": "enable", "message": "enable did not finish within 300 s",
              "code": 7, "changed_at": now, "seq": 1, "failed_versions": ["1.0.0"]}
    sent = await m1.call("POST", "/v1/agent/extensions/status", {"extensions": [failed]})
    assert sent.status_code == 204, sent.text
    older = {**failed, "state": "Installing", "step": "install", "changed_at": now - 10}
    assert (await m1.call("POST", "/v1/agent/extensions/status",
                          {"extensions": [older]})).status_code == 204

    rows = await hub.ok("GET", "/v1/extensions/hello/machines")
    assert [(r["machine"], r["goal"], r["desired_version"], r["state"], r["step"],
             r["message"], r["code"], r["failed_versions"]) for r in rows] == [
        ("m1", "group", "1.0.0", "Failed", "enable", "enable did not finish within 300 s",
         7, ["1.0.0"]),
        ("m2", "group", "1.0.0", None, None, "", None, [])]
    assert rows[0]["changed_at"] == pytest.approx(now)
    ready = {**failed, "state": "Ready", "step": None, "message": "", "version": "1.0.0",
             "changed_at": now + 1, "failed_versions": [], "last_ready_version": "1.0.0"}
    await m1.call("POST", "/v1/agent/extensions/status", {"extensions": [ready]})
    mine = await hub.ok("GET", "/v1/machines/m1/extensions")
    assert [(r["name"], r["state"], r["version"], r["last_ready_version"]) for r in mine] == [
        ("hello", "Ready", "1.0.0", "1.0.0")]

    # A goal removed: the machine still shows what it reported, with no goal.
    await hub.ok("DELETE", target("hello", "group", "web"))
    mine = await hub.ok("GET", "/v1/machines/m2/extensions")
    assert mine == []
    mine = await hub.ok("GET", "/v1/machines/m1/extensions")
    assert [(r["goal"], r["desired_version"], r["state"]) for r in mine] == [
        (None, None, "Ready")]
    bad = await m2.call("POST", "/v1/agent/extensions/status", {"extensions": [
        {**failed, "state": "Exploded"}]})
    assert bad.status_code == 422 and "state" in bad.text


async def test_another_account_reaches_none_of_it(fast_hub: InprocHub) -> None:
    hub = fast_hub
    await publish(hub)
    await hub.machine("m1", "web")
    await hub.ok("PUT", target("hello", "group", "web"), json={})
    other = await hub.ok("POST", "/v1/accounts", json={"name": "other"})
    token = other["token"]
    for method, path, code in (
            ("GET", "/v1/extensions/hello", "E9004"),
            ("GET", "/v1/extensions/hello/machines", "E9004"),
            ("PUT", target("hello", "group", "web"), "E9004"),
            ("DELETE", target("hello", "group", "web"), "E9008"),
            ("GET", "/v1/machines/m1/extensions", "E3002"),
            ("POST", "/v1/machines/m1/extensions/hello/retry", "E3002")):
        kw: dict[str, Any] = {"json": {}} if method == "PUT" else {}
        refused = await hub.api(method, path, token=token, **kw)
        assert (refused.status_code, refused.json()["code"]) == (404, code), (path,
                                                                               refused.text)
    await publish(hub, token=token)  # its own 'hello': still not our machine or group
    for kind, where in (("machine", "m1"), ("group", "web")):
        refused = await put(hub, target("hello", kind, where), token=token)
        assert refused.json()["code"] == "E9007", refused.text
    assert len((await hub.ok("GET", "/v1/extensions/hello"))["goals"]) == 1


async def test_a_flush_of_every_cache_drops_the_goals_too(fast_hub: InprocHub) -> None:
    hub = fast_hub
    await publish(hub)
    m1 = await hub.machine("m1", "web")
    await hub.ok("PUT", target("hello", "group", "web"), json={})
    held = await etag(m1)
    loads = hub.hub.extensions.cache.loads
    assert await etag(m1) == held and hub.hub.extensions.cache.loads == loads
    hub.hub.notifier.flush()  # as after the listening connection was lost (notify.py)
    assert await etag(m1) == held
    assert hub.hub.extensions.cache.loads == loads + 1


@pytest.mark.parametrize(("older", "newer"), [
    ("1.9", "1.10"), ("1.0.0-rc1", "1.0.0"), ("1.0", "1.0.1"), ("2", "10.0"),
    ("1.0.0", "1.0.0+build2")])
def test_versions_are_ordered_as_people_read_them(older: str, newer: str) -> None:
    from outpost.hub.extension_goals import version_key

    assert version_key(older) < version_key(newer)
