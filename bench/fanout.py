"""A job on every machine of a group of 1,000 simulated machines, with rate control.

Starts a real hub, registers a fleet of simulated agents in one group through the real API
(bench/fleet.py: each its own machine key, heartbeating and long-polling over HTTPS), then
for each ``--concurrency`` value starts ``job start noop --group sim --all
--max-concurrency C`` (``POST /v1/fanouts``) and waits until the parent has ended. Prints,
for each: the time from submission to the parent's end (every child dispatched, claimed by
its own machine, and its end recorded), children per second, the most children the hub
had on machines at once (from the children's recorded start and end: at most C), that each
child was claimed once and by its own machine, and the hub's CPU meanwhile.

    .venv/bin/python bench/fanout.py [--machines 1000] [--concurrency 100,10%]
        [--database sqlite|postgres] [--max-seconds 900]

``--in-process`` measures the hub's own work for each child instead, with no fleet, HTTP or
other process: in this process, on a fresh database, ``fanout.start`` on ``--machines``
machines, then each child claimed by its machine and its end reported (``jobs.claim``,
``jobs.report``), the released ones in turn, as the hub runs them; it prints the CPU time
this process spent per end (``time.process_time``, so other work on the machine counts
little) for each ``--machines`` value, comma-separated: an end whose cost grows with the
group's size shows here.

    .venv/bin/python bench/fanout.py --in-process --machines 1000,4000 --concurrency 100
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import TimeBound, cancel_time_bound, load, time_bound  # noqa: E402
from bench.fleet import Fleet, _raise_fd_limit, hubs  # noqa: E402

GROUP = "sim"


def _most_at_once(children: list[dict[str, Any]]) -> int:
    edges = sorted([(c["started_at"], 1) for c in children if c["started_at"]]
                   + [(c["ended_at"], -1) for c in children if c["started_at"]])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


def run_one(hub: Any, fleet: Fleet, machines: int, concurrency: str,
            timeout: float) -> dict[str, Any]:
    proc = psutil.Process(hub.proc.pid)
    # A hub serving a thousand agents on a busy 2-core machine may answer slowly.
    api = httpx.Client(base_url=hub.url, verify=hub.ssl_context(), timeout=300,
                       headers={"Authorization": f"Bearer {hub.admin_token}"})
    cpu0 = sum(proc.cpu_times()[:2])
    began = time.monotonic()
    answer = api.post("/v1/fanouts", json={
        "runbook": "noop", "group": GROUP, "max_concurrency": concurrency})
    assert answer.status_code == 201, answer.text
    parent = answer.json()
    submitted = time.monotonic() - began
    deadline = time.monotonic() + timeout
    refused: list[str] = []  # answers other than 200 (a loaded hub may answer 503)
    while True:  # the listing shows the parent only: a cheap look
        answer = api.get("/v1/jobs", params={"limit": 5})
        if answer.status_code != 200:
            refused.append(f"{answer.status_code} {answer.text[:200]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the listing was refused: {refused[-3:]}")
            time.sleep(1)
            continue
        status = next(j["status"] for j in answer.json() if j["id"] == parent["id"])
        if status in ("Completed", "Failed", "Stopped"):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"the parent was still {status} after {timeout:g} s")
        time.sleep(0.25)
    wall = time.monotonic() - began
    cpu = sum(proc.cpu_times()[:2]) - cpu0
    shown = api.get(f"/v1/jobs/{parent['id']}").json()
    api.close()
    fan = shown["fanout"]
    children = fan["breakdown"]
    snap = fleet.snapshot()
    claimed = [c for c in children if c["job_id"] in snap["claims"]]
    names = {c["machine"] for c in children}
    return {
        "concurrency": concurrency, "max_concurrency": fan["max_concurrency"],
        "children": len(children), "status": shown["status"], "counts": fan["counts"],
        "submit_s": submitted, "wall_s": wall,
        "hub_s": shown["ended_at"] - shown["created_at"],
        "most_at_once": _most_at_once(children), "claimed": len(claimed),
        "one_per_machine": len(names) == len(children) == machines,
        "hub_cpu_s": cpu, "refused": refused,
    }


async def _in_process(url: str, machines: int, concurrency: str) -> dict[str, Any]:
    from types import SimpleNamespace

    import sqlalchemy as sa

    from outpost.hub import db, fanout, jobs, runbooks

    engine = db.make_engine(url)
    try:
        await db.migrate(engine)
        now = time.time()
        async with engine.begin() as conn:
            await conn.execute(db.accounts.insert().values(
                id="acct", name="acct", primary_key="-", secondary_key="-", created_at=now))
            await conn.execute(db.machines.insert(), [
                {"id": f"m{i:05d}", "account_id": "acct", "name": f"m{i:05d}",
                 "group_name": GROUP, "labels": {}, "public_key": "-", "facts": {},
                 "agent_version": "1", "registered_at": now, "last_heartbeat_at": now,
                 "heartbeat_interval": 3600.0} for i in range(machines)])
        await runbooks.publish(engine, "acct", "noop", "#!/bin/bash\ntrue\n", kind=None,
                               filename="noop.sh", description="", param_specs=[],
                               log_verbose=False, log_progress=False)
        values = await jobs.prepare(engine, "acct", "noop", GROUP, {})
        cpu0 = time.process_time()
        await fanout.start(engine, "acct", values, concurrency, None)
        start_cpu = time.process_time() - cpu0
        queued = sa.select(db.jobs.c.target_machine_id, db.jobs.c.id).where(
            db.jobs.c.parent_id == values["id"], db.jobs.c.status == "Queued")
        end_cpu, ends = 0.0, 0
        while True:
            async with engine.connect() as conn:
                batch = (await conn.execute(queued)).all()
            if not batch:
                break
            for machine_id, job_id in batch:
                machine = SimpleNamespace(id=machine_id, account_id="acct", group_name=GROUP,
                                          heartbeat_interval=3600.0)
                async with engine.begin() as conn:
                    await jobs.claim(conn, machine, 1)
                cpu = time.process_time()
                await jobs.report(engine, machine_id, job_id, 1, started=True, end={
                    "exit_code": 0, "signal": None, "reason": "exit code 0"})
                end_cpu += time.process_time() - cpu
                ends += 1
        shown = await jobs.get(engine, "acct", values["id"])
    finally:
        await engine.dispose()
    return {"machines": machines, "ends": ends, "status": shown["status"],
            "start_s": start_cpu, "end_ms": end_cpu / max(ends, 1) * 1000}


def in_process(args: argparse.Namespace) -> int:
    import asyncio

    from bench._common import database

    sizes = [int(v) for v in str(args.machines).split(",") if v.strip()]
    concurrency = args.concurrency.split(",")[0].strip()
    print(f"fan-out in this process, --max-concurrency {concurrency}, {args.database}; "
          f"{load()}", flush=True)
    print("| machines | parent | fanout.start CPU | CPU per child's end (report) |")
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="outpost-fanout-") as tmp, \
                database(args.database, Path(tmp)) as url:
            r = asyncio.run(_in_process(url, size, concurrency))
        print(f"| {r['machines']} | {r['status']} ({r['ends']} ends) | "
              f"{r['start_s'] * 1000:.0f} ms | {r['end_ms']:.2f} ms |", flush=True)
    print(f"done; {load()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machines", default="1000",
                        help="machines in the group (--in-process: comma-separated sizes)")
    parser.add_argument("--in-process", action="store_true",
                        help="measure the hub's work per child in this process (above)")
    parser.add_argument("--concurrency", default="100,10%",
                        help="--max-concurrency values, comma-separated (default 100,10%%)")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args(argv)
    if args.in_process:
        return in_process(args)
    args.machines = int(args.machines)
    values = [v.strip() for v in args.concurrency.split(",") if v.strip()]
    _raise_fd_limit()
    print(f"fan-out benchmark: {args.machines} simulated machines, --max-concurrency "
          f"{', '.join(values)}, {args.database}; {load()}", flush=True)
    time_bound(args.max_seconds)
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="outpost-fanout-") as tmp, \
                hubs(args.database, Path(tmp), 1, []) as running:
            hub = running[0]
            with Fleet([hub.url], hub.data_dir / "ca.pem", hub.account_id, hub.primary_key,
                       group=GROUP, n=args.machines) as fleet:
                rate = fleet.wait_registered(timeout=args.max_seconds)
                print(f"registered {args.machines} machines ({rate:.0f}/s)", flush=True)
                for value in values:
                    r = run_one(hub, fleet, args.machines, value, args.max_seconds)
                    results.append(r)
                    print(f"--max-concurrency {value} ({r['max_concurrency']}): "
                          f"{r['children']} children {r['status']} {r['counts']} in "
                          f"{r['wall_s']:.2f} s ({r['children'] / r['wall_s']:.0f} "
                          f"children/s; submit answered in {r['submit_s'] * 1000:.0f} ms; "
                          f"hub: created -> ended {r['hub_s']:.2f} s); most on machines at "
                          f"once {r['most_at_once']} (limit {r['max_concurrency']}); "
                          f"claimed by the fleet {r['claimed']}/{r['children']}, one per "
                          f"machine: {r['one_per_machine']}; hub CPU {r['hub_cpu_s']:.1f} s "
                          f"({r['hub_cpu_s'] / r['children'] * 1000:.1f} ms a child); "
                          f"{load()}", flush=True)
                    if r["refused"]:
                        print(f"  {len(r['refused'])} looks refused, the first: "
                              f"{r['refused'][0]}", flush=True)
    except TimeBound as exc:
        print(f"stopped: {exc}")
    finally:
        cancel_time_bound()
    if results:
        print("\n| machines | --max-concurrency | all ended in | children/s | most at once "
              "| hub CPU per child |")
        for r in results:
            print(f"| {r['children']} | {r['concurrency']} ({r['max_concurrency']}) | "
                  f"{r['wall_s']:.2f} s | {r['children'] / r['wall_s']:.0f} | "
                  f"{r['most_at_once']} | {r['hub_cpu_s'] / r['children'] * 1000:.1f} ms |")
    print(f"done; {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
