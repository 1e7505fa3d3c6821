"""Upstream messages at the hub, in the fast tier: batches stored once, order, reading with
filters and the long-poll, retention, and direct calls of a module's method."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import pytest

from outpost.hub import messages
from outpost.hub.config import MessagesSettings
from tests.inproc import FAST, InprocHub, Machine

pytestmark = FAST


def batch(seqs: list[int], module: str = "sensor", output: str = "temp",
          dropped: int = 0, body: bytes | None = None) -> dict[str, Any]:
    return {"messages": [{
        "seq": seq, "module": module, "output": output, "properties": {"n": str(seq)},
        "content_type": "text/plain", "message_id": f"m{seq}",
        "body": base64.b64encode(body if body is not None else f"reading {seq}".encode())
        .decode(), "created_at": time.time()} for seq in seqs], "dropped_expired": dropped}


async def post(machine: Machine, payload: dict[str, Any]) -> int:
    answer = await machine.ok("POST", "/v1/agent/messages", payload)
    return int(answer["accepted_through"])


async def test_a_batch_sent_twice_is_stored_once_in_order(fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    m1 = await hub.machine("m1")
    assert await post(m1, batch([0, 1, 2], dropped=3)) == 2
    assert await post(m1, batch([0, 1, 2], dropped=3)) == 2  # the answer was lost: again
    assert await post(m1, batch([1, 2, 3, 4])) == 4  # overlapping
    page = await hub.ok("GET", "/v1/messages?machine=m1&after=0")
    assert [m["seq"] for m in page["messages"]] == [0, 1, 2, 3, 4]
    first = page["messages"][0]
    assert base64.b64decode(first["body"]) == b"reading 0"
    assert first["machine"] == "m1" and first["properties"] == {"n": "0"}
    assert first["content_type"] == "text/plain" and first["message_id"] == "m0"
    assert page["cursor"] == page["messages"][-1]["id"]
    newest = await hub.ok("GET", "/v1/messages?limit=2")
    assert [m["seq"] for m in newest["messages"]] == [4, 3]
    held = (await hub.ok("GET", "/v1/messages?machine=m1&limit=1"))["counters"]
    assert held == {"accepted_through": 4, "dropped_expired": 3}  # the repeat not counted


async def test_bad_batches_are_refused(fast_hub_any: InprocHub) -> None:
    fast_hub = fast_hub_any
    m1 = await fast_hub.machine("m1")
    refused = await m1.call("POST", "/v1/agent/messages", batch([3, 2]))
    assert refused.status_code == 422 and refused.json()["code"] == "E9190", refused.text
    bad = batch([0])
    bad["messages"][0]["body"] = "not base64!"
    refused = await m1.call("POST", "/v1/agent/messages", bad)
    assert refused.status_code == 422 and refused.json()["code"] == "E9190", refused.text
    for field, value in (("seq", 2**63), ("module", "m" * 129), ("message_id", "i" * 256)):
        bad = batch([0])
        bad["messages"][0][field] = value
        refused = await m1.call("POST", "/v1/agent/messages", bad)
        assert refused.status_code == 422 and refused.json()["code"] == "E9190", refused.text
    unsigned = await fast_hub.http.post("/v1/agent/messages", json=batch([0]))
    assert unsigned.status_code == 401
    assert (await fast_hub.ok("GET", "/v1/messages"))["messages"] == []


async def test_filters_and_accounts(fast_hub: InprocHub) -> None:
    hub = fast_hub
    m1, m2 = await hub.machine("m1"), await hub.machine("m2")
    await post(m1, batch([0, 1], module="a"))
    await post(m1, batch([2], module="b"))
    await post(m2, batch([0], module="a"))
    by_module = await hub.ok("GET", "/v1/messages?module=a")
    assert sorted((m["machine"], m["seq"]) for m in by_module["messages"]) == [
        ("m1", 0), ("m1", 1), ("m2", 0)]
    both = await hub.ok("GET", "/v1/messages?machine=m1&module=b")
    assert [(m["machine"], m["seq"]) for m in both["messages"]] == [("m1", 2)]
    unknown = await hub.api("GET", "/v1/messages?machine=nope")
    assert unknown.status_code == 404 and "nope" in unknown.json()["message"]
    # Another account sees none of them, nor m1 by name; its own machine's only.
    other = await hub.ok("POST", "/v1/accounts", json={"name": "other"})
    theirs = await hub.machine("t1", account=other)
    await post(theirs, batch([0], module="theirs"))
    seen = await hub.ok("GET", "/v1/messages", token=other["token"])
    assert [(m["machine"], m["module"]) for m in seen["messages"]] == [("t1", "theirs")]
    hidden = await hub.api("GET", "/v1/messages?machine=m1", token=other["token"])
    assert hidden.status_code == 404
    mine = await hub.ok("GET", "/v1/messages")
    assert "t1" not in {m["machine"] for m in mine["messages"]}
    call = await hub.api("POST", "/v1/machines/m1/modules/a/methods/b", json={},
                         token=other["token"])
    assert call.status_code == 404


async def test_a_long_poll_is_woken_by_a_new_batch(fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    m1 = await hub.machine("m1")
    await post(m1, batch([0]))
    cursor = (await hub.ok("GET", "/v1/messages"))["cursor"]
    started = time.monotonic()
    waiting = asyncio.ensure_future(hub.ok("GET", f"/v1/messages?after={cursor}&wait=20"))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await post(m1, batch([1]))
    page = await asyncio.wait_for(waiting, 10)
    assert [m["seq"] for m in page["messages"]] == [1]
    assert time.monotonic() - started < 5
    # Nothing new: answered empty at the end of the wait, the cursor unchanged.
    empty = await hub.ok("GET", f"/v1/messages?after={page['cursor']}&wait=0.2")
    assert empty == {"messages": [], "cursor": page["cursor"]}


async def test_retention_by_count_and_age(fast_hub: InprocHub) -> None:
    hub = fast_hub
    m1 = await hub.machine("m1")
    await post(m1, batch(list(range(10))))
    engine = hub.hub.engine
    assert await messages.prune(engine, MessagesSettings(max_count=4)) == 6
    page = await hub.ok("GET", "/v1/messages?after=0")
    assert [m["seq"] for m in page["messages"]] == [6, 7, 8, 9]
    assert await messages.prune(engine, MessagesSettings(max_age_seconds=60),
                                now=time.time() + 120) == 4
    assert (await hub.ok("GET", "/v1/messages"))["messages"] == []
    # The machine's seq is kept: a batch sent again after pruning is still not stored.
    assert await post(m1, batch([8, 9])) == 9
    assert (await hub.ok("GET", "/v1/messages"))["messages"] == []


async def _answer_call(machine: Machine, result: dict[str, Any]) -> dict[str, Any]:
    """The machine's agent, by hand: poll for the module call and answer it."""
    for _ in range(100):
        items = [i for i in await machine.poll(capacity=0, wait=1) if i["kind"] == "module_call"]
        if items:
            await machine.ok("POST", f"/v1/agent/work/{items[0]['id']}/done",
                             {"result": result})
            return dict(items[0]["payload"])
    raise AssertionError("no module call came")


async def test_a_direct_call_is_answered_by_the_machine(fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    m1 = await hub.machine("m1")
    answering = asyncio.ensure_future(_answer_call(m1, {"status": 200, "payload": {"x": 2}}))
    answer = await hub.ok("POST", "/v1/machines/m1/modules/sensor/methods/reset",
                          json={"payload": {"hard": True}, "timeout_seconds": 10})
    assert answer == {"status": 200, "payload": {"x": 2}}
    assert await answering == {"module": "sensor", "method": "reset",
                               "payload": {"hard": True}, "timeout_seconds": 10.0}


async def test_a_direct_call_passes_the_agents_error_through(fast_hub: InprocHub) -> None:
    m1 = await fast_hub.machine("m1")
    error = {"code": "E3002", "reason": "not_found", "message": "Module sensor is not "
             "connected.", "fix": "Start it.", "details": {}}
    answering = asyncio.ensure_future(_answer_call(m1, {"error": error}))
    answer = await fast_hub.api("POST", "/v1/machines/m1/modules/sensor/methods/reset",
                                json={"timeout_seconds": 10})
    await answering
    assert answer.status_code == 404 and answer.json()["message"] == error["message"]
    answering = asyncio.ensure_future(_answer_call(m1, {"error": {"message": "odd"}}))
    answer = await fast_hub.api("POST", "/v1/machines/m1/modules/sensor/methods/reset",
                                json={"timeout_seconds": 10})
    await answering
    assert answer.status_code == 502 and answer.json()["code"] == "E9192", answer.text


async def test_a_direct_call_nobody_answers_times_out(fast_hub: InprocHub) -> None:
    await fast_hub.machine("m1")
    started = time.monotonic()
    answer = await fast_hub.api("POST", "/v1/machines/m1/modules/sensor/methods/reset",
                                json={"timeout_seconds": 0.5})
    assert answer.status_code == 504 and answer.json()["code"] == "E9191", answer.text
    assert time.monotonic() - started < 10
    for body in ({"timeout_seconds": 0}, {"timeout_seconds": 301}, {"other": 1}):
        refused = await fast_hub.api("POST", "/v1/machines/m1/modules/a/methods/b", json=body)
        assert refused.status_code == 422, refused.text
    missing = await fast_hub.api("POST", "/v1/machines/nope/modules/a/methods/b", json={})
    assert missing.status_code == 404


@pytest.mark.parametrize("template,want", [
    ("outpost.{machine}.{module}.{output}", "outpost.web_1.temp_sensor.out"),
    ("x.{output}", "x.out")])
def test_subjects_are_single_tokens(template: str, want: str) -> None:
    assert messages.subject_for(template, "web.1", "temp sensor", "out") == want


@pytest.mark.parametrize("forward", [
    {"nats": "http://127.0.0.1:4222"}, {"nats": "nats://127.0.0.1"},
    {"nats": "nats://127.0.0.1:4222", "subject": "a.{host}"},
    {"nats": "nats://127.0.0.1:4222", "subject": "a.>"}, {"nats": "nats://h:1", "x": 1}])
def test_bad_forward_settings_are_refused(forward: dict[str, Any]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        MessagesSettings.model_validate({"forward": forward})
    assert MessagesSettings.model_validate(
        {"forward": {"nats": "nats://127.0.0.1:4222"}}).forward is not None
