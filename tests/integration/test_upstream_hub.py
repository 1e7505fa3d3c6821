"""Upstream messages through a real hub process: forwarding to the real NATS server on
127.0.0.1:4222 (order, headers, an outage resumed from the cursor), ``hub check``, the CLI,
and on PostgreSQL a tail on one replica woken by a batch posted to another."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from tests import mqtt_sub
from tests.nats_sub import Subscriber
from tests.support import (OUTPOST, Hub, clean_env, machine_calls, run_cli, wait_until,
                           zygote)
from tests.tcp_proxy import tcp_proxy


def batch(seqs: range, module: str = "sensor") -> dict[str, Any]:
    return {"messages": [{
        "seq": seq, "module": module, "output": "temp",
        "properties": {"unit": "C", "n": seq}, "content_type": "text/plain",
        "correlation_id": f"c{seq}", "body": base64.b64encode(f"{seq}".encode()).decode(),
        "created_at": time.time()} for seq in seqs]}


def configure(hub: Hub, forward: dict[str, Any]) -> None:
    path = hub.data_dir / "hub.yaml"
    config = yaml.safe_load(path.read_text())
    config["messages"] = {"forward": forward}
    path.write_text(yaml.safe_dump(config))


def check(hub: Hub) -> dict[str, Any]:
    done = run_cli("hub", "check", "--data-dir", str(hub.data_dir), "--database-url",
                   hub.database_url, "--output", "json")
    found = [c for c in json.loads(done.stdout)["checks"] if c["id"] == "message-forwarding"]
    assert found, done.stdout + done.stderr
    return dict(found[0])


def seqs_of(sub: Subscriber) -> list[int]:
    return [int(m.headers["Outpost-Seq"]) for m in sub.messages]


def test_forwarding_to_nats_resumes_from_the_cursor(new_hub: Hub, tmp_path: Path) -> None:
    topic = f"t{uuid.uuid4().hex[:10]}"
    with tcp_proxy(("127.0.0.1", 4222)) as proxy:
        configure(new_hub, {"nats": f"nats://127.0.0.1:{proxy.port}",
                            "subject": topic + ".{machine}.{module}.{output}"})
        hub = new_hub.start()
        sub = Subscriber(f"{topic}.>")
        try:
            call = machine_calls(hub, tmp_path / "m1", "edge.1")
            assert call("POST", "/v1/agent/messages", batch(range(0, 50))) == {
                "accepted_through": 49}
            wait_until(lambda: len(sub.messages) >= 50, 15, 0.05, "50 messages on NATS")
            assert seqs_of(sub) == list(range(50))
            first = sub.messages[0]
            assert first.subject == f"{topic}.edge_1.sensor.temp"
            assert first.body == b"0"
            assert first.headers["unit"] == "C" and first.headers["n"] == "0"
            assert first.headers["Outpost-Machine"] == "edge.1"
            assert first.headers["Correlation-Id"] == "c0"
            assert first.headers["Content-Type"] == "text/plain"
            assert first.headers["Nats-Msg-Id"].endswith(":0")
            assert check(hub)["result"] == "ok"

            # The broker cannot be reached: messages are kept, the failure shows.
            proxy.cut()
            assert call("POST", "/v1/agent/messages", batch(range(50, 120))) == {
                "accepted_through": 119}
            wait_until(lambda: check(hub)["result"] in ("warning", "error"), 20, 0.3,
                       "hub check to see the failing forwarding")
            metrics = hub.api("GET", "/metrics").text
            assert "outpost_messages_forward_up 0.0" in metrics, metrics
            assert len(sub.messages) == 50

            proxy.restore()
            wait_until(lambda: len(set(seqs_of(sub))) >= 120, 30, 0.1,
                       "the rest forwarded once the broker is back")
            got = seqs_of(sub)
            # At least once, in order: a repeat only of what was unconfirmed at the cut.
            assert sorted(set(got)) == list(range(120))
            assert got[:50] == list(range(50))
            deduped = list(dict.fromkeys(got))
            assert deduped == list(range(120))
            wait_until(lambda: check(hub)["result"] == "ok", 10, 0.3, "hub check ok")
            assert "outpost_messages_forward_lag 0.0" in hub.api("GET", "/metrics").text
        finally:
            sub.close()
            hub.stop()

    # A restarted hub forwards only what came after the cursor.
    sub = Subscriber(f"{topic}.>")
    configure(hub, {"nats": "nats://127.0.0.1:4222",
                    "subject": topic + ".{machine}.{module}.{output}"})
    try:
        hub.start()
        call("POST", "/v1/agent/messages", batch(range(120, 125)))
        wait_until(lambda: len(sub.messages) >= 5, 15, 0.05, "the new messages forwarded")
        time.sleep(0.5)
        assert seqs_of(sub) == list(range(120, 125))
    finally:
        sub.close()


def test_forwarding_to_mqtt_keeps_order_and_properties_and_resumes(
        sqlite_hub: Hub, tmp_path: Path) -> None:
    """The same guarantees through an MQTT 5 broker (the real Mosquitto on 1883): QoS 1,
    the cursor moved only by PUBACKs, properties as user properties."""
    topic = f"t{uuid.uuid4().hex[:10]}"
    hub = sqlite_hub
    hub.stop()
    with tcp_proxy(("127.0.0.1", 1883)) as proxy:
        configure(hub, {"mqtt": f"mqtt://127.0.0.1:{proxy.port}",
                        "topic": topic + "/{machine}/{module}/{output}"})
        hub.start()
        sub = mqtt_sub.Subscriber(f"{topic}/#")
        try:
            call = machine_calls(hub, tmp_path / "m1", "edge/1")
            assert call("POST", "/v1/agent/messages", batch(range(0, 40))) == {
                "accepted_through": 39}
            wait_until(lambda: len(sub.messages) >= 40, 15, 0.05, "40 messages on MQTT")
            seqs = [int(m.properties["Outpost-Seq"]) for m in sub.messages]
            assert seqs == list(range(40))
            first = sub.messages[0]
            # '/' in a name would make another topic level: it is replaced.
            assert first.topic == f"{topic}/edge_1/sensor/temp"
            assert first.body == b"0"
            assert first.properties["unit"] == "C" and first.properties["n"] == "0"
            assert first.properties["Outpost-Machine"] == "edge/1"
            assert first.properties["Correlation-Id"] == "c0"
            assert "Nats-Msg-Id" not in first.properties
            state = check(hub)
            assert state["result"] == "ok" and "mqtt://" in json.dumps(state), state

            proxy.cut()
            assert call("POST", "/v1/agent/messages", batch(range(40, 90))) == {
                "accepted_through": 89}
            wait_until(lambda: check(hub)["result"] in ("warning", "error"), 20, 0.3,
                       "hub check to see the failing forwarding")
            assert len(sub.messages) == 40
            proxy.restore()
            wait_until(lambda: len({m.properties["Outpost-Seq"] for m in sub.messages})
                       >= 90, 30, 0.1, "the rest forwarded once the broker is back")
            got = [int(m.properties["Outpost-Seq"]) for m in sub.messages]
            assert list(dict.fromkeys(got)) == list(range(90))  # in order, at least once
            wait_until(lambda: check(hub)["result"] == "ok", 10, 0.3, "hub check ok")
        finally:
            sub.close()


def test_a_forward_setting_names_one_broker(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from outpost.hub.config import MessageForward

    for bad in ({}, {"nats": "nats://127.0.0.1:4222", "mqtt": "mqtt://127.0.0.1:1883"},
                {"mqtt": "tcp://127.0.0.1:1883"}, {"mqtt": "mqtt://h:1883", "topic": "a/#"},
                {"mqtt": "mqtt://h:1883", "topic": "a/{nope}"}):
        try:
            MessageForward.model_validate(bad)
        except ValidationError:
            continue
        raise AssertionError(f"{bad} was taken")
    assert MessageForward(mqtt="mqtt://h:1883").target == "mqtt"
    assert MessageForward(nats="nats://h:4222").url == "nats://h:4222"


def test_cli_tail_follow_and_call(module_hub: Hub, tmp_path: Path) -> None:
    hub = module_hub
    name = f"c{uuid.uuid4().hex[:6]}"
    call = machine_calls(hub, tmp_path / name, name)
    call("POST", "/v1/agent/messages", {"messages": [
        *batch(range(0, 2))["messages"],
        {"seq": 2, "module": "cam", "output": "frame", "properties": {},
         "body": base64.b64encode(b"\x00\xff\x10binary").decode(), "created_at": time.time()},
        {"seq": 3, "module": "cam", "output": "text", "properties": {},
         "body": base64.b64encode(b"\x1b[31mred").decode(), "created_at": time.time()}]})
    shown = hub.cli("messages", "tail", "--machine", name, "--limit", "10")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert len(lines) == 4 and "sensor/temp" in lines[0] and lines[0].endswith("0"), lines
    assert base64.b64encode(b"\x00\xff\x10binary").decode() in lines[2]
    assert "\x1b" not in shown.stdout  # an escape from a module is shown, not obeyed
    only = hub.cli("messages", "tail", "--machine", name, "--module", "cam", "--json")
    assert [m["seq"] for m in json.loads(only.stdout)] == [2, 3]
    unknown = hub.cli("messages", "tail", "--machine", "nope-" + name)
    assert unknown.returncode != 0 and "nope-" + name in unknown.stderr

    # -f: woken by a new batch.
    follow = zygote.spawn([*OUTPOST, "messages", "tail", "--machine", name, "-f",
                           "--limit", "1", "--json", "--hub", hub.url, "--token",
                           hub.admin_token, "--ca-fingerprint", hub.fingerprint],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=clean_env())
    try:
        assert follow.stdout is not None
        first = json.loads(follow.stdout.readline())
        assert first["seq"] == 3
        time.sleep(0.5)  # in its long-poll now
        started = time.monotonic()
        call("POST", "/v1/agent/messages", batch(range(4, 5), module="late"))
        late = json.loads(follow.stdout.readline())
        assert late["seq"] == 4 and late["module"] == "late"
        assert time.monotonic() - started < 10
    finally:
        follow.kill()
        follow.wait()
        if follow.stdout is not None:
            follow.stdout.close()

    timed_out = hub.cli("messages", "call", name, "sensor", "reset", "--timeout", "0.3")
    assert timed_out.returncode != 0 and "E9191" in timed_out.stderr, timed_out.stderr


def test_a_tail_on_one_replica_is_woken_by_a_batch_posted_to_another(
        postgres_url: str, tmp_path: Path) -> None:
    from tests.support import init_hub

    first = init_hub(tmp_path / "hub", postgres_url).start()
    second = first.replica().start()
    try:
        call = machine_calls(first, tmp_path / "m1", "m1", urls=[second.url])
        call("POST", "/v1/agent/messages", batch(range(0, 1)))
        cursor = first.api("GET", "/v1/messages").json()["cursor"]
        import threading

        answer: dict[str, Any] = {}

        def tail() -> None:
            started = time.monotonic()
            got = first.api("GET", f"/v1/messages?after={cursor}&wait=20")
            answer.update(got.json(), took=time.monotonic() - started)

        reader = threading.Thread(target=tail)
        reader.start()
        time.sleep(0.5)
        call("POST", "/v1/agent/messages", batch(range(1, 2)))
        reader.join(20)
        assert [m["seq"] for m in answer["messages"]] == [1]
        assert answer["took"] < 3.0, answer  # woken, not the 5 s recheck
    finally:
        second.stop()
        first.stop()
