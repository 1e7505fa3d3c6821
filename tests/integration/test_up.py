"""`outpost up`: a new user's first command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.support import OUTPOST, clean_env, free_port, run_cli, wait_until


def _up(data_dir: Path, port: int) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen([*OUTPOST, "up", "--data-dir", str(data_dir), "--bind",
                             f"127.0.0.1:{port}"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=clean_env())
    lines: list[str] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if "Press Ctrl-C" in line:
            return proc, lines
    proc.kill()
    proc.communicate()
    raise AssertionError("outpost up did not come up:\n" + "\n".join(lines))


def _interrupt(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(20)
        rest = proc.stdout.read() if proc.stdout else ""
    finally:
        if proc.stdout:
            proc.stdout.close()
    return code, rest


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_shows_a_healthy_machine_and_stops_cleanly(tmp_path: Path) -> None:
    data_dir, port = tmp_path / ".outpost", free_port()
    proc, lines = _up(data_dir, port)
    text = "\n".join(lines)
    assert "Initialised a hub" in text and "Registered this machine" in text
    assert f"https://localhost:{port}" in text
    token = (data_dir / "admin.token").read_text().strip()
    assert token in text
    row = next(line for line in lines if "local" in line and "Healthy" in line)
    assert row.split()[0]  # the machine's name
    elapsed = float(text.split("Outpost is up (")[1].split(" s)")[0])
    assert elapsed > 0
    # The sample runbook ran on the local agent and its output is shown, streams and all.
    assert "(runbook 'hello'): Completed" in text
    assert any(line.strip().startswith("Hello from ") for line in lines)
    assert "  PROGRESS: 50% half way" in lines
    assert "  WARNING: this is what a warning record looks like" in lines

    listing = run_cli("machine", "list", "--data-dir", str(data_dir), "--json")
    assert listing.returncode == 0, listing.stderr
    machines = json.loads(listing.stdout)
    assert [m["status"] for m in machines] == ["Healthy"]
    agent_pid = int((data_dir / "agent" / "agent.pid").read_text().split()[0])

    code, rest = _interrupt(proc)
    assert code == 0 and "Stopping" in rest
    wait_until(lambda: not _alive(agent_pid), 10, what="the agent to exit")
    assert not (data_dir / "agent" / "agent.pid").exists()
    gone = run_cli("machine", "list", "--data-dir", str(data_dir))
    assert gone.returncode == 1 and "(refused)" in gone.stderr

    # Again: the same hub, account and registration are reused.
    proc, lines = _up(data_dir, port)
    try:
        text = "\n".join(lines)
        assert "Using the hub" in text and "Registered this machine" not in text
        assert token in text
        again = json.loads(run_cli("machine", "list", "--data-dir", str(data_dir),
                                   "--json").stdout)
        assert [m["id"] for m in again] == [m["id"] for m in machines]
        runbooks = json.loads(run_cli("runbook", "list", "--data-dir", str(data_dir),
                                      "--json").stdout)
        assert [(r["name"], r["version"]) for r in runbooks] == [("hello", 1)]  # not twice
    finally:
        assert _interrupt(proc)[0] == 0


def test_up_on_a_taken_port_says_why_the_hub_could_not_start(tmp_path: Path) -> None:
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        done = run_cli("up", "--data-dir", str(tmp_path / ".outpost"), "--bind",
                       f"127.0.0.1:{port}", timeout=90)
    finally:
        holder.close()
    assert done.returncode == 1, done.stdout + done.stderr  # failed, as the hub's own exit
    err = done.stderr
    assert "error: The hub could not start: Bind for 127.0.0.1:" in err
    assert "code:   E2005 (port_allocated)" in err  # the hub's own code, not a generic one
    assert "fix:    Stop python" in err and "Traceback" not in err


def _children(proc: subprocess.Popen[str]) -> list[int]:
    """The pids of the hub and the agent that 'up' started."""
    import psutil

    return [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]


def test_sigterm_or_kill_9_of_up_stops_its_hub_and_agent(tmp_path: Path) -> None:
    data_dir, port = tmp_path / ".outpost", free_port()
    proc, _ = _up(data_dir, port)
    children = _children(proc)
    assert len(children) == 2, children
    proc.terminate()  # SIGTERM: as Ctrl-C, the agent then the hub
    code, rest = proc.wait(30), proc.stdout.read() if proc.stdout else ""
    if proc.stdout:
        proc.stdout.close()
    assert code == 0, rest
    assert "Stopping the agent and the hub" in rest
    wait_until(lambda: not any(_alive(pid) for pid in children), 30,
               what="the hub and agent to stop with 'up'")

    proc, _ = _up(data_dir, port)
    children = _children(proc)
    assert len(children) == 2, children
    proc.kill()  # SIGKILL: 'up' cannot stop them; the kernel tells them it died
    proc.wait()
    if proc.stdout:
        proc.stdout.close()
    wait_until(lambda: not any(_alive(pid) for pid in children), 30,
               what="the hub and agent to stop after kill -9 of 'up'")
