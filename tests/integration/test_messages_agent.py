"""Messages end to end: a real hub process, a real agent process that runs the modules of a
deployment made with the CLI, modules on ``outpost.modules.ModuleClient`` (tests/msgmodule.py
driven over TCP), and what the operator sees: ``outpost agent status --json``, the hub's
rollout, ``outpost messages tail`` and ``outpost messages call`` (docs/messages.md)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.nats_sub import Subscriber
from tests.support import Agent, Hub, free_port, registered_agent, run_cli, wait_until
from tests.tcp_proxy import TcpProxy

MSGMODULE = Path(__file__).resolve().parents[1] / "msgmodule.py"
SRC = Path(__file__).resolve().parents[2] / "src"
# The modules run as the unprivileged module user, who may not read the test's interpreter
# (a virtual environment's python may link into root's home): the system's Python 3.11, with
# the client from the source tree (outpost.modules needs only the standard library).
PYTHON = "/usr/bin/python3"


def _nats_up() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 4222), timeout=1).close()
        return True
    except OSError:
        return False


@dataclass
class Module:
    """The test's line to one module process the agent started."""

    port: int
    sock: socket.socket | None = None
    lines: Any = None

    def connect(self, timeout: float = 30) -> Module:
        def up() -> bool:
            try:
                self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
                return True
            except OSError:
                return False
        wait_until(up, timeout, 0.1, f"the module on port {self.port} listening")
        assert self.sock is not None
        self.sock.settimeout(60)
        self.lines = self.sock.makefile("rw")
        ready = json.loads(self.lines.readline())
        assert ready == {"ready": True}, ready
        return self

    def ask(self, **command: Any) -> dict[str, Any]:
        self.lines.write(json.dumps(command) + "\n")
        self.lines.flush()
        answer: dict[str, Any] = json.loads(self.lines.readline())
        return answer

    def read(self) -> dict[str, Any]:
        answer: dict[str, Any] = json.loads(self.lines.readline())
        return answer

    def close(self) -> None:
        if self.sock is not None:
            self.lines.close()
            self.sock.close()
            self.sock = None


@dataclass
class Edge:
    """A registered agent running a deployment of command modules, each a msgmodule."""

    hub: Hub
    agent: Agent
    modules: dict[str, Module] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.agent.name

    def counters(self) -> dict[str, int]:
        status = self.agent.status()
        assert status is not None and status["modules"] is not None, status
        counters: dict[str, int] = status["modules"]["messages"]
        return counters

    def tail(self, *extra: str) -> list[dict[str, Any]]:
        done = self.hub.cli("messages", "tail", "--machine", self.name, "--json", *extra)
        assert done.returncode == 0, done.stdout + done.stderr
        found: list[dict[str, Any]] = json.loads(done.stdout)
        return found

    def bodies(self, limit: int = 1000) -> list[str]:
        import base64

        return [base64.b64decode(m["body"]).decode()
                for m in self.tail("--limit", str(limit))]

    def close(self) -> None:
        for module in self.modules.values():
            module.close()


def deploy(hub: Hub, tmp_path: Path, agents: list[Agent], names: list[str], routes: dict[str, Any],
           message_hub: dict[str, Any] | None = None, via: str | None = None,
           start: bool = True) -> Edge:
    """Register and start an agent (through ``via``, a proxy's URL, when given), create a
    deployment of ``names`` for it with the CLI, and connect to each module once it runs."""
    machine = f"e{uuid.uuid4().hex[:6]}"
    agent = registered_agent(hub, tmp_path, machine,
                             **({"hub_urls": [via]} if via is not None else {}))
    edge = Edge(hub, agent, {n: Module(free_port()) for n in names})
    manifest: dict[str, Any] = {"schema_version": 1, "modules": {
        n: {"command": [PYTHON, str(MSGMODULE), "tcp", str(m.port)],
            "env": {"PYTHONPATH": str(SRC)}, "stop_timeout_seconds": 2}
        for n, m in edge.modules.items()}, "routes": routes}
    if message_hub:
        manifest["message_hub"] = message_hub
    path = tmp_path / f"{machine}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    made = hub.cli("deployment", "create", machine, str(path), "--machine", machine)
    assert made.returncode == 0, made.stdout + made.stderr
    if start:
        agents.append(agent.start())
        try:
            for module in edge.modules.values():
                module.connect()
        except AssertionError as exc:
            logs = {p.name: p.read_text()[-2000:] for p in (
                agent.state_dir / "logs" / "modules").glob("*.log")}
            raise AssertionError(f"{exc}\nagent: {agent.log()[-4000:]}\nmodules: {logs}"
                                 f"\nstatus: {agent.status()}") from None
    return edge


def stop_modules(edge: Edge) -> None:
    """The agent leaves its modules running when it stops (docs/modules.md): end them."""
    status = edge.agent.status()
    pids = [m.get("pid") for m in (status or {}).get("modules", {}).get("modules", [])]
    edge.close()
    edge.agent.stop()
    for pid in pids:
        if pid:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture
def edges() -> Iterator[list[Edge]]:
    made: list[Edge] = []
    try:
        yield made
    finally:
        for edge in made:
            stop_modules(edge)


ROUTES = {
    "hot": 'FROM /messages/modules/sensor/outputs/temp WHERE temperature > 30 '
           'INTO BrokeredEndpoint("/modules/filter/inputs/hot")',
    "up": "FROM /messages/modules/filter/outputs/* INTO $upstream",
}


def test_two_modules_on_a_real_agent_route_filter_refuse_and_count(
        sqlite_hub: Hub, tmp_path: Path, agents: list[Agent], edges: list[Edge]) -> None:
    hub = sqlite_hub
    edge = deploy(hub, tmp_path, agents, ["sensor", "filter"], ROUTES,
                  message_hub={"max_message_kb": 4})
    edges.append(edge)
    sensor, filt = edge.modules["sensor"], edge.modules["filter"]

    assert sensor.ask(op="send", output="temp", body="cold",
                      properties={"temperature": 12}) == {"filtered": True}
    assert sensor.ask(op="send", output="temp", body="hot",
                      properties={"temperature": 31.5}) == {"ok": True}
    got = filt.ask(op="recv", timeout=10)
    assert (got["input"], got["body"], got["module"], got["output"]) == (
        "hot", "hot", "sensor", "temp"), got
    assert got["properties"] == {"temperature": 31.5}
    assert filt.ask(op="recv", timeout=0.5) == {"none": True}  # the cold one went nowhere

    refused = sensor.ask(op="send", output="humidity", body="x")
    assert refused == {"status": 404,
                       "reason": "no route takes output humidity of module sensor"}
    big = sensor.ask(op="send", output="temp", body="x", repeat=5000,
                     properties={"temperature": 40})
    assert big["status"] == 413 and "5000 bytes" in big["reason"], big
    assert "4 KiB" in big["reason"] and "max_message_kb" in big["reason"]

    # The filter sends on: its message goes up to the hub.
    assert filt.ask(op="send", output="alerts", body="alert 31.5",
                    properties={"level": "high"}) == {"ok": True}
    wait_until(lambda: edge.bodies() == ["alert 31.5"], 20, 0.2, "the alert at the hub")
    [up] = edge.tail()
    assert (up["module"], up["output"], up["properties"]) == ("filter", "alerts",
                                                              {"level": "high"})

    want = {"received": 5, "delivered": 1, "filtered": 1, "refused": 2, "upstream_sent": 1,
            "upstream_queued": 0, "rejected_identity": 0}
    wait_until(lambda: {k: edge.counters()[k] for k in want} == want, 10, 0.2,
               "the agent's counters")
    shown = run_cli("agent", "status", "--state-dir", str(edge.agent.state_dir), "--json")
    assert shown.returncode == 0, shown.stderr
    messages = json.loads(shown.stdout)["modules"]["messages"]
    assert {k: messages[k] for k in want} == want, messages

    def reported() -> dict[str, Any] | None:
        done = hub.cli("deployment", "rollout", edge.name, "--json")
        assert done.returncode == 0, done.stderr
        found: dict[str, Any] | None = json.loads(done.stdout)["machines"][0]["messages"]
        return found
    # The counters reach the hub within the report's period (at most every 10 s).
    wait_until(lambda: (reported() or {}).get("upstream_sent") == 1, 20, 0.5,
               "the counters in the hub's rollout")
    seen = reported()
    assert seen is not None
    assert {k: seen[k] for k in ("received", "delivered", "filtered", "refused")} == {
        "received": 5, "delivered": 1, "filtered": 1, "refused": 2}
    # All of it (the deployment read, routes, upstream, reports) without pydantic: the
    # agent's 40 MB budget (protocol/modreaders.py). Its compiled core is not mapped.
    assert edge.agent.proc is not None
    assert "_pydantic_core" not in Path(f"/proc/{edge.agent.proc.pid}/maps").read_text()


def test_a_foreign_process_claiming_a_module_is_refused_logged_and_counted(
        sqlite_hub: Hub, tmp_path: Path, agents: list[Agent], edges: list[Edge]) -> None:
    """ED-9 against the real agent: the test's own child and a child running as the modules'
    user, neither started by the agent, both claim ``sensor``."""
    import pwd

    edge = deploy(sqlite_hub, tmp_path, agents, ["sensor", "filter"], ROUTES)
    edges.append(edge)
    status = edge.agent.status()
    assert status is not None
    path = status["modules"]["socket"]
    user = pwd.getpwnam("outpost-mod")

    def as_module_user() -> None:
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    pids = []
    for preexec in (None, as_module_user):
        proc = subprocess.Popen([PYTHON, str(MSGMODULE), "raw", "sensor", path],
                                stdout=subprocess.PIPE, text=True, preexec_fn=preexec,
                                env={"PYTHONPATH": str(SRC)})
        out, _ = proc.communicate(timeout=20)
        pids.append(proc.pid)
        assert json.loads(out) == [{"op": "error", "status": 404,
                                    "reason": "Module not found"}], out
    assert edge.counters()["rejected_identity"] == 2
    assert edge.counters()["received"] == 0
    log = edge.agent.log()
    for pid in pids:
        assert f"process {pid} " in log, log[-3000:]
    assert f"uid {user.pw_uid}" in log
    assert edge.modules["filter"].ask(op="recv", timeout=0.5) == {"none": True}
    assert edge.tail() == []


def test_the_hub_cut_off_for_30_s_loses_nothing_within_the_ttl_and_drops_the_expired(
        sqlite_hub: Hub, tmp_path: Path, agents: list[Agent], edges: list[Edge]) -> None:
    hub = sqlite_hub
    proxy = TcpProxy(("127.0.0.1", hub.port))
    try:
        edge = deploy(hub, tmp_path, agents, ["sensor"], {
            "keep": "FROM /messages/modules/sensor/outputs/keep INTO $upstream",
            "brief": {"route": "FROM /messages/modules/sensor/outputs/brief INTO $upstream",
                      "ttl_seconds": 5}}, via=f"https://127.0.0.1:{proxy.port}")
        edges.append(edge)
        sensor = edge.modules["sensor"]
        assert sensor.ask(op="send", output="keep", body="k-before") == {"ok": True}
        wait_until(lambda: edge.bodies() == ["k-before"], 20, 0.2, "the first message")

        proxy.cut()
        started = time.monotonic()
        sent = []
        for i in range(20):
            assert sensor.ask(op="send", output="keep", body=f"k{i}") == {"ok": True}
            sent.append(f"k{i}")
            if i % 4 == 0:
                assert sensor.ask(op="send", output="brief", body=f"b{i}") == {"ok": True}
            time.sleep(1)
        assert edge.bodies() == ["k-before"]  # nothing went through the cut
        assert edge.counters()["upstream_queued"] >= 20
        time.sleep(max(0.0, 30 - (time.monotonic() - started)))
        proxy.restore()

        wait_until(lambda: len(edge.bodies()) >= 21, 90, 0.5, "the queued messages")
        time.sleep(1)
        assert edge.bodies() == ["k-before", *sent]  # in order, none twice
        assert edge.counters()["expired"] == 5
        assert edge.counters()["upstream_queued"] == 0
        tail = hub.api("GET", f"/v1/messages?machine={edge.name}&limit=1")
        assert tail.json()["counters"]["dropped_expired"] == 5, tail.text
        text = hub.cli("messages", "tail", "--machine", edge.name, "--limit", "3")
        assert text.returncode == 0 and text.stdout.splitlines()[-1].endswith("k19"), text
    finally:
        proxy.close()


def test_a_kill_9_of_the_agent_loses_and_doubles_nothing_acked(
        sqlite_hub: Hub, tmp_path: Path, agents: list[Agent], edges: list[Edge]) -> None:
    hub = sqlite_hub
    proxy = TcpProxy(("127.0.0.1", hub.port))
    try:
        edge = deploy(hub, tmp_path, agents, ["sensor"],
                      {"up": "FROM /messages/* INTO $upstream"},
                      via=f"https://127.0.0.1:{proxy.port}")
        edges.append(edge)
        sensor = edge.modules["sensor"]
        assert sensor.ask(op="send", output="out", body="m-first") == {"ok": True}
        wait_until(lambda: len(edge.tail()) == 1, 20, 0.2, "the first message")
        proxy.cut()
        sensor.lines.write(json.dumps({"op": "flood", "output": "out", "count": 400}) + "\n")
        sensor.lines.flush()
        acked = []
        while len(acked) < 150:
            line = sensor.read()
            assert "acked" in line, line
            acked.append(line["acked"])
        edge.agent.stop(signal.SIGKILL)
        # What the module was still sending is refused or waits: read to the end.
        while "acked" in (line := sensor.read()):
            acked.append(line["acked"])
        assert "error" in line, line  # the agent is gone: the flood stops, unacked
        assert sensor.read() == {"done": True}
        proxy.restore()
        edge.agent.start()
        # The agent adopts the module it left running; the module's client connects again
        # and is still known as the module.
        assert sensor.ask(op="send", output="out", body="m-after") == {"ok": True}
        expected = ["m-first", *(f"m{i}" for i in acked), "m-after"]
        wait_until(lambda: edge.bodies()[-1:] == ["m-after"], 60, 0.5,
                   "every acked message at the hub")
        bodies = edge.bodies()
        assert len(bodies) == len(set(bodies)), "a message was stored twice"
        # A send written to the store as the kill came, before its ack, may be there too.
        assert [b for b in bodies if b in expected] == expected, bodies
        assert len(bodies) - len(expected) <= 1, bodies
    finally:
        proxy.close()


def test_direct_calls_from_the_operator(
        sqlite_hub: Hub, tmp_path: Path, agents: list[Agent], edges: list[Edge]) -> None:
    hub = sqlite_hub
    edge = deploy(hub, tmp_path, agents, ["sensor", "filter"], ROUTES)
    edges.append(edge)
    sensor = edge.modules["sensor"]
    assert sensor.ask(op="method", name="reset") == {"ok": True}
    assert sensor.ask(op="method", name="slow", sleep=10) == {"ok": True}

    done = hub.cli("messages", "call", edge.name, "sensor", "reset", "--payload",
                   '{"hard": true}', "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout) == {"status": 200, "payload": {"echo": {"hard": True}}}
    text = hub.cli("messages", "call", edge.name, "sensor", "reset", "--payload", "3")
    assert text.returncode == 0 and "status 200" in text.stdout, text.stdout + text.stderr

    unknown = hub.cli("messages", "call", edge.name, "sensor", "nosuch", "--json")
    assert json.loads(unknown.stdout)["status"] == 501, unknown.stdout + unknown.stderr

    # The filter module's process is alive but its client is gone: not connected.
    edge.modules["filter"].close()
    gone = hub.cli("messages", "call", edge.name, "filter", "reset")
    assert gone.returncode != 0 and "E9182" in gone.stderr, gone.stdout + gone.stderr
    absent = hub.cli("messages", "call", edge.name, "nosuch", "reset")
    assert absent.returncode != 0 and "E9182" in absent.stderr, absent.stderr

    slow = hub.cli("messages", "call", edge.name, "sensor", "slow", "--timeout", "1")
    assert slow.returncode != 0, slow.stdout
    # The agent gives up first (the call's own timeout) and says so; the hub would answer
    # E9191 only when the agent's answer does not come at all.
    assert "E9183" in slow.stderr and "did not answer the call of slow within 1 s" in (
        slow.stderr), slow.stderr
    # The calls were read and answered without pydantic (the agent's memory budget).
    assert "_pydantic_core" not in Path(f"/proc/{edge.agent.proc.pid}/maps").read_text()


@pytest.mark.skipif(not _nats_up(), reason="no NATS server at 127.0.0.1:4222")
def test_upstream_messages_reach_nats_with_their_properties_as_headers(
        new_hub: Hub, tmp_path: Path, agents: list[Agent], edges: list[Edge]) -> None:
    """SQLite and PostgreSQL: the upstream path ends in the hub's database."""
    hub = new_hub
    topic = f"e2e{uuid.uuid4().hex[:8]}"
    path = hub.data_dir / "hub.yaml"
    config = yaml.safe_load(path.read_text())
    config["messages"] = {"forward": {"nats": "nats://127.0.0.1:4222",
                                      "subject": topic + ".{machine}.{module}.{output}"}}
    path.write_text(yaml.safe_dump(config))
    hub.start()
    sub = Subscriber(f"{topic}.>")
    try:
        edge = deploy(hub, tmp_path, agents, ["sensor"],
                      {"up": "FROM /messages/modules/sensor/* WHERE level >= 2 "
                             "INTO $upstream"})
        edges.append(edge)
        sensor = edge.modules["sensor"]
        for i, level in enumerate([1, 2, 3]):
            answer = sensor.ask(op="send", output="temp", body=f"t{i}",
                                properties={"level": level, "unit": "C"})
            assert answer == ({"filtered": True} if level < 2 else {"ok": True}), answer
        wait_until(lambda: len(sub.messages) >= 2, 30, 0.1, "the messages on NATS")
        time.sleep(0.5)
        assert [m.body for m in sub.messages] == [b"t1", b"t2"]
        first = sub.messages[0]
        assert first.subject == f"{topic}.{edge.name}.sensor.temp"
        assert (first.headers["level"], first.headers["unit"]) == ("2", "C")
        assert first.headers["Outpost-Module"] == "sensor"
        assert first.headers["Outpost-Machine"] == edge.name
    finally:
        sub.close()


def test_constrained_mode_end_to_end(
        sqlite_hub: Hub, tmp_path: Path, agents: list[Agent], edges: list[Edge]) -> None:
    edge = deploy(sqlite_hub, tmp_path, agents, ["sensor", "filter"], ROUTES,
                  message_hub={"constrained": True})
    edges.append(edge)
    sensor, filt = edge.modules["sensor"], edge.modules["filter"]
    # The filter's client is gone (its process lives on): its input holds 100 messages,
    # then the sender hears 507. (A connected ModuleClient reads every message into its own
    # queue as it comes, so the agent's bound is reached while a module is away.)
    filt.close()
    time.sleep(0.5)
    answers = [sensor.ask(op="send", output="temp", body=f"h{i}",
                          properties={"temperature": 50}) for i in range(101)]
    assert answers[:100] == [{"ok": True}] * 100, [a for a in answers if a != {"ok": True}]
    assert answers[100].get("status") == 507, answers[100]
    assert "input hot of module filter is full (100 messages wait)" in answers[100]["reason"]
    filt.connect()  # a new client: what waited is delivered to it, in order
    got = [filt.ask(op="recv", timeout=10)["body"] for _ in range(100)]
    assert got == [f"h{i}" for i in range(100)]
    assert filt.ask(op="recv", timeout=0.3) == {"none": True}
    for i in range(60):  # more than one constrained batch (50) goes up
        assert filt.ask(op="send", output="alerts", body=f"a{i}") == {"ok": True}
    wait_until(lambda: edge.counters()["upstream_sent"] == 60, 30, 0.3, "the alerts sent")
    assert edge.bodies() == [f"a{i}" for i in range(60)]


def test_new_routes_apply_to_running_modules_without_a_restart(
        sqlite_hub: Hub, tmp_path: Path, agents: list[Agent], edges: list[Edge]) -> None:
    hub = sqlite_hub
    edge = deploy(hub, tmp_path, agents, ["sensor", "filter"], ROUTES)
    edges.append(edge)
    sensor, filt = edge.modules["sensor"], edge.modules["filter"]
    assert sensor.ask(op="send", output="humidity", body="h1")["status"] == 404

    def pids() -> dict[str, int]:
        status = edge.agent.status()
        assert status is not None
        return {m["name"]: m["pid"] for m in status["modules"]["modules"]}
    before = pids()
    path = tmp_path / f"{edge.name}.yaml"
    manifest = yaml.safe_load(path.read_text())
    manifest["routes"]["wet"] = ('FROM /messages/modules/sensor/outputs/humidity '
                                 'INTO BrokeredEndpoint("/modules/filter/inputs/wet")')
    path.write_text(yaml.safe_dump(manifest))
    made = hub.cli("deployment", "create", edge.name, str(path), "--machine", edge.name)
    assert made.returncode == 0 and "version 2" in made.stdout, made.stdout + made.stderr
    wait_until(lambda: (edge.agent.status() or {})["modules"]["version"] == 2, 20, 0.2,
               "version 2 applied")
    assert sensor.ask(op="send", output="humidity", body="h2") == {"ok": True}
    got = filt.ask(op="recv", timeout=10)
    assert (got["input"], got["body"]) == ("wet", "h2"), got
    assert pids() == before  # the same processes, the same connections
