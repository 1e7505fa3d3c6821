"""Resident memory of an idle registered agent after a minute of heartbeats.

Starts a real hub (SQLite) and a real agent heartbeating every second, samples the agent's
RSS once a second, and prints the figures. Target: at most 40 MB. It also says whether the
idle agent loaded pydantic (its compiled core mapped in the process): it should not, see
docs/architecture.md, "The agent's memory budget".

With ``--jobs N`` the agent first runs N small bash jobs one after another (and pings),
then idles: what an agent that has worked keeps.

    python bench/agent_memory.py [--seconds 60] [--interval 1] [--jobs N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import publish  # noqa: E402
from tests.support import init_hub, registered_agent, wait_until  # noqa: E402

MB = 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=1.0, help="heartbeat interval")
    parser.add_argument("--jobs", type=int, default=0,
                        help="small jobs to run (and pings to answer) before idling")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the agent, to compare settings")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hub = init_hub(root / "hub", f"sqlite:///{root / 'hub.db'}").start()
        agent = registered_agent(hub, root, "bench", heartbeat_interval=args.interval)
        agent.env.update(dict(e.split("=", 1) for e in args.env))
        try:
            agent.start()
            wait_until(lambda: hub.machines()["bench"]["status"] == "Healthy", 30)
            assert agent.proc is not None
            proc = psutil.Process(agent.proc.pid)
            if args.jobs:
                run_jobs(hub, args.jobs)
            samples = []
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                samples.append(proc.memory_info().rss)
                time.sleep(1)
            uss = proc.memory_full_info().uss
            maps = Path(f"/proc/{proc.pid}/maps").read_text()
            beats = hub.api("GET", "/v1/heartbeats").json()[0]
        finally:
            agent.stop()
            hub.stop()
    after = f", after {args.jobs} jobs" if args.jobs else ""
    print(f"agent idle memory over {args.seconds:.0f} s of heartbeats every {args.interval:g} s"
          f"{after}")
    print(f"  rss at start    {samples[0] / MB:6.1f} MB")
    print(f"  rss at end      {samples[-1] / MB:6.1f} MB")
    print(f"  rss peak        {max(samples) / MB:6.1f} MB")
    print(f"  uss at end      {uss / MB:6.1f} MB")
    print(f"  pydantic loaded {'yes' if '_pydantic_core' in maps else 'no'}")
    print(f"  last heartbeat  {beats['seconds_ago']} s before the end, status {beats['status']}")
    print(f"  target          40.0 MB: {'met' if max(samples) <= 40 * MB else 'NOT met'}")


def run_jobs(hub: Any, count: int) -> None:
    publish(hub, "hello", "echo hello from $(hostname)\n")
    for _ in range(count):
        response = hub.api("POST", "/v1/jobs", json={"runbook": "hello", "group": "web"})
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]
        wait_until(lambda j=job_id: hub.api("GET", f"/v1/jobs/{j}").json()["status"]
                   in ("Completed", "Failed", "Stopped"), 60)
        assert hub.api("GET", f"/v1/jobs/{job_id}").json()["status"] == "Completed"
        pinged = hub.cli("machine", "ping", "bench")
        assert pinged.returncode == 0, pinged.stdout + pinged.stderr


if __name__ == "__main__":
    main()
