"""What submitting a job costs the hub: CPU per POST /v1/jobs, and per job in a batch.

Starts a real hub and one real agent on 127.0.0.1, pauses the agent (SIGSTOP) so that only
the submits run, and sends --jobs jobs from 4 concurrent httpx clients, first one a request
(POST /v1/jobs), then --batch a request (POST /v1/jobs/batch). Prints requests a second and
the hub's CPU milliseconds per job (psutil) for each. No target: it shows where the hub's
share of a per-job submit goes when compared with bench/throughput.py.

    python bench/submit_cost.py [--jobs 2000] [--batch 100] [--database sqlite|postgres]
        [--dir DIR] [--py-spy DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import (  # noqa: E402
    Hooks,
    Stack,
    TimeBound,
    cancel_time_bound,
    database,
    finish_py_spy,
    load,
    publish,
    py_spy,
    stack,
    submit_noops,
    time_bound,
    where,
)

CLIENTS = 4


def measure(st: Stack, count: int, batch: int, spy_dir: Path | None, tag: str
            ) -> tuple[float, float]:
    """(jobs a second, hub CPU ms a job) for ``count`` jobs submitted ``batch`` a request."""
    hub = psutil.Process(st.hub_pid)
    spy = py_spy(st.hub_pid, spy_dir / f"submit-{tag}-hub.txt", 3600) if spy_dir else None
    before, started = hub.cpu_times(), time.monotonic()
    try:
        asyncio.run(submit_noops(st, count, CLIENTS, batch))
    finally:
        finish_py_spy(spy)
    after, wall = hub.cpu_times(), time.monotonic() - started
    cpu = (after.user + after.system) - (before.user + before.system)
    return count / wall, cpu * 1e3 / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=100, metavar="N",
                        help="jobs a batch request carries, 2 to 1000")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--dir", type=Path, default=None, metavar="DIR",
                        help="where the run's state goes (default: the temporary directory)")
    parser.add_argument("--py-spy", type=Path, default=None, metavar="DIR")
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args()
    if not 2 <= args.batch <= 1000:
        parser.error("--batch must be between 2 and 1000")
    if args.dir is not None and not args.dir.is_dir():
        parser.error(f"--dir {args.dir}: not a directory")
    if args.py_spy is not None:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    time_bound(args.max_seconds)
    try:
        with tempfile.TemporaryDirectory(prefix="outpost-bench-", dir=args.dir) as tmp:
            root = Path(tmp)
            with database(args.database, root) as url, stack(root, url, Hooks()) as st:
                publish(st.hub, "noop", "true\n")
                os.kill(st.agent_pid, signal.SIGSTOP)  # only the submits run
                try:
                    measure(st, min(200, args.jobs), 1, None, "")  # warm-up
                    single = measure(st, args.jobs, 1, args.py_spy, "single")
                    batched = measure(st, args.jobs, args.batch, args.py_spy, "batch")
                finally:
                    os.kill(st.agent_pid, signal.SIGCONT)
        print(f"\n{args.database}: {args.jobs} jobs from {CLIENTS} clients, the agent paused")
        print(f"  {'submit':32s} {'jobs/s':>8s}  {'hub cpu ms/job':>15s}")
        print(f"  {'POST /v1/jobs, one a request':32s} {single[0]:8.0f}  {single[1]:15.3f}")
        print(f"  {f'POST /v1/jobs/batch, {args.batch} a request':32s} {batched[0]:8.0f}  "
              f"{batched[1]:15.3f}")
        print(f"  batch / single hub CPU per job: {batched[1] / single[1]:.2f}")
        print(f"  {load()}")
        print(f"  {where(args.dir)}")
    except TimeBound as exc:
        print(f"\n{exc}")
    finally:
        cancel_time_bound()


if __name__ == "__main__":
    main()
