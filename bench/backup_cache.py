"""A snapshot after the first, through the hub, with restic's cache kept since the last
command (as the backup extension now runs restic: the cache in its data directory) against a
new cache for the command (as it ran before), alternating in one run.

A tree of mixed files (``--megabytes``, 1024 by default; bench/backup_store.py makes it) is
backed up once to a real hub process (restic directly, 0.17 or later); then, ``--rounds``
times, a few of its files change (``--changed``, 10 by default) and it is backed up again with
each cache in turn. Printed: the medians of wall time and of the hub's requests per snapshot.

    .venv/bin/python bench/backup_cache.py --megabytes 1024 --rounds 3

Not a test: it exits 0 whatever it measures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.backup_store import PASSWORD, _answered, make_tree, run  # noqa: E402
from outpost.backup import transport  # noqa: E402
from tests.support import clean_env, init_hub, register  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--changed", type=int, default=10)
    args = parser.parse_args()
    found = shutil.which("restic")
    version = transport.restic_version(found) if found else None
    if version is None or version < transport.DIRECT_SINCE:
        print("restic 0.17 or later is needed (it reaches the hub directly)")
        return 0
    root = Path(tempfile.mkdtemp(prefix="outpost-bench-cache-", dir="/var/tmp"))
    hub = None
    try:
        source = root / "source"
        files = make_tree(source, args.megabytes)
        hub = init_hub(root / "hub", f"sqlite:///{root / 'hub.db'}")
        hub.start()
        assert register(hub, root / "machine", "bench").returncode == 0
        issued = hub.api("POST", "/v1/machines/bench/backup-token", json={}).json()
        opened = transport.connection("direct", hub.url, issued["machine_id"],
                                      str(hub.data_dir / "ca.pem"), issued["token"], [])
        env = clean_env(RESTIC_PASSWORD=PASSWORD, **opened.env)
        server = psutil.Process(hub.proc.pid) if hub.proc is not None else None
        kept = root / "kept-cache"
        restic = ["restic", *opened.args]
        run([*restic, "--cache-dir", str(kept), "init"], env)
        run([*restic, "--cache-dir", str(kept), "backup", "--quiet", str(source)], env)
        print(f"tree: {files} files, {args.megabytes} MiB, backed up once; then "
              f"{args.changed} files changed before each snapshot; load average "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        every = sorted(p for p in source.rglob("*") if p.is_file())
        timings: dict[str, list[float]] = {"kept": [], "new": []}
        requests: dict[str, list[int]] = {"kept": [], "new": []}
        turn = 0
        for number in range(args.rounds):
            for how in (("kept", "new") if number % 2 == 0 else ("new", "kept")):
                for path in every[turn * args.changed:(turn + 1) * args.changed]:
                    with path.open("ab") as fh:
                        fh.write(os.urandom(4096))
                turn += 1
                cache = kept if how == "kept" else root / f"new-cache-{turn}"
                before = _answered(hub)
                elapsed, _, _, _ = run([*restic, "--cache-dir", str(cache), "backup",
                                        "--quiet", str(source)], env, server)
                timings[how].append(elapsed)
                requests[how].append(_answered(hub) - before - 1)
                shutil.rmtree(root / f"new-cache-{turn}", ignore_errors=True)
                print(f"round {number + 1} {how:4} cache: {elapsed:6.2f} s, "
                      f"{requests[how][-1]} requests", flush=True)
        kept_s, new_s = statistics.median(timings["kept"]), statistics.median(timings["new"])
        print(f"\nmedians: kept cache {kept_s:.2f} s ({statistics.median(requests['kept']):.0f} "
              f"requests), new cache {new_s:.2f} s "
              f"({statistics.median(requests['new']):.0f} requests): {new_s / kept_s:.2f}x")
    finally:
        if hub is not None:
            hub.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
