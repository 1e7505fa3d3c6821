"""Disaster recovery (issue 14): recovery time and the achieved RPO, with the shipped
recovery extension on a real hub (SQLite) and two real agents on this machine.

Recovery time. A tree of mixed files (``--megabytes``, 1024 by default; bench/backup_store.py's
``make_tree``) on machine ``src`` gets a ``point``; then, ``--rounds`` times, alternately:

- ``recover``: the recovery extension's ``recover`` of that point asked on machine ``dst``
  (a restore grant to src's repository, restic directly to the hub with 0.17 or later), timed
  from the request (``POST .../operations/recover``) to the operation's end as the hub
  reports it (polled every 50 ms);
- ``restic``: plain ``restic restore`` of the same data from a local repository
  (``restic -r DIR``, one ``restic backup`` of the tree made beforehand).

Each restored tree is compared with the source once (SHA-256 of every file) and deleted.
When ``outpost failover`` exists (issue 14's hub side) it is timed instead of the bare
``recover``, from the command to its post-failover runbook's end (``--failover``); otherwise
the output says that the recover operation was timed.

Achieved RPO. A writer changes ``--write-mb-per-minute`` (10) MB a minute under the source's
tree (a 1 MiB file rewritten every 6 s, over 20 files), while points are asked every RPO/2
(the next one asked when the previous one ended, at the earliest RPO/2 after it was asked).
Every second, the age of the newest point (now minus restic's time of the newest point whose
operation succeeded: the data it holds is as of that time) is sampled for ``--minutes``; p50,
p99 and the largest against ``--rpo`` (target: p99 under the RPO).

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
        for name in ("src", "dst"):
            agent = registered_agent(self.hub, self.root, name)
            self.agents[name] = agent.start()
        wait_until(lambda: all(m["status"] == "Healthy" for m in self.hub.machines().values()),
                   60, what="both agents Healthy")
        self.ids = {name: m["id"] for name, m in self.hub.machines().items()}
        for name, settings in (("src", {"role": "source", "paths": [str(self.source)]}),
                               ("dst", {"role": "target"})):
            # what 'outpost extension set recovery --machine NAME ...' sends
            answer = self.hub.api("PUT", f"/v1/extensions/recovery/targets/machine/{name}",
                                  json={"settings": settings, "run_as": "root",
                                        "protected_settings": {"repository_password": PASSWORD}})
            assert answer.status_code == 200, answer.text
            wait_until(lambda name=name: self._ready(name), 180, 0.2,
                       what=f"recovery Ready on {name}")

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


def recovery_time(fleet: Fleet, args: argparse.Namespace) -> str:
    """The point's id; prints each round and the medians."""
    started = time.perf_counter()
    point = fleet.wait(fleet.ask("src", "point"))["result"]
    print(f"first point of src: {point['files']} files, {point['total_bytes'] / 2**20:.0f} "
          f"MiB in {time.perf_counter() - started:.1f} s (restic's own "
          f"{point['duration_seconds']:.1f} s); {load()}", flush=True)
    local = fleet.root / "local-repo"
    restic_local(["init"], local)
    took = restic_local(["backup", "--tag", "bench", str(fleet.source)], local)
    print(f"local repository: restic backup in {took:.1f} s", flush=True)
    snapshots = subprocess.run(
        ["restic", "-r", str(local), "snapshots", "--json"], check=True, text=True,
        capture_output=True, env=clean_env(RESTIC_PASSWORD=PASSWORD)).stdout
    local_id = json.loads(snapshots)[-1]["id"]
    expected = digest_tree(fleet.source)
    via_hub: list[float] = []
    plain: list[float] = []
    checked: set[str] = set()
    print("timed: the recover operation on dst (no 'outpost failover' on this branch)",
          flush=True)
    for number in range(args.rounds):
        for how in ("recover", "restic"):
            target = fleet.root / f"restored-{how}"
            if how == "recover":
                began = time.perf_counter()
                fleet.wait(fleet.ask("dst", "recover", point=point["snapshot_id"],
                                     target=str(target), source_machine_id=fleet.ids["src"],
                                     source_machine="src"))
                seconds = time.perf_counter() - began
                via_hub.append(seconds)
            else:
                seconds = restic_local(["restore", local_id, "--target", str(target)], local)
                plain.append(seconds)
            if how not in checked:
                got = digest_tree(target / str(fleet.source).lstrip("/"))
                assert got == expected, f"{how}: the restored tree differs from the source"
                checked.add(how)
            shutil.rmtree(target)
            print(f"round {number + 1} {how:8}: {seconds:6.2f} s", flush=True)
    a, b = statistics.median(via_hub), statistics.median(plain)
    print()
    print("| recovery of | recover on another machine (median s) | plain restic restore, "
          "local repository (median s) | ratio |")
    print("| --- | --- | --- | --- |")
    print(f"| {point['files']} files, {args.megabytes} MiB | {a:.2f} ({args.megabytes / a:.0f} "
          f"MiB/s) | {b:.2f} ({args.megabytes / b:.0f} MiB/s) | {a / b:.2f} |")
    print(f"({args.rounds} rounds, alternating; {load()})", flush=True)
    return str(point["snapshot_id"])


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
    every = rpo / 2
    print(f"\nRPO {rpo:g} s: a point asked every {every:g} s (by this benchmark: no "
          f"'outpost protect' on this branch), a writer changing {args.write_mb_per_minute:g} "
          f"MB a minute, for {args.minutes:g} minutes; {load()}", flush=True)
    newest: list[float] = []  # restic's time of the newest point that succeeded
    durations: list[float] = []
    failures: list[str] = []
    stop = threading.Event()

    def points() -> None:
        while not stop.is_set():
            asked = time.monotonic()
            try:
                op = fleet.wait(fleet.ask("src", "point"))
                newest.append(float(op["result"]["time"]))
                durations.append(float(op["result"]["duration_seconds"]))
            except (RuntimeError, AssertionError) as exc:
                failures.append(str(exc))
            stop.wait(max(0.0, asked + every - time.monotonic()))

    writer = Writer(fleet.source / "busy", args.write_mb_per_minute)
    writer.start()
    taker = threading.Thread(target=points, name="points", daemon=True)
    taker.start()
    wait_until(lambda: bool(newest), 600, 0.2, what="the first point under load")
    ages: list[float] = []
    end = time.monotonic() + args.minutes * 60
    while time.monotonic() < end:
        ages.append(time.time() - max(newest))
        time.sleep(1)
    stop.set()
    writer.done.set()
    taker.join(timeout=600)
    p50, p99 = percentile(ages, 50), percentile(ages, 99)
    print()
    print("| RPO | points | point duration (median, max s) | newest point's age p50 | p99 | "
          "max | p99 under the RPO |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {rpo:g} s | {len(durations)} | {statistics.median(durations):.1f}, "
          f"{max(durations):.1f} | {p50:.1f} s | {p99:.1f} s | {max(ages):.1f} s | "
          f"{verdict(p99 < rpo)} |")
    print(f"({len(ages)} samples, one a second; {writer.written} MiB written; "
          f"{len(failures)} points failed{': ' + failures[0] if failures else ''}; {load()})",
          flush=True)


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
        else:
            fleet.wait(fleet.ask("src", "point"))
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
