"""The agent's memory with modules, and how long a deployment takes to run them.

Starts a real hub (SQLite) and a real agent (heartbeat every second) and prints the agent's
resident memory (RSS, sampled once a second):

1. idle, no deployment;
2. with a deployment of ``--modules`` tiny modules (``/bin/sleep``) running, and the time
   from ``deployment create`` to every one reported running (the rollout complete);
3. with the same modules under a deployment whose ``message_hub.constrained`` is true (a
   higher priority deployment, so the agent switches to it).

The agent's budget is 40 MB (docs/architecture.md, "The agent's memory budget").

    python bench/modules.py [--modules 10] [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support import init_hub, registered_agent, wait_until  # noqa: E402

MB = 1024 * 1024


def manifest(count: int, constrained: bool) -> str:
    body = "schema_version: 1\nmodules:\n" + "".join(
        f"  m{i}:\n    command: ['/bin/sleep', '3600']\n" for i in range(count))
    if constrained:
        body += "message_hub:\n  constrained: true\n"
    return body


def sample(proc: psutil.Process, seconds: float) -> dict[str, float]:
    rss = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        rss.append(proc.memory_info().rss)
        time.sleep(1)
    maps = Path(f"/proc/{proc.pid}/maps").read_text()
    return {"rss": rss[-1] / MB, "peak": max(rss) / MB,
            "uss": proc.memory_full_info().uss / MB,
            "pydantic": float("_pydantic_core" in maps)}


def deploy(hub: Any, root: Path, name: str, text: str, *target: str) -> tuple[float, float]:
    """``deployment create`` (the CLI process) then the time until its rollout is complete:
    (seconds in all, seconds of them in the command)."""
    path = root / f"{name}.yaml"
    path.write_text(text)
    started = time.monotonic()
    made = hub.cli("deployment", "create", name, str(path), *target)
    assert made.returncode == 0, made.stderr
    command = time.monotonic() - started
    wait_until(lambda: (r := hub.api("GET", f"/v1/deployments/{name}/rollout").json())[
        "complete"] and r["machines"], 120, 0.05, f"deployment {name}")
    return time.monotonic() - started, command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="seconds of samples per phase")
    args = parser.parse_args()
    rows: list[tuple[str, dict[str, float], tuple[float, float] | None]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hub = init_hub(root / "hub", f"sqlite:///{root / 'hub.db'}").start()
        agent = registered_agent(hub, root, "bench", "bench")
        pids: list[int] = []
        try:
            agent.start()
            wait_until(lambda: hub.machines()["bench"]["status"] == "Healthy", 30)
            assert agent.proc is not None
            proc = psutil.Process(agent.proc.pid)
            rows.append(("idle, no deployment", sample(proc, args.seconds), None))
            made = deploy(hub, root, "tiny", manifest(args.modules, False), "--group", "bench")
            rows.append((f"{args.modules} modules running", sample(proc, args.seconds),
                         made))
            made = deploy(hub, root, "small", manifest(args.modules, True), "--machine",
                          "bench", "--priority", "10")
            rows.append((f"{args.modules} modules, constrained hub",
                         sample(proc, args.seconds), made))
            pids = [c.pid for c in psutil.Process().children(recursive=True)]
            pids += [p.pid for p in psutil.process_iter(["cmdline"])
                     if (p.info["cmdline"] or [])[:2] == ["/bin/sleep", "3600"]]
        finally:
            agent.stop()
            hub.stop()
            for pid in pids:  # the modules outlive the agent by design
                try:
                    if psutil.Process(pid).cmdline()[:2] == ["/bin/sleep", "3600"]:
                        os.kill(pid, signal.SIGKILL)
                except (psutil.Error, OSError):
                    pass
    print(f"agent memory with modules ({args.seconds:g} s of samples per phase; budget 40 MB)")
    print(f"  {'phase':34} {'rss MB':>7} {'peak MB':>8} {'uss MB':>7} {'pydantic':>8} "
          f"{'create->running s':>18} {'(command s)':>11}")
    for what, figures, took in rows:
        print(f"  {what:34} {figures['rss']:7.1f} {figures['peak']:8.1f} {figures['uss']:7.1f} "
              f"{'yes' if figures['pydantic'] else 'no':>8} "
              f"{f'{took[0]:.2f}' if took else '-':>18} "
              f"{f'{took[1]:.2f}' if took else '-':>11}")


if __name__ == "__main__":
    main()
