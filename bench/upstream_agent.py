"""Messages through a REAL agent: module to module, and up to the hub and on to NATS.

A hub (SQLite, forwarding to NATS at 127.0.0.1:4222 when one listens) and a registered agent
run as processes of their own; a deployment made with the CLI gives the agent two modules,
``src`` and ``dst``, each this file's ``module`` role run by the agent as its module user
(``/usr/bin/python3`` with the client from the source tree) and driven over TCP:

- module to module: ``dst`` waits for ``--count`` messages on its input while ``src`` sends
  them of ``--size`` bytes on ``out`` one after another (each waits for its ack); a route
  takes them to ``dst``. Printed: messages/s at ``dst`` and the p50/p99 latency (the
  sender's ``time.monotonic()`` in the body against the receiver's: one clock).
- upstream: ``src`` sends ``--count`` messages on ``up`` (a route INTO $upstream). Printed:
  the acks/s the module saw (the agent's store), the messages/s until the hub held them all
  (its ``accepted_through``), and until the last arrived on NATS.

    python bench/upstream_agent.py [--count 5000] [--size 256] [--constrained]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# As the agent runs it (the module user may not read the bench's virtual environment).
PYTHON = "/usr/bin/python3"


# --- the module role: standard library and outpost.modules only ---------------------------
def module_role(port: int) -> None:
    from outpost.modules import ModuleClient

    client = ModuleClient()
    listener = socket.create_server(("127.0.0.1", port))
    conn, _ = listener.accept()
    lines, out = conn.makefile("r"), conn.makefile("w")
    for line in lines:
        op, count, size = line.split()
        if op == "recv":
            latencies = []
            first = last = 0.0
            for _ in range(int(count)):
                message = client.receive(60)
                if message is None:
                    break
                last = time.monotonic()
                first = first or last
                latencies.append(last - json.loads(message.body)["t"])
            answer: dict[str, Any] = {"latencies": latencies, "seconds": last - first}
        else:  # "out" or "up": send COUNT messages of SIZE bytes on that output
            pad = "x" * max(0, int(size) - 40)
            start = time.monotonic()
            for _ in range(int(count)):
                client.send(op, json.dumps({"t": time.monotonic(), "p": pad}).encode())
            answer = {"seconds": time.monotonic() - start}
        out.write(json.dumps(answer) + "\n")
        out.flush()


# --- the run -------------------------------------------------------------------------------
class Line:
    def __init__(self, port: int) -> None:
        from tests.support import wait_until

        def up() -> socket.socket | None:
            try:
                return socket.create_connection(("127.0.0.1", port), timeout=2)
            except OSError:
                return None
        self.sock = wait_until(up, 60, 0.1, f"the module on port {port}")
        self.sock.settimeout(600)
        self.file = self.sock.makefile("rw")

    def tell(self, text: str) -> None:
        self.file.write(text + "\n")
        self.file.flush()

    def answer(self) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(self.file.readline())
        return found


def _nats_up() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 4222), timeout=1).close()
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--constrained", action="store_true")
    args = parser.parse_args()

    import tempfile

    import yaml

    sys.path.insert(0, str(ROOT))
    from bench._common import _stop, percentile
    from tests.nats_sub import Subscriber
    from tests.support import free_port, init_hub, migrated_sqlite, registered_agent, wait_until

    nats = _nats_up()
    with tempfile.TemporaryDirectory(prefix="bench-upagent-") as tmp:
        root = Path(tmp)
        hub = init_hub(root / "hub", migrated_sqlite(root / "hub.db"))
        topic = f"bench{int(time.time())}"
        if nats:
            config = yaml.safe_load((hub.data_dir / "hub.yaml").read_text())
            config["messages"] = {"forward": {"nats": "nats://127.0.0.1:4222",
                                              "subject": topic + ".{machine}.{module}.{output}"}}
            (hub.data_dir / "hub.yaml").write_text(yaml.safe_dump(config))
        agent = None
        modules_pids: list[int] = []
        try:
            hub.start()
            agent = registered_agent(hub, root, "bench", heartbeat_interval=1)
            agent.start()
            ports = {"src": free_port(), "dst": free_port()}
            manifest = {"modules": {name: {
                "command": [PYTHON, str(Path(__file__).resolve()), "module", str(port)],
                "env": {"PYTHONPATH": str(ROOT / "src")}, "stop_timeout_seconds": 2}
                for name, port in ports.items()},
                "routes": {"pipe": 'FROM /messages/modules/src/outputs/out '
                                   'INTO BrokeredEndpoint("/modules/dst/inputs/in")',
                           "up": "FROM /messages/modules/src/outputs/up INTO $upstream"},
                "message_hub": {"constrained": args.constrained}}
            path = root / "edge.yaml"
            path.write_text(yaml.safe_dump(manifest))
            made = hub.cli("deployment", "create", "edge", str(path), "--machine", "bench")
            assert made.returncode == 0, made.stderr
            src, dst = Line(ports["src"]), Line(ports["dst"])
            status = agent.status() or {}
            modules_pids = [m["pid"] for m in status["modules"]["modules"] if m.get("pid")]

            dst.tell(f"recv {args.count} 0")
            src.tell(f"out {args.count} {args.size}")
            sent = src.answer()
            got = dst.answer()
            lat = sorted(got["latencies"])
            print(f"module to module through the agent ({args.count} x {args.size} B"
                  f"{', constrained' if args.constrained else ''}): "
                  f"{len(lat) / got['seconds']:.0f} msg/s received "
                  f"({args.count / sent['seconds']:.0f} msg/s acked to the sender), "
                  f"p50 {percentile(lat, 50) * 1000:.2f} ms, "
                  f"p99 {percentile(lat, 99) * 1000:.2f} ms")

            sub = Subscriber(f"{topic}.>") if nats else None
            start = time.monotonic()
            src.tell(f"up {args.count} {args.size}")
            acked = src.answer()["seconds"]

            def held() -> bool:
                answer = hub.api("GET", "/v1/messages?machine=bench&limit=1").json()
                return bool(answer["counters"]["accepted_through"] >= args.count)
            wait_until(held, 600, 0.05, "every message at the hub")
            at_hub = time.monotonic() - start
            print(f"upstream through the agent: {args.count / acked:.0f} msg/s acked to the "
                  f"module (stored), {args.count / at_hub:.0f} msg/s until the hub held all "
                  f"({at_hub:.2f} s)")
            if sub is not None:
                wait_until(lambda: len(sub.messages) >= args.count, 600, 0.05,
                           "every message on NATS")
                on_nats = sub.messages[-1].at - (time.time() - (time.monotonic() - start))
                print(f"  and on to NATS: {args.count / on_nats:.0f} msg/s until the last "
                      f"arrived ({on_nats:.2f} s)")
                sub.close()
            else:
                print("  (no NATS server at 127.0.0.1:4222: forwarding not measured)")
        finally:
            if agent is not None:
                _stop(agent.proc)
            import os
            import signal
            for pid in modules_pids:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
            _stop(hub.proc)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "module":
        module_role(int(sys.argv[2]))
    else:
        main()
