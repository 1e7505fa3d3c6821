"""The hub's CPU per agent request, with the agents' two most frequent requests served
without the web framework (``hub/routes/lean.py``) and through it, alternating in one run.

A hub runs in this process (tests/inproc.py: the hub's app over httpx's ASGI transport, no
TLS) on SQLite, with ``--machines`` registered machines. Each round sends ``--requests``
requests of one kind, signed by its machine's own key as an agent signs them, ``--machines``
at once:
``poll`` (a long-poll with wait=0 carrying a heartbeat, the idle agent's one request a cycle)
or ``heartbeat`` (one on its own). The hub's CPU is the process's CPU time less that of the
same requests answered by a null app (the client's signing and httpx's work); the hub's
background work (the heartbeat batch's commit, which the answer waits for) is inside it.
Rounds alternate lean, framework and client, ``--rounds`` of each::

    .venv/bin/python bench/agent_requests.py [--requests 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from outpost import __version__  # noqa: E402
from tests.inproc import running_hub  # noqa: E402

BEAT = {"agent_version": __version__, "heartbeat_interval": 30, "run": "bench"}


async def null_app(scope: Any, receive: Any, send: Any) -> None:
    """Reads the request and answers ``{}``: what the client side costs alone."""
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{}"})


async def one_round(mode: str, kind: str, requests: int, machines: int) -> float:
    """Milliseconds of this process's CPU per request (client and hub) in ``mode``: lean,
    framework, or client (the null app in the hub's place)."""
    with tempfile.TemporaryDirectory(prefix="outpost-bench-requests-") as root:
        async with running_hub(Path(root), lean_routes=mode != "framework") as hub:
            fleet = [await hub.machine(f"m{i}") for i in range(machines)]
            path, body = (("/v1/agent/poll?wait=0&capacity=1", {"heartbeat": BEAT})
                          if kind == "poll" else ("/v1/agent/heartbeat", BEAT))
            for machine in fleet:  # warm: each machine's row cached, as in a running fleet
                await machine.ok("POST", path, body)
            if mode == "client":
                hub.http._transport.app = null_app  # type: ignore[attr-defined]
            began = time.process_time()
            # A fleet's requests overlap; here, batches of them at once.
            for start in range(0, requests, machines):
                await asyncio.gather(*(m.call("POST", path, body)
                                       for m in fleet[:min(machines, requests - start)]))
            return (time.process_time() - began) / requests * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--machines", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for kind in ("poll", "heartbeat"):
        seen: dict[str, list[float]] = {"lean": [], "framework": [], "client": []}
        for _ in range(args.rounds):
            for mode in seen:
                seen[mode].append(asyncio.run(one_round(mode, kind, args.requests,
                                                        args.machines)))
        client = statistics.median(seen["client"])
        lean_ms = statistics.median(seen["lean"]) - client
        framework_ms = statistics.median(seen["framework"]) - client
        print(f"{kind}: hub CPU per request (process CPU less the client's alone, medians of "
              f"{args.rounds}): lean {lean_ms:.3f} ms, through the framework "
              f"{framework_ms:.3f} ms; lean/framework {lean_ms / framework_ms:.2f}. Rounds, "
              f"client and hub: " + "; ".join(
                  f"{mode} {', '.join(f'{v:.3f}' for v in values)}"
                  for mode, values in seen.items()), flush=True)

if __name__ == "__main__":
    main()
