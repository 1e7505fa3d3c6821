"""What a ``/metrics`` scrape costs the hub with many machines: the machines' statuses
counted by the database (``machines.counts_by_status``) against fetching every machine's
row and judging it in Python (``machines.status``, as the scrape did before), alternating in
one run, in this process, on SQLite (the hub runs SQLite statements on its event loop, so
this is how long a scrape holds the loop) and optionally PostgreSQL.

    .venv/bin/python bench/metrics_scrape.py --machines 10000 [--database postgres]

Not a test: it prints medians of ``--repeat`` timings of each.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from outpost.hub import machines  # noqa: E402
from outpost.hub.db import machines as machine_rows  # noqa: E402
from tests.inproc import running_hub  # noqa: E402


async def by_rows(engine: sa.ext.asyncio.AsyncEngine) -> dict[str, int]:
    """The scrape as it was: every row to Python."""
    now = time.time()
    async with engine.connect() as conn:
        rows = await conn.execute(sa.select(
            machine_rows.c.heartbeat_interval, machine_rows.c.last_heartbeat_at,
            machine_rows.c.registered_at, machine_rows.c.stopped_at))
        return dict(Counter(machines.status(row, now) for row in rows))


async def main_async(args: argparse.Namespace) -> None:
    url = None
    stack = None
    if args.database == "postgres":
        from tests.conftest import postgres_database
        stack = postgres_database(migrated=True)
        url = stack.__enter__()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            async with running_hub(Path(tmp), url) as hub:
                await hub.machine("template")
                engine = hub.hub.engine
                async with engine.begin() as conn:
                    row = (await conn.execute(sa.select(machine_rows).where(
                        machine_rows.c.name == "template"))).mappings().one()
                    now = time.time()
                    copies = []
                    for n in range(args.machines - 1):
                        copy = dict(row)
                        copy.update(id=str(uuid.uuid4()), name=f"m{n:06d}",
                                    public_key=f"{n:064x}",
                                    last_heartbeat_at=now - (n % 400))
                        copies.append(copy)
                    for start in range(0, len(copies), 1000):
                        await conn.execute(machine_rows.insert(), copies[start:start + 1000])
                ways = {"rows in Python (before)": by_rows,
                        "counted by the database": machines.counts_by_status}
                timings: dict[str, list[float]] = {name: [] for name in ways}
                results = {}
                for _ in range(args.repeat):
                    for name, way in ways.items():
                        began = time.perf_counter()
                        results[name] = await way(engine)
                        timings[name].append(time.perf_counter() - began)
                assert len(set(map(str, map(sorted, (r.items() for r in results.values()))))
                           ) == 1, results
                print(f"{args.machines} machines on {args.database}: "
                      f"{results['counted by the database']}")
                for name, found in timings.items():
                    print(f"  {name:26} median {statistics.median(found) * 1000:7.2f} ms "
                          f"(min {min(found) * 1000:.2f})")
    finally:
        if stack is not None:
            stack.__exit__(None, None, None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machines", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    asyncio.run(main_async(parser.parse_args()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
