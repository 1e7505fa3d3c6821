"""Big output: a runbook prints 100 MB of numbered lines; all of it must arrive in order,
and the agent's resident memory must stay under 60 MB meanwhile.

Starts a real hub (SQLite or PostgreSQL) and one real agent on 127.0.0.1, publishes a
python runbook printing --megabytes MiB as lines of exactly 100 bytes (a 9-digit line number,
a space, 89 characters derived from the number, a newline), and while it runs:

- pages through GET /v1/jobs/{id}/output?after=N, checking each record's sequence number
  (0, 1, 2, ... with no gap or repeat), stream (Output) and text against what was printed;
- samples the agent's RSS (psutil; the agent's pid only, its children excluded) every
  0.1 s, and the hub's, for information.

Target: agent RSS < 60 MB throughout. Exits 0 even when a target is missed.

    python bench/big_output.py [--megabytes 100] [--database sqlite|postgres]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import (  # noqa: E402
    MB,
    Cpu,
    Hooks,
    TimeBound,
    cancel_time_bound,
    database,
    load,
    publish,
    stack,
    time_bound,
    verdict,
)

TARGET_MB = 60.0
LINE = 100  # bytes, newline included

RUNBOOK = """\
import sys

def line(i):
    return f"{i:09d} " + (f"{i * 2654435761 % 4294967296:010d}-" * 9)[:89] + "\\n"

out = sys.stdout
chunk = []
for i in range(LINES):
    chunk.append(line(i))
    if len(chunk) == 1000:
        out.write("".join(chunk))
        chunk.clear()
out.write("".join(chunk))
"""


def expected(i: int) -> str:
    return f"{i:09d} " + (f"{i * 2654435761 % 4294967296:010d}-" * 9)[:89]


class Sampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.samples.append((time.monotonic(), self.proc.memory_info().rss))
            except psutil.Error:
                return
            self.halt.wait(self.interval)

    def peak(self) -> float:
        return max(s for _, s in self.samples) / MB if self.samples else float("nan")


def measure(kind: str, megabytes: float, page_wait: float) -> dict[str, Any]:
    lines = int(megabytes * MB) // LINE
    with tempfile.TemporaryDirectory(prefix="outpost-bench-") as tmp:
        root = Path(tmp)
        with database(kind, root) as url, stack(root, url, Hooks()) as st:
            publish(st.hub, "big", RUNBOOK.replace("LINES", str(lines)), "python")
            agent_mem, hub_mem = Sampler(st.agent_pid), Sampler(st.hub_pid)
            agent_mem.start()
            hub_mem.start()
            with st.hub.client(st.hub.admin_token) as client:
                client.timeout = 300
                time.sleep(1.0)  # a baseline of idle samples
                idle = agent_mem.peak()
                started = time.monotonic()
                cpu = Cpu(st)
                response = client.post("/v1/jobs", json={"runbook": "big", "group": "web"})
                assert response.status_code == 201, response.text
                job_id = response.json()["id"]
                after, pages, nbytes, problems = -1, 0, 0, []
                biggest_page = 0
                status = "Queued"
                arrival: list[tuple[float, int]] = []
                while True:
                    job = client.get(f"/v1/jobs/{job_id}").json()
                    status = job["status"]
                    page = client.get(f"/v1/jobs/{job_id}/output",
                                      params={"after": after}).json()
                    pages += 1
                    biggest_page = max(biggest_page, len(page))
                    for record in page:
                        seq = after + 1
                        if record["seq"] != seq and len(problems) < 5:
                            problems.append(f"seq {record['seq']} where {seq} was expected")
                        if record["stream"] != "Output" or record["text"] != expected(seq):
                            if len(problems) < 5:
                                problems.append(f"record {seq}: {record['stream']} "
                                                f"{record['text'][:40]!r}")
                        nbytes += len(record["text"]) + 1
                        after = record["seq"]
                    if page:
                        arrival.append((time.monotonic() - started, after + 1))
                    if status in ("Completed", "Failed", "Stopped") and not page:
                        break
                    if not page:
                        time.sleep(page_wait)
                finished = time.monotonic() - started
                used = cpu.used()
                job = client.get(f"/v1/jobs/{job_id}").json()
            agent_mem.halt.set()
            hub_mem.halt.set()
            agent_mem.join()
            hub_mem.join()
    run_s = (job["ended_at"] or 0) - (job["started_at"] or 0)
    return {"database": kind, "megabytes": megabytes, "lines": lines, "received": after + 1,
            "bytes": nbytes, "problems": problems, "status": job["status"],
            "reason": job.get("reason"), "pages": pages, "biggest_page": biggest_page,
            "all_arrived_s": finished, "job_run_s": run_s, "idle_mb": idle,
            "agent_peak_mb": agent_mem.peak(), "hub_peak_mb": hub_mem.peak(),
            "agent_samples": agent_mem.samples, "arrival": arrival, "cpu": used,
            "load": load()}


def report(r: dict[str, Any]) -> None:
    ok = r["received"] == r["lines"] and not r["problems"] and r["bytes"] == r["lines"] * LINE
    print(f"\n{r['database']}: a python runbook printing {r['megabytes']:g} MiB "
          f"({r['lines']} lines of {LINE} bytes)")
    print(f"  job                     {r['status']} ({r['reason']})")
    print(f"  records received        {r['received']} of {r['lines']}, {r['bytes'] / MB:.1f} MiB"
          f" in {r['pages']} pages (largest {r['biggest_page']} records)")
    print(f"  in order, content same  {'yes' if ok else 'NO: ' + '; '.join(r['problems'])}")
    print(f"  runbook ran (hub times) {r['job_run_s']:8.1f} s")
    print(f"  all output read by      {r['all_arrived_s']:8.1f} s after submit "
          f"({r['bytes'] / MB / max(r['all_arrived_s'], 1e-9):.2f} MiB/s)")
    print(f"  agent RSS idle          {r['idle_mb']:8.1f} MB")
    print(f"  agent RSS peak          {r['agent_peak_mb']:8.1f} MB")
    rss = [s / MB for _, s in r["agent_samples"]]
    if rss:
        print(f"  agent RSS median        {statistics.median(rss):8.1f} MB over "
              f"{len(rss)} samples")
    h, a, c = r["cpu"]
    print(f"  cpu seconds             hub {h:.1f}, agent {a:.1f}, runbook {c:.1f}; {r['load']}")
    print(f"  hub RSS peak            {r['hub_peak_mb']:8.1f} MB (for information)")
    marks = r["arrival"]
    if marks:
        print("  records read by the client over time: " + ", ".join(
            f"{t:.0f}s:{n}" for t, n in marks[:: max(1, len(marks) // 8)]))
    print(f"  target: everything in order: {verdict(ok)}; agent RSS < {TARGET_MB:g} MB: "
          f"{verdict(r['agent_peak_mb'] < TARGET_MB)} ({r['agent_peak_mb']:.1f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=100.0)
    parser.add_argument("--database", choices=("sqlite", "postgres", "both"), default="sqlite")
    parser.add_argument("--page-wait", type=float, default=0.2,
                        help="seconds between output pages when one came back empty")
    parser.add_argument("--max-seconds", type=float, default=1800.0)
    args = parser.parse_args()
    kinds = ["sqlite", "postgres"] if args.database == "both" else [args.database]
    time_bound(args.max_seconds)
    try:
        for kind in kinds:
            report(measure(kind, args.megabytes, args.page_wait))
    except TimeBound as exc:
        print(f"\n{exc}; figures above are complete runs only")
    finally:
        cancel_time_bound()


if __name__ == "__main__":
    main()
