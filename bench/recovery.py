"""Disaster recovery: recovery time and the achieved RPO, with the shipped
recovery extension on a real hub (SQLite) and two real agents on this machine: ``src``
(protected with ``outpost protect``) and ``dst`` (group ``dr``, its target group).

Recovery time. A tree of mixed files (``--megabytes``, 1024 by default; bench/backup_store.py's
``make_tree``) on ``src`` gets its first point from ``outpost protect src --paths TREE --rpo 1h
--interval 10s --target-group dr --post-failover-runbook post-failover --wait``, then is
protected again without ``--interval`` (an RPO of an hour, its next point half an hour away:
no point runs during the rounds). Then, ``--rounds`` times, alternately:

- ``failover``: ``outpost failover src --to dst --test --point ID --target-dir DIR --wait``,
  a drill: the recover operation on dst (a restore grant to src's repository; restic
  directly to the hub with 0.17 or later), then the post-failover runbook as a job on dst;
  timed from the command's start to its end, the command's own Python start included, and
  from the action's creation to its end as the hub records them;
- ``recover``: the same point's ``recover`` operation asked on dst alone (what the failover's
  first step asks), from the request to the operation's end as the hub reports it (polled
  every 50 ms): the difference to ``failover`` is the action's own steps and the runbook;
- ``restic``: plain ``restic restore`` of the same data from a local repository
  (``restic -r DIR``, one ``restic backup`` of the tree made beforehand).

Each restored tree is compared with the source once per kind (SHA-256 of every file) and
deleted.

Achieved RPO. ``outpost protect`` again with ``--rpo`` (5m; its point pass asks a point every
half of it) while a writer changes ``--write-mb-per-minute`` (10) MB a minute under the
source's tree (a 1 MiB file rewritten every 6 s, over 20 files). Every second, the age of
the newest point (``last_point_age_seconds`` of ``GET /v1/machines/src/protection``: now
minus restic's time of the newest point in the catalog, so the data it holds is as of that
time) and the protection's health are sampled for ``--minutes``; p50, p99 and the largest
age against the RPO (target: p99 under the RPO).

    .venv/bin/python bench/recovery.py [--megabytes 1024] [--rounds 3] [--rpo 5m]
        [--minutes 20] [--only recovery|rpo|both]

A short run: ``--rpo 60s --minutes 4``. Not a test: it exits 0 when a target is missed, and
gives up after ``--max-seconds``. The agents' CPU threshold is 100 % (as the tests'): on a
shared 2-core machine the default would hold points back for other work's load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._common import (  # noqa: E402
    TimeBound,
    _stop,
    cancel_time_bound,
    load,
    percentile,
    time_bound,
    verdict,
)
from bench.backup_store import digest_tree, make_tree  # noqa: E402
from tests.support import (  # noqa: E402
    Agent,
    Hub,
    clean_env,
    init_hub,
    registered_agent,
    wait_until,
)

PASSWORD = "bench recovery password"
ACTIVE = ("Queued", "Waiting", "Running")


def seconds_of(text: str) -> float:
    """``5m``, ``60s``, ``1h`` or a number of seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    if text and text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


class Fleet:
    """The hub, machine ``src`` (role source, the tree) and ``dst`` (role target)."""

    def __init__(self, root: Path, source: Path) -> None:
        self.root, self.source = root, source
        self.hub: Hub = init_hub(root / "hub", f"sqlite:///{root / 'hub.db'}")
        self.agents: dict[str, Agent] = {}

    def start(self) -> None:
        self.hub.start()
        for name, group in (("src", "web"), ("dst", "dr")):
            agent = registered_agent(self.hub, self.root, name, group)
            self.agents[name] = agent.start()
        wait_until(lambda: all(m["status"] == "Healthy" for m in self.hub.machines().values()),
                   60, what="both agents Healthy")
        self.ids = {name: m["id"] for name, m in self.hub.machines().items()}
        stored = self.hub.api("POST", "/v1/runbooks", json={
            "name": "post-failover", "content": 'echo "the application started"\n',
            "type": "bash"})
        assert stored.status_code == 201, stored.text

    def protect(self, rpo: str, *extra: str) -> float:
        """``outpost protect src ...``, then the extension Ready again on both machines (a
        changed goal runs its enable again); the seconds the command took."""
        started = time.perf_counter()
        done = self.hub.cli("protect", "src", "--paths", str(self.source), "--rpo", rpo,
                            "--target-group", "dr", "--post-failover-runbook",
                            "post-failover", *extra, timeout=3600)
        assert done.returncode == 0, done.stdout + done.stderr
        took = time.perf_counter() - started
        for name in ("src", "dst"):
            wait_until(lambda name=name: self._ready(name), 180, 0.2,
                       what=f"recovery Ready on {name}")
        return took

    def points(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.hub.api(
            "GET", "/v1/backups?machine=src&kind=recovery").json()
        return found

    def _ready(self, name: str) -> bool:
        rows = self.hub.api("GET", f"/v1/machines/{name}/extensions").json()
        return any(r["name"] == "recovery" and r["state"] == "Ready" for r in rows)

    def ask(self, machine: str, operation: str, **params: Any) -> str:
        answer = self.hub.api("POST", f"/v1/machines/{machine}/extensions/recovery/operations/"
                              f"{operation}", json={"params": params})
        assert answer.status_code == 201, answer.text
        return str(answer.json()["id"])

    def wait(self, op_id: str, timeout: float = 3600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            op: dict[str, Any] = self.hub.api("GET", f"/v1/extension-operations/{op_id}").json()
            if op["status"] not in ACTIVE:
                if op["status"] != "Succeeded":
                    raise RuntimeError(f"operation {op_id} {op['status']}: {op.get('code')} "
                                       f"{op.get('message')}")
                return op
            time.sleep(0.05)
        raise RuntimeError(f"operation {op_id} did not end in {timeout:g} s")

    def stop(self) -> None:
        for agent in self.agents.values():
            _stop(agent.proc)
        _stop(self.hub.proc)


def restic_local(args: list[str], repo: Path) -> float:
    env = clean_env(RESTIC_PASSWORD=PASSWORD, RESTIC_CACHE_DIR=str(repo.parent / "cache"))
    started = time.perf_counter()
    subprocess.run(["restic", "-r", str(repo), *args], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - started


def recovery_time(fleet: Fleet, args: argparse.Namespace) -> None:
    # The hub's point pass, finding the extension not Ready yet at a protection's first
    # turn, moves that turn a whole interval on: a short interval for the first point, then
    # the RPO of an hour alone (its next turn half an hour away) so that no point runs
    # during the rounds.
    took = fleet.protect("1h", "--interval", "10s", "--wait")
    point = fleet.points()[0]
    fleet.protect("1h")
    print(f"outpost protect --interval 10s --wait (the first point of src: {point['files']} files, "
          f"{point['total_bytes'] / 2**20:.0f} MiB, restic's own {point['duration_seconds']:.1f}"
          f" s): {took:.1f} s; {load()}", flush=True)
    local = fleet.root / "local-repo"
    restic_local(["init"], local)
    took = restic_local(["backup", "--tag", "bench", str(fleet.source)], local)
    print(f"local repository: restic backup in {took:.1f} s", flush=True)
    snapshots = subprocess.run(
        ["restic", "-r", str(local), "snapshots", "--json"], check=True, text=True,
        capture_output=True, env=clean_env(RESTIC_PASSWORD=PASSWORD)).stdout
    local_id = json.loads(snapshots)[-1]["id"]
    expected = digest_tree(fleet.source)
    times: dict[str, list[float]] = {"failover": [], "action": [], "recover": [], "restic": []}
    checked: set[str] = set()
    for number in range(args.rounds):
        for how in ("failover", "recover", "restic"):
            target = fleet.root / f"restored-{how}"
            began = time.perf_counter()
            if how == "failover":
                done = fleet.hub.cli("failover", "src", "--to", "dst", "--test", "--point",
                                     point["snapshot_id"], "--target-dir", str(target),
                                     "--wait", "--json", timeout=3600)
                seconds = time.perf_counter() - began
                assert done.returncode == 0, done.stdout + done.stderr
                action = fleet.hub.api("GET", "/v1/recovery-actions?machine=src").json()[0]
                assert action["status"] == "Succeeded" and action["kind"] == "test", action
                times["action"].append(action["ended_at"] - action["created_at"])
            elif how == "recover":
                fleet.wait(fleet.ask("dst", "recover", point=point["snapshot_id"],
                                     target=str(target), source_machine_id=fleet.ids["src"],
                                     source_machine="src"))
                seconds = time.perf_counter() - began
            else:
                seconds = restic_local(["restore", local_id, "--target", str(target)], local)
            times[how].append(seconds)
            if how not in checked:
                got = digest_tree(target / str(fleet.source).lstrip("/"))
                assert got == expected, f"{how}: the restored tree differs from the source"
                checked.add(how)
            shutil.rmtree(target)
            extra = f" (the action: {times['action'][-1]:.2f} s)" if how == "failover" else ""
            print(f"round {number + 1} {how:8}: {seconds:6.2f} s{extra}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["restic"]
    print()
    print(f"| {point['files']} files, {args.megabytes} MiB, on another machine | median s | "
          "MiB/s | / plain restic |")
    print("| --- | --- | --- | --- |")
    for key, label in (("failover", "`outpost failover --test --wait` (command, to the "
                        "runbook's end)"),
                       ("action", "the failover action, created to ended (hub's times)"),
                       ("recover", "the recover operation alone"),
                       ("restic", "plain `restic restore`, local repository")):
        print(f"| {label} | {med[key]:.2f} | {args.megabytes / med[key]:.0f} | "
              f"{med[key] / base:.2f} |")
    print(f"({args.rounds} rounds, alternating; {load()})", flush=True)


class Writer(threading.Thread):
    """Rewrites a 1 MiB file under the source every 60/rate seconds (20 files in turn)."""

    def __init__(self, where: Path, mb_per_minute: float) -> None:
        super().__init__(name="writer", daemon=True)
        self.where, self.every = where, 60.0 / mb_per_minute
        self.done = threading.Event()
        self.written = 0
        where.mkdir(parents=True, exist_ok=True)

    def run(self) -> None:
        n = 0
        while not self.done.wait(self.every):
            path = self.where / f"w{n % 20:02d}.bin"
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(os.urandom(1024 * 1024))
            os.replace(tmp, path)
            self.written += 1
            n += 1


def achieved_rpo(fleet: Fleet, args: argparse.Namespace) -> None:
    rpo = seconds_of(args.rpo)
    since = time.time()
    fleet.protect(args.rpo)
    # steady state: from the first point the new protection's pass took
    wait_until(lambda: any(p["created_at"] > since for p in fleet.points()), rpo * 2, 0.5,
               what="the first point of the new protection")
    print(f"\nRPO {args.rpo} ({rpo:g} s): outpost protect's point pass (a point every "
          f"{rpo / 2:g} s), a writer changing {args.write_mb_per_minute:g} MB a minute, for "
          f"{args.minutes:g} minutes; {load()}", flush=True)
    writer = Writer(fleet.source / "busy", args.write_mb_per_minute)
    writer.start()
    ages: list[float] = []
    health: Counter[str] = Counter()
    seen: set[str] = set()
    end = time.monotonic() + args.minutes * 60
    while time.monotonic() < end:
        shown = fleet.hub.api("GET", "/v1/machines/src/protection").json()
        if shown.get("last_point_age_seconds") is not None:
            ages.append(float(shown["last_point_age_seconds"]))
        health[shown["health"]] += 1
        if shown["health"] != "Protecting" and shown["message"] not in seen:
            seen.add(shown["message"])
        time.sleep(1)
    writer.done.set()
    points = [p for p in fleet.points() if p["created_at"] >= time.time() - args.minutes * 60 - 5]
    durations = [float(p["duration_seconds"]) for p in points] or [0.0]
    p50, p99 = percentile(ages, 50), percentile(ages, 99)
    print()
    print("| RPO | points | point duration (median, max s) | newest point's age p50 | p99 | "
          "max | p99 under the RPO |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {rpo:g} s | {len(points)} | {statistics.median(durations):.1f}, "
          f"{max(durations):.1f} | {p50:.1f} s | {p99:.1f} s | {max(ages):.1f} s | "
          f"{verdict(p99 < rpo)} |")
    print(f"({len(ages)} samples, one a second; health {dict(health)}; {writer.written} MiB "
          f"written; {load()})", flush=True)
    for message in sorted(seen)[:5]:
        print(f"  not Protecting: {message}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rpo", default="5m")
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--write-mb-per-minute", type=float, default=10)
    parser.add_argument("--only", choices=("recovery", "rpo", "both"), default="both")
    parser.add_argument("--dir", type=Path, default=None, help="where the tree, the hub "
                        "and the repositories go (default: a new directory in /var/tmp)")
    parser.add_argument("--max-seconds", type=float, default=7200)
    args = parser.parse_args()
    if shutil.which("restic") is None:
        print("restic is not installed (apt-get install restic)")
        return 0
    root = Path(tempfile.mkdtemp(prefix="outpost-bench-recovery-", dir=args.dir or "/var/tmp"))
    fleet: Fleet | None = None
    time_bound(args.max_seconds)
    try:
        source = root / "source"
        files = make_tree(source, args.megabytes)
        print(f"tree: {files} files, {args.megabytes} MiB; {load()}", flush=True)
        fleet = Fleet(root, source)
        fleet.start()
        if args.only in ("recovery", "both"):
            recovery_time(fleet, args)
        if args.only in ("rpo", "both"):
            achieved_rpo(fleet, args)
    except TimeBound as exc:
        print(f"gave up: {exc}")
    finally:
        cancel_time_bound()
        if fleet is not None:
            fleet.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
