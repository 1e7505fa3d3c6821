"""The local message hub with real sockets and real module processes (tests/msgmodule.py):
the identity rule (ED-9), routing with conditions and priorities, refusals, store-and-forward
with the hub away, a kill -9 of the process holding the store, and direct calls.

The hub runs on an event loop of its own thread in the test process (so that ``identify``
maps the real pids of the module processes the test starts), or, for the kill -9, in a
process of its own. The only fake is the upstream seam (``send_upstream``): what the hub's
``POST /v1/agent/messages`` would answer.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from outpost.agent import work
from outpost.agent.modules import upstream
from outpost.agent.modules import msghub
from outpost.agent.modules.msghub import MessageHub, socket_path
from outpost.protocol.errors import OutpostError
from outpost.protocol.modreaders import DeploymentManifest, UpstreamAck, UpstreamBatch
from outpost.protocol.modules import load_manifest
from tests.support import wait_until

MODULE = str(Path(__file__).resolve().parents[1] / "msgmodule.py")

MANIFEST = """
modules:
  sensor: {command: [/bin/true]}
  filter: {command: [/bin/true]}
routes:
  hot:
    route: FROM /messages/modules/sensor/outputs/temp WHERE temperature > 30 AND unit = 'C'
      INTO BrokeredEndpoint("/modules/filter/inputs/hot")
    priority: 5
  alarm:
    route: FROM /messages/modules/sensor/outputs/alarm
      INTO BrokeredEndpoint("/modules/filter/inputs/hot")
    priority: 0
  up: FROM /messages/modules/filter/outputs/* INTO $upstream
  brief:
    route: FROM /messages/modules/sensor/outputs/brief INTO $upstream
    ttl_seconds: 1
message_hub:
  max_message_kb: 16
"""


class HubThread:
    """A MessageHub on an event loop in a thread; ``pids`` is what ``identify`` knows."""

    def __init__(self, root: Path, manifest: str = MANIFEST, upstream_fn: Any = None) -> None:
        self.pids: dict[int, str] = {}
        self.modules: list[Module] = []  # closed with the hub, even after a failure
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.path = root / "sock" / "hub.sock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.hub = MessageHub(self.pids.get, root / "state", path=self.path)
        # Checked as the hub checks it, then read as the agent reads it (without pydantic).
        checked, routes = load_manifest(manifest)
        self.hub.configure(DeploymentManifest.read(checked.model_dump(mode="json")), routes)
        if upstream_fn is not None:
            self.hub.set_upstream(upstream_fn, backoff_base=0.05, backoff_cap=0.2)
        self.run(self.hub.start())

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        for module in self.modules:
            module.close()
        self.run(self.hub.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class Module:
    """A module process driven by JSON lines (tests/msgmodule.py)."""

    def __init__(self, hub: HubThread, name: str, *, known: bool = True,
                 args: tuple[str, ...] = ()) -> None:
        env = dict(os.environ, OUTPOST_MODULE_SOCKET=str(hub.path), OUTPOST_MODULE_NAME=name)
        self.proc = subprocess.Popen([sys.executable, MODULE, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        hub.modules.append(self)
        if known:
            hub.pids[self.proc.pid] = name
        self.first = self.line()

    def line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        text = self.proc.stdout.readline()
        assert text, "the module process ended"
        return json.loads(text)  # type: ignore[no-any-return]

    def ask(self, **command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self.line()

    def close(self) -> None:
        if self.proc.returncode is not None and self.proc.stdout is not None \
                and self.proc.stdout.closed:
            return  # closed already
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubThread]:
    running = HubThread(tmp_path)
    yield running
    running.close()


def test_a_process_that_is_not_the_module_it_claims_is_refused_404(
        hub: HubThread, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "outpost.agent.messages")
    foreign = subprocess.run([sys.executable, MODULE, "raw", "sensor", str(hub.path)],
                             capture_output=True, text=True, timeout=30, check=True)
    frames = json.loads(foreign.stdout)
    assert frames == [{"op": "error", "status": 404, "reason": "Module not found"}]
    # The client says so too, and a known process claiming another module's name as well.
    stranger = Module(hub, "sensor", known=False)
    assert stranger.first == {"refused": 404, "reason": "Module not found"}
    impostor = Module(hub, "filter", known=False)
    hub.pids[impostor.proc.pid] = "sensor"
    counters = hub.hub.counters()
    assert counters.rejected_identity == 3
    assert counters.received == 0 and counters.delivered == 0
    assert hub.hub.inboxes.get("filter") is None or not hub.hub.inboxes["filter"].heap
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"process {stranger.proc.pid} " in logged and "'sensor'" in logged
    for module in (stranger, impostor):
        module.close()


def test_a_hello_waits_for_the_adoption_of_modules_at_agent_start(hub: HubThread) -> None:
    """A new agent listens before its supervisor has adopted the modules that outlived the
    last one (they connect again at once): a hello it cannot tell apart yet waits for the
    adoption rather than being refused 404; once adopted it is welcomed."""
    hub.run(_clear(hub.hub.adopted))

    def adopt() -> None:
        hub.pids[hub.modules[-1].proc.pid] = "sensor"
        hub.loop.call_soon_threadsafe(hub.hub.adopted.set)

    timer = threading.Timer(0.5, adopt)
    started = time.monotonic()
    timer.start()
    try:
        sensor = Module(hub, "sensor", known=False)
    finally:
        timer.cancel()
    assert sensor.first == {"ready": True}
    assert time.monotonic() - started >= 0.5  # it waited for the adoption
    assert hub.hub.counters().rejected_identity == 0
    # Once adopted, a process that is not a module is refused at once, as always.
    stranger = Module(hub, "filter", known=False)
    assert stranger.first == {"refused": 404, "reason": "Module not found"}
    sensor.close()
    stranger.close()


async def _clear(event: asyncio.Event) -> None:
    event.clear()


def test_two_modules_exchange_messages_through_a_route_with_a_condition(
        hub: HubThread) -> None:
    sensor = Module(hub, "sensor")
    assert sensor.first == {"ready": True}
    # filter is not connected yet: its input queues, the higher priority (alarm) first.
    hot = {"temperature": 35, "unit": "C"}
    assert sensor.ask(op="send", output="temp", body="first", properties=hot) == {"ok": True}
    assert sensor.ask(op="send", output="temp", body="second", properties=hot) == {"ok": True}
    assert sensor.ask(op="send", output="alarm", body="fire") == {"ok": True}
    # A cold reading, or one in another unit, is filtered by the route's condition: taken,
    # counted, delivered nowhere. An output no route reads at all is refused with why.
    cold = sensor.ask(op="send", output="temp", body="c", properties={"temperature": 20,
                                                                       "unit": "C"})
    assert cold == {"filtered": True}
    assert sensor.ask(op="send", output="temp", body="f", properties={
        "temperature": 95, "unit": "F"}) == {"filtered": True}
    assert sensor.ask(op="send", output="other", body="x") == {
        "status": 404, "reason": "no route takes output other of module sensor"}
    big = sensor.ask(op="send", output="alarm", body="x", repeat=17 * 1024)
    assert big["status"] == 413 and "16 KiB" in big["reason"]
    filt = Module(hub, "filter")
    got = [filt.ask(op="recv", timeout=5) for _ in range(3)]
    assert [m["body"] for m in got] == ["fire", "first", "second"]
    assert got[1] == {"input": "hot", "body": "first", "properties": hot, "module": "sensor",
                      "output": "temp"}
    assert filt.ask(op="recv", timeout=0.3) == {"none": True}
    # Delivered at once while connected.
    assert sensor.ask(op="send", output="temp", body="live", properties=hot) == {"ok": True}
    assert filt.ask(op="recv", timeout=5)["body"] == "live"
    counters = wait_until(lambda: (c := hub.hub.counters()).delivered == 4 and c, 5)
    assert (counters.received, counters.delivered, counters.refused,
            counters.filtered) == (8, 4, 2, 2)
    sensor.close()
    filt.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="an agent that is not root keeps the socket in "
                    "its state directory (modules run as itself)")
def test_the_socket_is_beside_the_state_directory_and_open_to_modules(
        tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    path = socket_path(state)
    try:
        # Beside the state directory, or (its parent being private, as pytest's is) under
        # /var/lib or the temporary directory: a directory others may pass, not list.
        assert path.parent in (tmp_path / "state-messages",
                               Path("/var/lib") / path.parent.name,
                               Path(tempfile.gettempdir()) / path.parent.name)
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o711
        hub = MessageHub(lambda pid: None, state)

        async def listen() -> int:
            await hub.start()
            mode = stat.S_IMODE(path.stat().st_mode)
            await hub.close()
            return mode

        assert asyncio.run(listen()) == 0o666
        os.chmod(path.parent, 0o777)  # others may write it: refused
        with pytest.raises(OutpostError) as caught:
            socket_path(state)
        assert caught.value.code == "E9180"
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


class Upstream:
    """The hub's side of ``POST /v1/agent/messages``: away while ``away`` is set."""

    def __init__(self) -> None:
        self.away = True
        self.batches: list[UpstreamBatch] = []
        self.held: dict[int, UpstreamBatch] = {}

    async def __call__(self, batch: UpstreamBatch) -> UpstreamAck:
        if self.away:
            raise OutpostError("hub_unreachable", "The hub cannot be reached.")
        self.batches.append(batch)
        return UpstreamAck(accepted_through=batch.messages[-1].seq)

    def bodies(self) -> list[str]:
        return [base64.b64decode(m.body).decode() for b in self.batches for m in b.messages]


def test_store_and_forward_keeps_order_while_the_hub_is_away_and_drops_only_the_expired(
        tmp_path: Path) -> None:
    hub_side = Upstream()
    running = HubThread(tmp_path, upstream_fn=hub_side)
    try:
        sensor = Module(running, "sensor")
        filt = Module(running, "filter")
        for i in range(20):
            assert filt.ask(op="send", output="out", body=f"m{i}") == {"ok": True}
            if i == 9:
                for j in range(3):
                    assert sensor.ask(op="send", output="brief", body=f"b{j}") == {"ok": True}
        assert running.hub.counters().upstream_queued == 23
        time.sleep(1.3)  # the brief ones' ttl (1 s) passes while the hub is away
        hub_side.away = False
        wait_until(lambda: len(hub_side.bodies()) >= 20, 15, what="the messages upstream")
        assert hub_side.bodies() == [f"m{i}" for i in range(20)]
        seqs = [m.seq for b in hub_side.batches for m in b.messages]
        assert seqs == sorted(seqs)
        assert sum(b.dropped_expired for b in hub_side.batches) == 3
        counters = wait_until(lambda: (c := running.hub.counters()).upstream_queued == 0 and c,
                              5)
        assert (counters.upstream_sent, counters.upstream_queued, counters.expired) == (20, 0, 3)
        assert not list((tmp_path / "state" / "messages" / "upstream").glob("*.seg"))
        sensor.close()
        filt.close()
    finally:
        running.close()
    # A new store goes on after the last seq the hub accepted.
    store = upstream.Store(tmp_path / "state" / "messages" / "upstream", 1 << 20)
    assert store.next_seq == 24  # after the 20 sent and the 3 expired
    store.close()


def test_a_full_store_refuses_507(tmp_path: Path) -> None:
    manifest = MANIFEST.replace("max_message_kb: 16", "max_message_kb: 300\n  store_max_mb: 1")
    running = HubThread(tmp_path, manifest, upstream_fn=Upstream())
    try:
        filt = Module(running, "filter")
        answers = [filt.ask(op="send", output="out", body="x", repeat=200 * 1024)
                   for _ in range(5)]
        assert answers[:3] == [{"ok": True}] * 3
        assert answers[3] == {"status": 507, "reason": "upstream store full"}
        counters = running.hub.counters()
        assert counters.refused == 2 and counters.upstream_queued == 3
        assert counters.upstream_queued_bytes <= 1 << 20
        filt.close()
    finally:
        running.close()


def test_a_kill_9_of_the_process_holding_the_store_loses_nothing_acked(
        tmp_path: Path) -> None:
    state, path = tmp_path / "state", tmp_path / "hub.sock"
    server = subprocess.Popen([sys.executable, MODULE, "server", str(state), str(path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        assert json.loads(server.stdout.readline()) == {"ready": True}
        env = dict(os.environ, OUTPOST_MODULE_SOCKET=str(path), OUTPOST_MODULE_NAME="sensor")
        module = subprocess.Popen([sys.executable, MODULE], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env)
        assert module.stdin is not None and module.stdout is not None
        assert json.loads(module.stdout.readline()) == {"ready": True}
        module.stdin.write(json.dumps({"op": "flood", "output": "o", "count": 100000}) + "\n")
        module.stdin.flush()
        acked = -1
        while acked < 300:
            acked = json.loads(module.stdout.readline()).get("acked", acked)
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        for line in module.stdout:
            found = json.loads(line)
            if "acked" in found:
                acked = found["acked"]
            if "done" in found or "error" in found:
                break
        module.stdin.close()
        module.wait(10)
        module.stdout.close()
    finally:
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()
    store = upstream.Store(state / "messages" / "upstream", 1 << 30)
    kept: list[str] = []
    while True:
        records, through = store.batch()
        if not records:
            break
        kept += [base64.b64decode(r["body"]).decode() for r in records]
        store.release(through)
    store.close()
    # Everything acked is there, in order (a send in flight at the kill may be there too).
    assert kept[:acked + 1] == [f"m{i}" for i in range(acked + 1)]
    assert len(kept) <= acked + 2


def test_a_direct_call_is_answered_or_times_out(hub: HubThread) -> None:
    filt = Module(hub, "filter")
    assert filt.ask(op="method", name="echo") == {"ok": True}
    assert filt.ask(op="method", name="slow", sleep=3) == {"ok": True}
    assert hub.run(hub.hub.call("filter", "echo", {"a": 1}, 5)) == (200, {"echo": {"a": 1}})
    status, answer = hub.run(hub.hub.call("filter", "nothing", None, 5))
    assert status == 501 and "no method 'nothing'" in answer["error"]
    with pytest.raises(OutpostError) as caught:
        hub.run(hub.hub.call("filter", "slow", None, 0.3))
    assert caught.value.code == "E9183"
    with pytest.raises(OutpostError) as caught:
        hub.run(hub.hub.call("sensor", "echo", None, 1))
    assert caught.value.code == "E9182"
    # Through the agent's work registry, as the hub's long-poll hands it: the built-in
    # module_call kind finds the message hub attached to the daemon's state directory.
    answered: list[tuple[str, Any]] = []

    async def call(method: str, path: str, payload: Any) -> None:
        answered.append((path, payload))

    state, other_state = object(), object()
    msghub.attach(state, hub.hub)
    try:
        for ident, payload, where in (
                ("w1", {"module": "filter", "method": "echo", "payload": [1]}, state),
                ("w2", {"module": "sensor", "method": "echo"}, state),
                ("w3", {"module": "filter", "method": "echo"}, other_state)):
            ctx = work.Context(call=call, jobs={}, state=where,  # type: ignore[arg-type]
                               spawn=lambda coro, name: None, start_job=lambda claim: None)
            hub.run(work.registry.handle(
                {"id": ident, "kind": "module_call", "payload": payload}, ctx))
    finally:
        msghub.detach(state)
    assert answered[0] == ("/v1/agent/work/w1/done",
                           {"result": {"status": 200, "payload": {"echo": [1]}}})
    assert answered[1][1]["result"]["error"]["code"] == "E9182"
    # A daemon that runs no modules has no message hub attached.
    assert answered[2][1]["result"]["error"]["code"] == "E9182"
    assert "runs no modules" in answered[2][1]["result"]["error"]["message"]
    filt.close()


def test_a_module_connects_again_when_the_agent_restarts(tmp_path: Path) -> None:
    first = HubThread(tmp_path)
    sensor = Module(first, "sensor")
    first.modules.remove(sensor)  # it outlives the first agent
    hot = {"temperature": 35, "unit": "C"}
    try:
        assert sensor.ask(op="send", output="temp", body="before", properties=hot) == {
            "ok": True}
    finally:
        first.close()
    second = HubThread(tmp_path)
    second.pids.update(first.pids)
    second.modules.append(sensor)
    try:
        # The send waits for the new agent (the client connects again with a backoff).
        assert sensor.ask(op="send", output="temp", body="after", properties=hot) == {
            "ok": True}
        assert second.hub.counters().received == 1
        filt = Module(second, "filter")
        # The filter's inbox outlived the first agent on disk: "before", then "after".
        assert filt.ask(op="recv", timeout=5)["body"] == "before"
        assert filt.ask(op="recv", timeout=5)["body"] == "after"
        assert filt.ask(op="recv", timeout=0.3) == {"none": True}
        filt.close()
        sensor.close()
    finally:
        second.close()


def test_the_asyncio_client_sends_receives_and_answers_calls(hub: HubThread) -> None:
    filt = Module(hub, "filter", args=("aio",))
    assert filt.first == {"ready": True}
    assert hub.hub.counters().upstream_queued == 1  # its send, taken by the route "up"
    assert hub.run(hub.hub.call("filter", "echo", "hi", 5)) == (200, {"echo": "hi"})
    sensor = Module(hub, "sensor")
    assert sensor.ask(op="send", output="alarm", body="fire") == {"ok": True}
    assert filt.line() == {"input": "hot", "body": "fire"}
    sensor.close()
    filt.close()
