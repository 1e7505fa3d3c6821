"""`outpost up`: a new user's first command."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.support import OUTPOST, clean_env, config_home, free_port, run_cli, wait_until


def _up(data_dir: Path, port: int, env: dict[str, str] | None = None, **popen: Any
        ) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen([*OUTPOST, "up", "--data-dir", str(data_dir), "--bind",
                             f"127.0.0.1:{port}"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env or clean_env(),
                            **popen)
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
    env = clean_env(XDG_CONFIG_HOME=config_home())
    proc, lines = _up(data_dir, port, env)
    text = "\n".join(lines)
    assert "Initialised a hub" in text and "Registered this machine" in text
    assert f"https://localhost:{port}" in text
    token = (data_dir / "admin.token").read_text().strip()
    assert token not in text  # the profile holds it, and the banner says where
    token_file = Path(env["XDG_CONFIG_HOME"]) / "outpost" / "credentials" / "local.token"
    assert f"Profile:        'local' (current; its admin token is kept in {token_file})" in text
    row = next(line for line in lines if "local" in line and "Healthy" in line)
    assert row.split()[0]  # the machine's name
    elapsed = float(text.split("Outpost is up (")[1].split(" s)")[0])
    assert elapsed > 0
    # The sample runbook ran on the local agent and its output is shown, streams and all.
    assert "(runbook 'hello'): Completed" in text
    assert any(line.strip().startswith("Hello from ") for line in lines)
    assert "  PROGRESS: 50% half way" in lines
    assert "  WARNING: this is what a warning record looks like" in lines

    # The one line that installs an agent elsewhere, with the hub's URL and pinned CA.
    at = lines.index("Add another machine (run this on it, as root for a system service):")
    install = shlex.split(lines[at + 1].strip())
    assert install[0].startswith("OUTPOST_ACCOUNT_KEY=") and install[1:3] == ["sh", "-c"]
    assert "/v1/agent/install.sh" in install[3]
    assert install[4] == f"https://localhost:{port}" and len(install[5]) >= 64
    assert install[install.index("--group") + 1] == "default"
    # The commands the banner suggests work as printed: 'outpost' is not on this PATH (the
    # venv is not activated), so they name the venv's script; the profile finds the hub.
    tries = [line.split(":", 1)[1] if line.startswith("Try:") else line
             for line in lines if line.startswith(("Try:", "     "))]
    assert len(tries) == 3, lines
    path_env = {**env, "PATH": "/usr/bin:/bin"}
    for printed in tries:
        argv = shlex.split(printed)
        assert argv[0].endswith("/bin/outpost") and os.path.isabs(argv[0]), printed
        done = subprocess.run(argv, capture_output=True, text=True, env=path_env, timeout=60)
        assert done.returncode == 0, (printed, done.stdout, done.stderr)
    listing = run_cli("machine", "list", "--json", env=env)  # no --data-dir: the profile
    assert listing.returncode == 0, listing.stderr
    machines = json.loads(listing.stdout)
    assert [m["status"] for m in machines] == ["Healthy"]
    # The agent-side commands find up's agent through the profile too.
    status = run_cli("agent", "status", "--json", env=env)
    assert status.returncode == 0, status.stdout + status.stderr
    assert json.loads(status.stdout)["state_dir"] == str((data_dir / "agent").resolve())
    logs = run_cli("agent", "logs", "-n", "50", env=env)
    assert logs.returncode == 0 and logs.stdout.strip(), logs.stdout + logs.stderr
    checked = run_cli("check", "--output", "json", env=env)
    assert "E2003" not in checked.stdout, checked.stdout  # the agent is found running
    agent_pid = int((data_dir / "agent" / "agent.pid").read_text().split()[0])

    code, rest = _interrupt(proc)
    assert code == 0 and "Stopping" in rest
    wait_until(lambda: not _alive(agent_pid), 10, what="the agent to exit")
    assert not (data_dir / "agent" / "agent.pid").exists()
    gone = run_cli("machine", "list", "--data-dir", str(data_dir))
    assert gone.returncode == 1 and "(refused)" in gone.stderr
    # 'agent run' with no --state-dir runs the profile's agent (here without its hub).
    with subprocess.Popen([*OUTPOST, "agent", "run"], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL) as agent:
        try:
            wait_until(lambda: (data_dir / "agent" / "agent.pid").exists(), 20,
                       what="the profile's agent to start")
            assert int((data_dir / "agent" / "agent.pid").read_text().split()[0]) == agent.pid
        finally:
            agent.terminate()
            agent.wait(20)

    # Again: the same hub, account and registration are reused.
    proc, lines = _up(data_dir, port, env)
    try:
        text = "\n".join(lines)
        assert "Using the hub" in text and "Registered this machine" not in text
        assert token not in text
        again = json.loads(run_cli("machine", "list", "--data-dir", str(data_dir),
                                   "--json").stdout)
        assert [m["id"] for m in again] == [m["id"] for m in machines]
        runbooks = json.loads(run_cli("runbook", "list", "--json", env=env).stdout)
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


def test_a_second_up_in_the_same_directory_says_it_is_already_up(tmp_path: Path) -> None:
    data_dir, port = tmp_path / ".outpost", free_port()
    proc, _ = _up(data_dir, port)
    try:
        hub_pid, agent_pid = sorted(_children(proc), key=lambda pid: pid != _hub_pid(proc))
        # A second 'up' from another shell, with its own (empty) config directory.
        env = clean_env(XDG_CONFIG_HOME=config_home())
        started = time.monotonic()
        second = run_cli("up", "--data-dir", str(data_dir), "--bind", f"127.0.0.1:{port}",
                         env=env, timeout=60)
        took = time.monotonic() - started
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"Outpost is already up in {data_dir.resolve()} (hub pid {hub_pid} at " \
               f"https://localhost:{port}, agent pid {agent_pid}; started by 'outpost up', " \
               f"pid {proc.pid})" in second.stderr, second.stderr
        assert "E8005" in second.stderr
        assert "Outpost is up" not in second.stdout and "Sample job" not in second.stdout
        assert took < 15  # at once: it waited for nothing
        # It started nothing, and the first one still runs, its agent Healthy.
        assert sorted(_children(proc)) == sorted([hub_pid, agent_pid])
        assert proc.poll() is None
        # Its profile is current in the second shell: the CLI talks to the running one.
        listing = run_cli("machine", "list", "--json", env=env)
        assert listing.returncode == 0, listing.stderr
        assert [m["status"] for m in json.loads(listing.stdout)] == ["Healthy"]
        status = run_cli("agent", "status", "--json", env=env)
        assert json.loads(status.stdout)["pid"] == agent_pid
    finally:
        code, rest = _interrupt(proc)
    assert code == 0 and "stopped unexpectedly" not in rest, rest


def _hub_pid(proc: subprocess.Popen[str]) -> int:
    import psutil

    return next(p.pid for p in psutil.Process(proc.pid).children()
                if "hub" in p.cmdline())


def test_up_started_with_sigint_ignored_stops_on_sigint(tmp_path: Path) -> None:
    """A script whose shell ignores SIGINT, as '(trap "" INT; outpost up)' does, hands 'up'
    SIGINT ignored; 'up' sets its own handler, so SIGINT still stops it and both children."""
    data_dir, port = tmp_path / ".outpost", free_port()
    proc, _ = _up(data_dir, port,
                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    children = _children(proc)
    assert len(children) == 2, children
    try:
        code, rest = _interrupt(proc)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("SIGINT did not stop 'up' started with SIGINT ignored") from None
    assert code == 0 and "Stopping the agent and the hub" in rest, rest
    wait_until(lambda: not any(_alive(pid) for pid in children), 30,
               what="the hub and agent to stop with 'up'")
