"""Where a test run's time goes: each test's wall time against the CPU time it cost.

``-p tests.cputime --cpu-log=PATH`` appends one JSON line per test to PATH (every xdist
worker to the same file): its id, its wall seconds (setup, call and teardown) and the CPU
seconds of the test process and of the processes it started and waited for (hubs, agents,
CLI commands, the runbooks under the agents), from ``getrusage``, and those the test process's
zygote forked for it (tests/zygote.py reports them). On a machine shared with
other work the wall time swells with the load and the CPU time does not, so the CPU time is
what to compare between runs; wall time well above CPU time is time spent waiting (sleeps,
timeouts, a hub held down). A module-scoped hub is counted in the test whose teardown stops
it. ``python -m tests.cputime PATH`` sums a log up.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Generator
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--cpu-log", metavar="PATH", default=None,
                     help="append each test's wall and CPU seconds to PATH (JSON lines)")


def _cpu() -> tuple[float, float]:
    from tests import zygote

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    # The zygote's children are not this process's: the zygote reports their CPU (and its
    # own, which RUSAGE_CHILDREN would only see once it ends).
    return (own.ru_utime + own.ru_stime,
            children.ru_utime + children.ru_stime + zygote.cpu_seconds())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item,
                            nextitem: pytest.Item | None) -> Generator[None, None, None]:
    path = item.config.getoption("--cpu-log")
    if not path:
        yield
        return
    wall, (own, children) = time.monotonic(), _cpu()
    yield
    wall_after, (own_after, children_after) = time.monotonic(), _cpu()
    line = {"test": item.nodeid, "wall": round(wall_after - wall, 3),
            "cpu_self": round(own_after - own, 3),
            "cpu_children": round(children_after - children, 3),
            "worker": os.environ.get("PYTEST_XDIST_WORKER", "main")}
    with Path(path).open("a") as fh:
        fh.write(json.dumps(line) + "\n")


def summary(lines: list[dict[str, float | str]], top: int = 25) -> str:
    """The totals of a log, and its tests by wall time, longest first."""
    def total(key: str) -> float:
        return sum(float(line[key]) for line in lines)

    cpu = total("cpu_self") + total("cpu_children")
    waiting = sum(max(0.0, float(x["wall"]) - float(x["cpu_self"]) - float(x["cpu_children"]))
                  for x in lines)
    out = [f"{len(lines)} tests: wall {total('wall'):.1f} s, CPU {cpu:.1f} s "
           f"(test processes {total('cpu_self'):.1f} s, started processes "
           f"{total('cpu_children'):.1f} s), waiting (wall - CPU, at least) {waiting:.1f} s",
           f"{'wall':>8} {'cpu':>8}  test"]
    for line in sorted(lines, key=lambda x: -float(x["wall"]))[:top]:
        out.append(f"{float(line['wall']):8.2f} "
                   f"{float(line['cpu_self']) + float(line['cpu_children']):8.2f}  {line['test']}")
    return "\n".join(out)


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        print(summary([json.loads(line) for line in fh if line.strip()],
                      int(sys.argv[2]) if len(sys.argv) > 2 else 25))
