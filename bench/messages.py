"""Module-to-module messages through the local message hub, normal against constrained mode.

For each mode, a message hub runs in a process of its own (as the agent would host it) with
ten real module processes connected (m0 .. m9, each an ``outpost.modules.ModuleClient``);
m0 sends ``--count`` messages of ``--size`` bytes on ``out``, one after another (each waits
for its ack), and a route takes them to m1's input ``in``. m1 notes each message's latency
(the sender's ``time.monotonic()`` in the body against its own: one clock on one machine).
Then m1 goes away and m0 sends ``--backlog`` more of ``--backlog-size`` bytes: the input's
queue holds what its bound lets it (the rest is refused 507), which is where the modes'
memory differs. The hub
process's resident memory is read with ten modules connected and idle, and after the backlog.

Printed: messages/s, p50 and p99 latency, memory, and constrained/normal ratios. ``identify``
reads the claimed name from the process's environment here (the bench has no supervisor).

    python bench/messages.py [--count 5000] [--size 256] [--backlog 3000] [--backlog-size 8192]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODULES = [f"m{i}" for i in range(10)]


def _manifest(constrained: bool) -> str:
    modules = "".join(f"  {m}: {{command: [/bin/true]}}\n" for m in MODULES)
    routes = ('  pipe: FROM /messages/modules/m0/outputs/out '
              'INTO BrokeredEndpoint("/modules/m1/inputs/in")\n'
              '  up: FROM /messages/modules/m2/outputs/* INTO $upstream\n')
    return (f"modules:\n{modules}routes:\n{routes}"
            f"message_hub:\n  constrained: {str(constrained).lower()}\n")


def _rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# --- the roles, each in a process of its own ---------------------------------------------
def hub_role(state: str, path: str, constrained: bool) -> None:
    from outpost.agent.modules.msghub import MessageHub
    from outpost.protocol.modules import load_manifest

    def identify(pid: int) -> str | None:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return None
        for item in env:
            if item.startswith(b"OUTPOST_MODULE_NAME="):
                return item.split(b"=", 1)[1].decode()
        return None

    async def main() -> None:
        hub = MessageHub(identify, Path(state), path=Path(path))
        hub.configure(*load_manifest(_manifest(constrained)))
        await hub.start()
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def module_role(role: str, count: int, size: int) -> None:
    from outpost.modules import ModuleClient, Refused

    client = ModuleClient()
    print("ready", flush=True)
    command = sys.stdin.readline().split()
    if role == "send":
        pad = "x" * max(0, size - 40)
        refused = 0
        start = time.monotonic()
        for _ in range(int(command[1])):
            try:
                client.send("out", json.dumps({"t": time.monotonic(), "p": pad}).encode())
            except Refused:
                refused += 1
        print(json.dumps({"seconds": time.monotonic() - start, "refused": refused}),
              flush=True)
    elif role == "recv":
        latencies: list[float] = []
        first = last = 0.0
        for message in client.messages():
            now = time.monotonic()
            first = first or now
            last = now
            latencies.append(now - json.loads(message.body)["t"])
            if len(latencies) == count:
                break
        print(json.dumps({"latencies": latencies, "seconds": last - first}), flush=True)
    client.close()  # an idle module: connected until told to stop


# --- the run -------------------------------------------------------------------------------
def _start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    ready = proc.stdout.readline().strip()
    if ready != "ready":
        raise SystemExit(f"{args[0]} did not start: {ready!r}")
    return proc


def _tell(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def _answer(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    return json.loads(proc.stdout.readline())  # type: ignore[no-any-return]


def run_mode(constrained: bool, count: int, size: int, backlog: int, backlog_size: int
             ) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="outpost-msgbench-") as tmp:
        path = str(Path(tmp) / "hub.sock")
        hub = _start(["hub", str(Path(tmp) / "state"), path, str(int(constrained))])
        procs: dict[str, subprocess.Popen[str]] = {}
        try:
            base = dict(os.environ, OUTPOST_MODULE_SOCKET=path)
            for name in MODULES:
                role = {"m0": "send", "m1": "recv"}.get(name, "idle")
                procs[name] = _start([role, str(count), str(size)],
                                     dict(base, OUTPOST_MODULE_NAME=name))
            time.sleep(1.0)
            idle_kb = _rss_kb(hub.pid)
            _tell(procs["m1"], "go")
            _tell(procs["m0"], f"go {count}")
            sent = _answer(procs["m0"])
            got = _answer(procs["m1"])
            procs["m1"].wait(10)
            # The receiver is gone: a backlog builds up to the input's bound.
            sender = _start(["send", "0", str(backlog_size)], dict(base, OUTPOST_MODULE_NAME="m0"))
            _tell(sender, f"go {backlog}")
            queued = _answer(sender)
            sender.wait(10)
            backlog_kb = _rss_kb(hub.pid)
            peak_kb = _rss_kb(hub.pid, "VmHWM")
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    _tell(proc, "stop")
                    try:
                        proc.wait(5)
                    except subprocess.TimeoutExpired:
                        proc.kill()
            hub.kill()
            hub.wait()
    latencies = sorted(got["latencies"])
    return {
        "rate": count / max(got["seconds"], sent["seconds"], 1e-9),
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "idle_mb": idle_kb / 1024, "backlog_mb": backlog_kb / 1024, "peak_mb": peak_kb / 1024,
        "backlog_refused": queued["refused"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--backlog", type=int, default=3000)
    parser.add_argument("--backlog-size", type=int, default=8192)
    args = parser.parse_args()
    results = {mode: run_mode(mode == "constrained", args.count, args.size, args.backlog,
                              args.backlog_size)
               for mode in ("normal", "constrained")}
    print(f"{args.count} messages of {args.size} bytes m0 -> m1 through the local hub; "
          f"10 modules connected; then a backlog of {args.backlog} of {args.backlog_size} "
          "bytes with m1 gone")
    print(f"{'':12} {'msg/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'idle MB':>8} "
          f"{'backlog MB':>10} {'peak MB':>8} {'refused':>8}")
    for mode, r in results.items():
        print(f"{mode:12} {r['rate']:8.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
              f"{r['idle_mb']:8.1f} {r['backlog_mb']:10.1f} {r['peak_mb']:8.1f} "
              f"{r['backlog_refused']:8.0f}")
    n, c = results["normal"], results["constrained"]
    print(f"constrained/normal: msg/s {c['rate'] / n['rate']:.2f}x, p99 "
          f"{c['p99_ms'] / n['p99_ms']:.2f}x, idle memory {c['idle_mb'] / n['idle_mb']:.2f}x, "
          f"memory with a backlog {c['backlog_mb'] / n['backlog_mb']:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "hub":
        hub_role(sys.argv[2], sys.argv[3], sys.argv[4] == "1")
    elif len(sys.argv) > 1 and sys.argv[1] in ("send", "recv", "idle"):
        module_role(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
