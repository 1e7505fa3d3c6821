"""What extensions cost an idle agent, and how long `extension set` takes to reach Ready.

Starts a real hub (SQLite) and two real agents heartbeating at the same interval: "plain",
which never has an extension, and "ext", which is given two small test extensions and waits
until both are Ready. Both then idle side by side; their RSS and PSS (psutil; PSS counts
shared pages by their share) are sampled once a second and the medians compared: what two
Ready extensions add to an agent, in one run (target: under 5 MB more). Before sampling, "ext"
runs one operation of each extension to its end, so that the figure is that of an agent that
has run operations too; whether each agent has pydantic mapped is printed beside it.

Then, on "ext" (alone in its group), `--runs` times each, alternately: a goal set for a new
extension for the machine (the request `outpost extension set NAME --machine ext` sends),
and one for its group (`--group`), until the agent reports it Ready. A machine's own goal
wakes its agent's long-poll; a group's goal reaches each machine at its next heartbeat (its
extensions_etag), as every goal did before the long-poll was woken. For each: when the agent
fetched its goals and when its state changed to Ready (the agent's own time, same clock).
Each set comes at a random point of the heartbeat cycle. Medians of set -> fetched,
fetched -> Ready and set -> Ready, and the ratio of the two ways.

    python bench/ext_agent.py [--interval 30] [--seconds 30] [--runs 7] [--max-seconds 1200]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import (  # noqa: E402
    MB,
    TimeBound,
    _stop,
    cancel_time_bound,
    load,
    time_bound,
    verdict,
)
from tests import extbuild  # noqa: E402
from tests.support import Agent, Hub, init_hub, registered_agent, wait_until  # noqa: E402

STATUS = ("status() { printf '{\"status\":\"%s\",\"code\":0,\"message\":\"%s\"}' \"$1\" \"$2\" "
          "> \"$OUTPOST_EXT_STATUS_DIR/$OUTPOST_EXT_SEQ.status\"; }\n")
TARGET_MB = 5.0
GROUP = "ext-bench"  # the group of agent "ext" alone


def package(name: str) -> bytes:
    """A small extension whose handlers succeed at once, with one operation."""
    script = f"#!/bin/sh\n{STATUS}status success ok\n".encode()
    files = {f"bin/{h}": (script, 0o755) for h in
             ("install", "enable", "disable", "update", "uninstall", "work")}
    manifest = extbuild.manifest(name, "1.0.0", operations={"work": {"run": "bin/work"}})
    return extbuild.package(manifest, files=files)


def publish(hub: Hub, name: str) -> None:
    response = hub.api("POST", "/v1/extensions", content=package(name),
                       headers={"Content-Type": "application/gzip"})
    assert response.status_code in (200, 201), response.text


def row(hub: Hub, machine: str, name: str) -> dict[str, Any]:
    rows = hub.api("GET", f"/v1/machines/{machine}/extensions").json()
    return next((r for r in rows if r["name"] == name), {})


def set_goal(hub: Hub, machine: str, name: str, kind: str = "machine") -> float:
    sent = time.time()
    target = machine if kind == "machine" else GROUP
    response = hub.api("PUT", f"/v1/extensions/{name}/targets/{kind}/{target}", json={})
    assert response.status_code == 200, response.text
    return sent


def run_operation(hub: Hub, machine: str, name: str) -> None:
    """Operation "work" of ``name`` on ``machine``, waited for until it succeeded."""
    response = hub.api("POST", f"/v1/machines/{machine}/extensions/{name}/operations/work",
                       json={"params": {}})
    assert response.status_code == 201, response.text
    op_id = response.json()["id"]
    done = wait_until(lambda: (op := hub.api("GET", f"/v1/extension-operations/{op_id}").json())
                      ["status"] in ("Succeeded", "Failed") and op,
                      120, 0.2)
    assert done["status"] == "Succeeded", done


def pydantic_mapped(agent: Agent) -> bool:
    assert agent.proc is not None
    return "_pydantic_core" in Path(f"/proc/{agent.proc.pid}/maps").read_text()


def memory(agent: Agent) -> tuple[float, float]:
    assert agent.proc is not None
    info = psutil.Process(agent.proc.pid).memory_full_info()
    return info.rss, getattr(info, "pss", float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=30.0,
                        help="the agents' heartbeat interval (the default agent's: 30 s)")
    parser.add_argument("--seconds", type=float, default=30.0, help="memory sampling window")
    parser.add_argument("--settle", type=float, default=15.0,
                        help="idle time before sampling, once the extensions are Ready")
    parser.add_argument("--runs", type=int, default=7, help="set -> Ready measurements")
    parser.add_argument("--max-seconds", type=float, default=1200.0)
    parser.add_argument("--seed", type=int, default=1, help="of the random waits")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    print(load())
    time_bound(args.max_seconds)
    agents: list[Agent] = []
    hub: Hub | None = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            hub = init_hub(root / "hub", f"sqlite:///{root / 'hub.db'}").start()
            for name in ("plain", "ext"):
                agent = registered_agent(hub, root, name, "web" if name == "plain" else GROUP,
                                         heartbeat_interval=args.interval)
                agents.append(agent.start())
            for name in ("plain", "ext"):
                wait_until(lambda n=name: hub.machines()[n]["status"] == "Healthy", 60)
            plain, ext = agents
            for name in ("small-a", "small-b", *(f"lat-{k}-{i}" for i in range(args.runs)
                                                 for k in ("machine", "group"))):
                publish(hub, name)

            for name in ("small-a", "small-b"):
                set_goal(hub, "ext", name)
            for name in ("small-a", "small-b"):
                wait_until(lambda n=name: row(hub, "ext", n).get("state") == "Ready",
                           3 * args.interval + 60, 0.2)
            for name in ("small-a", "small-b"):
                run_operation(hub, "ext", name)
            time.sleep(args.settle)
            mapped = {"plain": pydantic_mapped(plain), "ext": pydantic_mapped(ext)}
            samples: dict[str, list[tuple[float, float]]] = {"plain": [], "ext": []}
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                samples["plain"].append(memory(plain))
                samples["ext"].append(memory(ext))
                time.sleep(1)

            latencies: dict[str, list[tuple[float, float, float]]] = {"machine": [],
                                                                      "group": []}
            for i in range(args.runs):
                for kind in ("machine", "group"):
                    name = f"lat-{kind}-{i}"
                    # At a random point of the heartbeat cycle: one run after another would
                    # otherwise all fall at the same point of it.
                    time.sleep(rng.uniform(0, args.interval))
                    sent = set_goal(hub, "ext", name, kind)
                    ready = wait_until(lambda n=name: (r := row(hub, "ext", n)).get(
                        "state") == "Ready" and r, 3 * args.interval + 60, 0.02)
                    status = ext.status() or {}
                    fetched = float(status.get("extensions_fetched_at") or sent)
                    latencies[kind].append((fetched - sent, float(ready["changed_at"]) - fetched,
                                            float(ready["changed_at"]) - sent))
    except TimeBound as exc:
        print(f"incomplete: {exc}")
        return
    finally:
        cancel_time_bound()
        for agent in agents:
            _stop(agent.proc)
        if hub is not None:
            _stop(hub.proc)

    def med(which: str, i: int) -> float:
        return statistics.median(s[i] for s in samples[which])

    rss_plain, rss_ext = med("plain", 0), med("ext", 0)
    pss_plain, pss_ext = med("plain", 1), med("ext", 1)
    print(f"agent idle memory, medians over {args.seconds:.0f} s, heartbeat every "
          f"{args.interval:g} s")
    print(f"  {'':18} {'RSS MB':>8} {'PSS MB':>8}  pydantic mapped")
    print(f"  {'no extension':18} {rss_plain / MB:8.1f} {pss_plain / MB:8.1f}  "
          f"{mapped['plain']}")
    print(f"  {'2 extensions Ready':18} {rss_ext / MB:8.1f} {pss_ext / MB:8.1f}  "
          f"{mapped['ext']} (after one operation each)")
    print(f"  {'difference':18} {(rss_ext - rss_plain) / MB:+8.1f} "
          f"{(pss_ext - pss_plain) / MB:+8.1f}   (ratio RSS {rss_ext / rss_plain:.2f})")
    print(f"  target: under {TARGET_MB:g} MB more: "
          f"{verdict((rss_ext - rss_plain) / MB < TARGET_MB)}")
    print(f"extension set -> Ready on a healthy machine, {args.runs} runs each, heartbeat "
          f"every {args.interval:g} s (seconds)")
    for kind, way in (("machine", "--machine: the long-poll woken"),
                      ("group", "--group: at the next heartbeat")):
        print(f"  {way}")
        for label, i in (("set -> goals fetched", 0), ("fetched -> Ready", 1),
                         ("set -> Ready", 2)):
            values = [lat[i] for lat in latencies[kind]]
            print(f"    {label:22} median {statistics.median(values):7.2f}  min "
                  f"{min(values):7.2f}  max {max(values):7.2f}")
    woken = statistics.median(lat[2] for lat in latencies["machine"])
    beat = statistics.median(lat[2] for lat in latencies["group"])
    print(f"  set -> Ready, heartbeat / woken: {beat / woken:.0f}x")
    print(load())


if __name__ == "__main__":
    main()
