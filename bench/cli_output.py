"""The operator's text view of a big job's output: how long `outpost job output ID` takes to
print it, and what the CLI's CPU costs, now that every record is escaped for the terminal
(control characters shown as `\\x1b`) and a long line's pieces are joined.

Starts a real hub (SQLite) and one real agent on 127.0.0.1, runs one python runbook that
prints --lines lines of about 100 bytes (one in ten carries an escape sequence, one in
20,000 is 2.5 MB, longer than a record, and comes back in three pieces), then runs the
CLI's text view and its --json view to /dev/null --rounds times each. With --compare SRC (the `src`
directory of another build, e.g. a git worktree of an older commit), the other build's
CLI runs against the same hub and job, alternately with this one, and the ratio is printed.

    python bench/cli_output.py [--lines 200000] [--rounds 3] [--compare /tmp/old/src]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import (  # noqa: E402
    TimeBound,
    cancel_time_bound,
    database,
    load,
    publish,
    stack,
    time_bound,
    wait_until,
)
from tests.support import clean_env  # noqa: E402

RUNBOOK = """\
import sys
n = int(sys.argv[1]) if len(sys.argv) > 1 else {lines}
w = sys.stdout.write
for i in range(n):
    if i % 20000 == 19999:
        w("L" * 2500000 + "\\n")  # longer than a record (1 MiB): comes back in 3 pieces
    elif i % 10 == 9:
        w(f"{{i:09d}} \\x1b[31mred\\x1b[0m and a bell \\x07 " + "x" * 60 + "\\n")
    else:
        w(f"{{i:09d}} " + "y" * 89 + "\\n")
"""


def run_cli(src: Path | None, args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the CLI process) for one run, stdout to /dev/null."""
    run_env = dict(env)
    if src is not None:
        run_env["PYTHONPATH"] = str(src)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(os.devnull, "wb") as sink:
        done = subprocess.run([sys.executable, "-m", "outpost", *args], stdout=sink,
                              stderr=subprocess.PIPE, env=run_env, timeout=600)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"outpost {' '.join(args)} failed: {done.stderr.decode()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare", type=Path, default=None,
                        help="the src directory of another build, run alternately")
    parser.add_argument("--max-seconds", type=float, default=900)
    args = parser.parse_args()
    time_bound(args.max_seconds)
    builds: list[tuple[str, Path | None]] = [("this build", None)]
    if args.compare is not None:
        builds.append((f"--compare {args.compare}", args.compare.resolve()))
    try:
        with tempfile.TemporaryDirectory(prefix="outpost-bench-") as tmp, \
                database("sqlite", Path(tmp)) as url, stack(Path(tmp), url) as st:
            publish(st.hub, "printer", RUNBOOK.format(lines=args.lines), kind="python")
            job = st.hub.api("POST", "/v1/jobs", json={"runbook": "printer", "group": "web",
                                                       "timeout": 600}).json()
            wait_until(lambda: st.hub.api("GET", f"/v1/jobs/{job['id']}").json()["status"]
                       == "Completed", 300, 0.5, "the printing job to complete")
            records = 0
            after = -1
            while True:
                page = st.hub.api("GET", f"/v1/jobs/{job['id']}/output",
                                  params={"after": after, "limit": 10000}).json()
                records += len(page)
                if len(page) < 10000:
                    break
                after = page[-1]["seq"]
            env = clean_env()
            base = ["job", "output", job["id"], "--data-dir", str(st.hub.data_dir)]
            print(f"job {job['id']}: {args.lines} lines, {records} records; load {load()}")
            results: dict[tuple[str, str], list[tuple[float, float]]] = {}
            for _ in range(args.rounds):
                for name, src in builds:
                    for view, extra in (("text", []), ("--json", ["--json"])):
                        results.setdefault((name, view), []).append(
                            run_cli(src, base + extra, env))
            print(f"{'build':<40} {'view':<7} {'wall s (median, min-max)':<28} "
                  f"{'CLI CPU s (median)'}")
            for (name, view), runs in results.items():
                walls = [w for w, _ in runs]
                cpus = [c for _, c in runs]
                print(f"{name:<40} {view:<7} {statistics.median(walls):6.2f} "
                      f"({min(walls):.2f}-{max(walls):.2f}){'':<11} "
                      f"{statistics.median(cpus):6.2f}")
            if args.compare is not None:
                for view in ("text", "--json"):
                    mine = statistics.median(c for _, c in results[("this build", view)])
                    other = statistics.median(c for _, c in results[(builds[1][0], view)])
                    print(f"{view}: this build's CLI CPU / the other's = {mine / other:.2f}")
    except TimeBound as exc:
        print(f"stopped: {exc}")
        return 1
    finally:
        cancel_time_bound()
    return 0


if __name__ == "__main__":
    sys.exit(main())
