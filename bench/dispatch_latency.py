"""Dispatch latency: from the answer to POST /v1/jobs to the runbook's process starting.

Starts a real hub and one real agent on 127.0.0.1, publishes a bash runbook that writes
bash's $EPOCHREALTIME (read in the runbook's first command, no fork) to a file named by its
job id, and starts jobs one at a time: each job is submitted with httpx, its stamp waited
for, then its completion, before the next. Latency = stamp - time the POST answer arrived.
Targets: p50 <= 15 ms, p99 <= 60 ms, on SQLite and on PostgreSQL.

    python bench/dispatch_latency.py [--database sqlite|postgres|both] [--jobs 1000]
        [--variant default|trace|nodelay|uvloop|nodelay+trace ...] [--py-spy DIR]

A variant is "default" (the code as it is) or a "+"-joined set of bench/_hook settings for
both the hub and the agent: "trace" stamps the hub's claim and the agent's spawn and prints
where the milliseconds go; "nodelay" sets TCP_NODELAY on the hub's accepted connections and
"uvloop" runs the hub on uvloop, "pool1" gives the hub one SQLite connection, "sniffio"
gives both a stand-in sniffio module (experiments for suggested changes; src/ unchanged);
"nopressure" sets the agent's max_cpu_percent to 100 (its CPU backpressure off).
Several --variant run one after another, each on a fresh hub, agent and database; the
ratios are to the first. Exits 0 even when a target is missed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import (  # noqa: E402
    Cpu,
    Hooks,
    TimeBound,
    cancel_time_bound,
    database,
    finish_py_spy,
    load,
    percentile,
    publish,
    py_spy,
    query,
    stack,
    time_bound,
    verdict,
    where,
)

FINAL = ("Completed", "Failed", "Stopped")
P50_TARGET, P99_TARGET = 15.0, 60.0
SETTINGS = ("default", "trace", "nodelay", "uvloop", "pool1", "sniffio", "nopressure")


def variant_name(text: str) -> str:
    parts = text.split("+")
    if not all(p in SETTINGS for p in parts):
        raise argparse.ArgumentTypeError(f"a variant joins {', '.join(SETTINGS)} with '+'")
    return text


def hooks_for(variant: str, root: Path) -> Hooks:
    parts = set(variant.split("+"))
    hooks = Hooks()
    if "trace" in parts:
        hooks.trace = root / "trace.log"
    if "uvloop" in parts:
        # The hub only: uvloop's subprocess_exec refuses the user/group/extra_groups
        # arguments the agent's runner passes (even as None), so every job would fail.
        hooks.uvloop = {"hub"}
    if "nodelay" in parts:
        hooks.nodelay = {"hub", "agent"}
    if "pool1" in parts:
        hooks.sqlite_pool = 1
    if "sniffio" in parts:
        hooks.sniffio = {"hub", "agent"}
    return hooks


def agent_config_for(variant: str) -> dict[str, Any]:
    """"nopressure": the agent's CPU backpressure (max_cpu_percent, 95 by default) off, so a
    machine kept busy by the benchmark itself and by other work does not stop claiming."""
    return {"max_cpu_percent": 100} if "nopressure" in variant.split("+") else {}


def wait_file(path: Path, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = path.read_text()
            if text.endswith("\n"):
                return text
        except FileNotFoundError:
            pass
        time.sleep(0.0005)
    return None


STALL_SECONDS = 10.0  # a job not started by then is reported (with its state) as a stall
GIVE_UP_SECONDS = 60.0  # and one not started by then as lost; the run goes on


def run_one(client: Any, stamps: Path, warm: bool, stalls: list[dict[str, Any]],
            logs: Any) -> dict[str, Any]:
    sent = time.time()
    response = client.post("/v1/jobs", json={"runbook": "stamp", "group": "web"})
    answered = time.time()
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    text = wait_file(stamps / job_id, STALL_SECONDS)
    if text is None:
        machines = client.get("/v1/machines").json()
        why = "; ".join(f"{m.get('name')}: {m.get('status')}, not taking work: "
                        f"{m.get('not_taking_work')}"
                        for m in machines)
        stall = {"id": job_id, "after_s": STALL_SECONDS,
                 "job": client.get(f"/v1/jobs/{job_id}").json(),
                 "logs": f"machines: {why}\n{logs()}"}
        stalls.append(stall)
        text = wait_file(stamps / job_id, GIVE_UP_SECONDS - STALL_SECONDS)
        stall["started_after_s"] = None if text is None else float(text) - answered
        if text is None:
            return {"id": job_id, "sent": sent, "answered": answered, "stamp": None,
                    "status": "lost", "warm": warm}
    stamp = float(text)
    deadline = time.monotonic() + GIVE_UP_SECONDS
    while True:  # the next job starts only after this one has ended
        status = client.get(f"/v1/jobs/{job_id}").json()["status"]
        if status in FINAL or time.monotonic() > deadline:
            break
        time.sleep(0.002)
    return {"id": job_id, "sent": sent, "answered": answered, "stamp": stamp,
            "status": status, "warm": warm}


def measure(db_kind: str, variant: str, jobs: int, warmup: int,
            spy_dir: Path | None, directory: Path | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="outpost-bench-", dir=directory) as tmp:
        root = Path(tmp)
        stamps = root / "stamps"
        stamps.mkdir()
        # A root agent runs the runbook as a job user (docs/security.md): it must reach here.
        os.chmod(root, 0o711)
        os.chmod(stamps, 0o1777)
        hooks = hooks_for(variant, root)
        with database(db_kind, root) as url, \
                stack(root, url, hooks, **agent_config_for(variant)) as st:
            publish(st.hub, "stamp", f'echo "$EPOCHREALTIME" > "{stamps}/$OUTPOST_JOB_ID"\n')
            spies = []
            results: list[dict[str, Any]] = []
            stalls: list[dict[str, Any]] = []

            def logs() -> str:
                return ("--- agent log (end)\n" + st.agent.log()[-1500:]
                        + "--- hub log (end)\n" + st.hub.log()[-1500:])
            with st.hub.client(st.hub.admin_token) as client:
                for _ in range(warmup):
                    results.append(run_one(client, stamps, True, stalls, logs))
                if spy_dir is not None:
                    spy_dir.mkdir(parents=True, exist_ok=True)
                    for role, pid in (("hub", st.hub_pid), ("agent", st.agent_pid)):
                        spies.append(py_spy(pid, spy_dir / f"latency-{db_kind}-{variant}-"
                                            f"{role}.txt", 3600))
                started = time.monotonic()
                cpu = Cpu(st)
                try:
                    for _ in range(jobs):
                        results.append(run_one(client, stamps, False, stalls, logs))
                finally:
                    for spy in spies:
                        finish_py_spy(spy)
                wall = time.monotonic() - started
                used = cpu.used()
            rows = query(url, "SELECT j.id, j.created_at, j.started_at, a.started_at "
                              "FROM jobs j JOIN job_attempts a ON a.job_id = j.id")
            trace = hooks.trace.read_text() if hooks.trace and hooks.trace.exists() else ""
    db = {r[0]: {"created": r[1], "running": r[2], "claimed": r[3]} for r in rows}
    measured = [r for r in results if not r["warm"] and r["stamp"] is not None]
    lost = [r for r in results if not r["warm"] and r["stamp"] is None]
    for r in measured:
        r.update(db[r["id"]])
    return {"database": db_kind, "variant": variant, "results": measured, "wall": wall,
            "trace": trace, "cpu": used, "load": load(), "stalls": stalls, "lost": lost}


def ms(x: float) -> float:
    return x * 1e3


def summary(values: list[float]) -> str:
    return (f"{statistics.median(values):7.2f} {percentile(values, 90):7.2f} "
            f"{percentile(values, 99):7.2f} {max(values):7.2f}")


def report(run: dict[str, Any]) -> None:
    res = run["results"]
    failed = sum(r["status"] != "Completed" for r in res)
    print(f"\n{run['database']} / {run['variant']}: {len(res)} jobs one at a time in "
          f"{run['wall']:.1f} s ({failed} not Completed)")
    print(f"  {'ms':44s} {'p50':>7s} {'p90':>7s} {'p99':>7s} {'max':>7s}")
    rows = [
        ("dispatch latency (answer -> runbook stamp)", [ms(r["stamp"] - r["answered"])
                                                        for r in res]),
        ("  POST /v1/jobs round trip (not counted)", [ms(r["answered"] - r["sent"])
                                                      for r in res]),
        ("hub: job row created -> claimed", [ms(r["claimed"] - r["created"]) for r in res]),
        ("POST answer -> claimed (negative: before)", [ms(r["claimed"] - r["answered"])
                                                       for r in res]),
        ("claimed -> runbook stamp", [ms(r["stamp"] - r["claimed"]) for r in res]),
        ("runbook stamp -> hub marks Running", [ms(r["running"] - r["stamp"]) for r in res]),
    ]
    for label, values in rows:
        print(f"  {label:44s} {summary(values)}")
    for stall in run["stalls"][:3]:
        job = stall["job"]
        later = stall["started_after_s"]
        print(f"  STALL: job {stall['id']} not started {stall['after_s']:g} s after its answer"
              f" (status {job.get('status')}, attempts {len(job.get('attempts', []))}); "
              + ("never started" if later is None else f"started after {later:.1f} s"))
        print("    " + stall["logs"].replace("\n", "\n    ").rstrip())
    if run["stalls"]:
        print(f"  {len(run['stalls'])} stalls, {len(run['lost'])} jobs never started "
              "(those are left out of the percentiles)")
    lat = [ms(r["stamp"] - r["answered"]) for r in res]
    p50, p99 = statistics.median(lat), percentile(lat, 99)
    h, a, c = (x * 1e3 / len(res) for x in run["cpu"])
    print(f"  cpu ms per job: hub {h:.2f} (with this benchmark's GET of the job every 2 ms "
          f"until it ends), agent {a:.2f}, runbook {c:.2f}; {run['load']}")
    print(f"  target p50 <= {P50_TARGET:g} ms: {verdict(p50 <= P50_TARGET)} ({p50:.2f}); "
          f"p99 <= {P99_TARGET:g} ms: {verdict(p99 <= P99_TARGET)} ({p99:.2f})")
    if run["trace"]:
        breakdown(run)


def breakdown(run: dict[str, Any]) -> None:
    """Where the milliseconds go, from the stamps of bench/_hook (median and p99)."""
    keyed: dict[tuple[str, str], float] = {}
    unkeyed: dict[str, list[float]] = defaultdict(list)
    for line in run["trace"].splitlines():
        event, key, at = line.split()
        if key in ("-", "?"):
            unkeyed[event].append(float(at))
        else:
            for k in key.split(","):
                keyed.setdefault((event, k), float(at))

    def last_before(event: str, t: float) -> float | None:
        best = None
        for at in unkeyed[event]:
            if at <= t and (best is None or at > best):
                best = at
        return best

    def first_after(event: str, t: float) -> float | None:
        best = None
        for at in unkeyed[event]:
            if at >= t and (best is None or at < best):
                best = at
        return best

    steps = [
        "POST answer arrives", "hub.wake", "hub.start.end", "hub.claim.begin",
        "hub.jclaim.begin", "hub.jclaim.end", "hub.claim.end", "hub.poll.return",
        "agent.req.poll.end", "agent.run.begin", "agent.spawn.begin", "agent.spawn.end",
        "runbook stamp",
    ]
    segments: dict[str, list[float]] = defaultdict(list)
    for r in run["results"]:
        j = r["id"]
        t: dict[str, float | None] = {
            "POST answer arrives": r["answered"], "runbook stamp": r["stamp"]}
        for e in ("hub.start.end", "hub.jclaim.end", "hub.claim.end", "hub.poll.return",
                  "agent.req.poll.end", "agent.run.begin", "agent.spawn.begin",
                  "agent.spawn.end"):
            t[e] = keyed.get((e, j))
        if t["hub.start.end"] is None or t["hub.jclaim.end"] is None:
            continue
        # The wake-up is sent inside the transaction that stores the job (hub/notify.py).
        t["hub.wake"] = last_before("hub.wake", t["hub.start.end"])
        t["hub.claim.begin"] = last_before("hub.claim.begin", t["hub.jclaim.end"])
        t["hub.jclaim.begin"] = last_before("hub.jclaim.begin", t["hub.jclaim.end"])
        chain = [s for s in steps if s != "POST answer arrives"]
        for a, b in zip(chain, chain[1:], strict=False):
            ta, tb = t[a], t[b]
            if ta is not None and tb is not None:
                segments[f"{a} -> {b}"].append(ms(tb - ta))
        if t["hub.start.end"] is not None:
            segments["(hub.start.end -> POST answer arrives)"].append(
                ms(r["answered"] - t["hub.start.end"]))
            segments["(hub.start.end -> runbook stamp: the sum)"].append(
                ms(r["stamp"] - t["hub.start.end"]))
    print("  where the time goes (bench/_hook stamps; the chain starts when the hub has "
          "stored the job)")
    print(f"  {'ms':44s} {'p50':>7s} {'p90':>7s} {'p99':>7s} {'max':>7s}")
    for label, values in segments.items():
        print(f"  {label:44s} {summary(values)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--variant", action="append", type=variant_name, default=None)
    parser.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                        help="sample the hub and the agent with py-spy into DIR")
    parser.add_argument("--max-seconds", type=float, default=1800.0)
    parser.add_argument("--dir", type=Path, default=None, metavar="DIR",
                        help="where the run's state goes (default: the temporary directory)")
    args = parser.parse_args()
    if args.dir is not None and not args.dir.is_dir():
        parser.error(f"--dir {args.dir}: not a directory")
    print(where(args.dir))
    kinds = ["sqlite", "postgres"] if args.database == "both" else [args.database]
    variants = args.variant or ["default"]
    time_bound(args.max_seconds)
    runs = []
    try:
        for kind in kinds:
            for variant in variants:
                run = measure(kind, variant, args.jobs, args.warmup, args.py_spy, args.dir)
                report(run)
                runs.append(run)
    except TimeBound as exc:
        print(f"\n{exc}; figures above are complete runs only")
    finally:
        cancel_time_bound()
    if len(variants) > 1:
        print("\np50 / p99 relative to the first variant, per database")
        for kind in kinds:
            mine = [r for r in runs if r["database"] == kind]
            if not mine:
                continue
            base = [ms(r["stamp"] - r["answered"]) for r in mine[0]["results"]]
            for run in mine:
                lat = [ms(r["stamp"] - r["answered"]) for r in run["results"]]
                p50 = statistics.median(lat) / statistics.median(base)
                p99 = percentile(lat, 99) / percentile(base, 99)
                print(f"  {kind:8s} {run['variant']:14s} p50 x{p50:.2f}  p99 x{p99:.2f}")
    print(f"\ntargets: p50 <= {P50_TARGET:g} ms, p99 <= {P99_TARGET:g} ms, SQLite and PostgreSQL")


if __name__ == "__main__":
    main()
