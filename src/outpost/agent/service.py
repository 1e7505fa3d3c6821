"""How the agent on this machine runs, and stopping and starting it again.

Used by ``outpost agent reset-cache`` (HW-9's manual fix: stop, clear the cache, start). An
agent is either a systemd unit (seen in ``/proc/PID/cgroup``), which systemd must stop and
start (it would otherwise restart it on its own), or a process someone started by hand, which
is stopped with SIGTERM and started again detached, with the same command line, working
directory and environment, its output going where it went before.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from outpost.protocol.errors import OutpostError

from .cache import load_at_start
from .state import CorruptFile, StateDir

Say = Callable[[str], None]


@dataclass
class Running:
    pid: int
    argv: list[str]
    cwd: str
    env: dict[str, str]
    output: str | None  # the regular file its stderr went to, if any
    unit: str | None  # the systemd unit that runs it
    user_unit: bool
    parent: str  # "NAME (pid N)"
    parent_cmdline: list[str]

    @property
    def how(self) -> str:
        if self.unit:
            return f"the systemd {'user ' if self.user_unit else ''}unit {self.unit}"
        return f"process {self.parent}, by hand or by a supervisor this command does not know"

    def systemctl(self, action: str) -> list[str]:
        return ["systemctl", *(["--user"] if self.user_unit else []), action, self.unit or ""]


def _unit(pid: int) -> tuple[str | None, bool]:
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None, False
    for line in text.splitlines():
        path = line.rpartition(":")[2]
        name = path.rstrip("/").rpartition("/")[2]
        if name.endswith(".service") and "/user@" not in path:
            return name, False
        if name.endswith(".service"):
            return name, True
    return None, False


def inspect(state: StateDir) -> Running | None:
    """The running agent of this state directory, or None."""
    import psutil

    pid = state.running_pid()
    if pid is None:
        return None
    try:
        proc = psutil.Process(pid)
        argv, cwd = proc.cmdline(), proc.cwd()
        env = proc.environ()
        parent = proc.parent()
        parent_name = f"{parent.name()} (pid {parent.pid})" if parent else "none"
        parent_cmdline = parent.cmdline() if parent else []
    except psutil.Error as exc:
        raise OutpostError("agent_not_running", f"The agent (pid {pid}) cannot be inspected: "
                           f"{exc}.", fix="Run this command as the user the agent runs as "
                           "(root for the service).") from exc
    output: str | None = None
    try:
        target = os.readlink(f"/proc/{pid}/fd/2")
        if target.startswith("/") and Path(target).is_file():
            output = target
    except OSError:
        pass
    unit, user_unit = _unit(pid)
    return Running(pid, argv, cwd, env, output, unit, user_unit, parent_name, parent_cmdline)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a zombie child of a process that has not reaped it yet has stopped all the same
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def stop(running: Running, say: Say, timeout: float = 30.0) -> None:
    if running.unit:
        _systemctl(running, "stop", say)
    else:
        say(f"Stopping the agent (pid {running.pid}) with SIGTERM...")
        os.kill(running.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while not _gone(running.pid):
        if time.monotonic() > deadline:
            raise OutpostError("internal_error", f"The agent (pid {running.pid}) did not stop "
                               f"within {timeout:g} s; the cache was left as it was.",
                               fix=f"Stop it (kill {running.pid}) and run reset-cache again.")
        time.sleep(0.1)
    say(f"Stopped the agent (pid {running.pid}).")


def _systemctl(running: Running, action: str, say: Say) -> None:
    command = running.systemctl(action)
    say(f"Running: {shlex.join(command)}")
    if shutil.which("systemctl") is None:
        raise OutpostError("internal_error", "systemctl is not on the PATH.",
                           fix=f"Run '{shlex.join(command)}' yourself.")
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise OutpostError("internal_error", f"'{shlex.join(command)}' failed: "
                           f"{result.stderr.strip() or result.returncode}",
                           fix=f"Run '{shlex.join(command)}' as root.")


def start_again(running: Running, say: Say) -> None:
    """Start the agent the way it ran before (see the module docstring)."""
    if running.unit:
        _systemctl(running, "start", say)
        return
    output = open(running.output, "ab") if running.output else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.Popen(running.argv, cwd=running.cwd, env=running.env,
                                stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                                start_new_session=True)
    finally:
        if running.output and not isinstance(output, int):
            output.close()
    say(f"Started the agent again, detached (pid {proc.pid}): {shlex.join(running.argv)}")


def clear(state: StateDir, say: Say) -> list[Path]:
    """Remove the cache files; the key and the identity stay (see state.py)."""
    load_at_start(state)  # sets aside what is corrupt, rebuilds identity.json if it can
    try:
        removed = state.clear_cache()
    except CorruptFile as exc:
        raise OutpostError("registration_corrupt", str(exc)) from exc
    if removed:
        say("Removed " + ", ".join(p.name for p in removed) + " (the agent fetches them "
            "again from the hub).")
    else:
        say("The cache was already empty.")
    say("Kept machine.key and identity.json (the hub cannot send them again).")
    return removed
