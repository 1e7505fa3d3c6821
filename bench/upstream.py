"""Upstream messages into the hub, and from the hub to NATS.

Starts a real hub on 127.0.0.1 (SQLite, then PostgreSQL), with forwarding to the NATS
server on 127.0.0.1:4222 set, and registers --machines machines. Each machine posts
--batches batches of --batch messages (--size bytes each) through its own signed client, all
machines at once. Printed per database:

- into the hub: messages/s from the first post to the last answer (each answer means the
  batch is committed);
- to NATS, end to end: messages/s from the first post to the last delivery to a subscriber,
  and the p50/p99 latency from a message's post to its delivery.

    python bench/upstream.py [--database sqlite|postgres|both] [--machines 8]
        [--batches 50] [--batch 100] [--size 200]

Prints; asserts nothing (not a timed test).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import database, percentile  # noqa: E402
from tests import mqtt_sub  # noqa: E402
from tests.nats_sub import Subscriber  # noqa: E402
from tests.support import init_hub, wait_until  # noqa: E402


def register(hub: Any, root: Path, name: str) -> Any:
    from outpost.agent.registration import RegisterOptions
    from outpost.agent.registration import register as register_machine
    from outpost.agent.state import StateDir
    from outpost.agent.transport import Clock

    state = StateDir(root / name)
    asyncio.run(register_machine(state, RegisterOptions(
        hub=hub.url, account_id=hub.account_id, account_key=hub.primary_key, group="bench",
        ca_fingerprint=hub.fingerprint, name=name), Clock()))
    return state


async def post_all(states: list[Any], batches: int, size: int, body: bytes) -> float:
    """Every machine posts its batches in turn, all machines at once; the seconds taken."""
    from outpost.agent.registration import client_for
    from outpost.agent.transport import Clock

    encoded = base64.b64encode(body).decode()

    async def machine(state: Any) -> None:
        reg = state.registration()
        client = client_for(state, reg, Clock(), connections=1)
        try:
            seq = 0
            for _ in range(batches):
                now = time.time()
                messages = [{"seq": seq + i, "module": "sensor", "output": "temp",
                             "properties": {"sent": repr(now)}, "body": encoded,
                             "created_at": now} for i in range(size)]
                seq += size
                answer = await client.request("POST", "/v1/agent/messages",
                                              {"messages": messages})
                assert answer["accepted_through"] == seq - 1, answer
        finally:
            await client.aclose()

    started = time.perf_counter()
    await asyncio.gather(*(machine(s) for s in states))
    return time.perf_counter() - started


def run(kind: str, broker: str, args: argparse.Namespace) -> None:
    topic = f"bench{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="outpost-bench-upstream-") as tmp, \
            database(kind, Path(tmp)) as url:
        root = Path(tmp)
        hub = init_hub(root / "hub", url)
        path = hub.data_dir / "hub.yaml"
        config = yaml.safe_load(path.read_text())
        forward = {"nats": "nats://127.0.0.1:4222",
                   "subject": topic + ".{machine}.{module}.{output}"} if broker == "nats" \
            else {"mqtt": "mqtt://127.0.0.1:1883", "topic": topic + "/{machine}/{module}/{output}"}
        config["messages"] = {"forward": forward}
        path.write_text(yaml.safe_dump(config))
        hub.start()
        sub: Any = Subscriber(f"{topic}.>") if broker == "nats" else \
            mqtt_sub.Subscriber(f"{topic}/#")
        try:
            states = [register(hub, root, f"m{i}") for i in range(args.machines)]
            total = args.machines * args.batches * args.batch
            began = time.time()
            took = asyncio.run(post_all(states, args.batches, args.batch, b"x" * args.size))
            wait_until(lambda: len(sub.messages) >= total, 300, 0.05,
                       f"{total} messages on {broker}")
            last = max(m.at for m in sub.messages)
            latencies = [m.at - float((m.headers if broker == "nats" else m.properties)["sent"])
                         for m in sub.messages]
            print(f"{kind}, {broker}: {args.machines} machines x {args.batches} batches x "
                  f"{args.batch} messages of {args.size} B = {total} messages")
            print(f"  into the hub (signed batches, committed): {total / took:,.0f} "
                  f"messages/s ({took:.2f} s)")
            print(f"  to {broker} end to end: {total / (last - began):,.0f} messages/s; "
                  f"post to delivery p50 {percentile(latencies, 50) * 1e3:.0f} ms, "
                  f"p99 {percentile(latencies, 99) * 1e3:.0f} ms")
        finally:
            sub.close()
            hub.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--machines", type=int, default=8)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--broker", choices=["nats", "mqtt", "both"], default="nats")
    args = parser.parse_args()
    kinds = ["sqlite", "postgres"] if args.database == "both" else [args.database]
    brokers = ["nats", "mqtt"] if args.broker == "both" else [args.broker]
    for kind in kinds:
        for broker in brokers:
            run(kind, broker, args)


if __name__ == "__main__":
    main()
