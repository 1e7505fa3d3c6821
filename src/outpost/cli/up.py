"""``outpost up``: a hub and a local agent on this machine, in one command."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from outpost.agent import registration as reg_mod
from outpost.agent.state import StateDir
from outpost.agent.transport import Clock
from outpost.protocol.errors import CATALOG, OutpostError

from .client import Api, Target
from .output import machine_table, out
from .profiles import Profile, Profiles

GROUP = "local"


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when 'up' dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: Ctrl-C and SIGTERM still stop them
        pass


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    # A session of their own: a Ctrl-C in the terminal reaches only 'up', which then stops
    # the agent before the hub, so the agent's last words reach a running hub.
    with log.open("ab") as fh:
        _RUN_STARTS[log] = fh.tell()  # what an earlier run wrote is not this run's error
        return subprocess.Popen([sys.executable, "-m", "outpost", *args], stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_die_with_parent)


def _interrupted(signum: int, frame: Any) -> None:
    """SIGTERM and SIGHUP stop 'up' as Ctrl-C does: the agent, then the hub."""
    raise KeyboardInterrupt


_CODE_LINE = re.compile(r"^\s*code:\s+(E\d{4}) \((\w+)\)")


def _exited(what: str, returncode: int | None, log: Path) -> OutpostError:
    """The child's own error when its log ends with one ('error: ...', 'code: ...', 'fix:
    ...'), so 'up' says why the hub could not start; else that it exited, and how."""
    tail = _tail(log, 40).splitlines()
    for i in range(len(tail) - 1, 0, -1):
        found = _CODE_LINE.match(tail[i])
        if found and tail[i - 1].startswith("error: ") and found.group(1) in CATALOG:
            fixes = [line.split("fix:", 1)[1].strip() for line in tail[i:i + 4]
                     if line.strip().startswith("fix:")]
            return OutpostError(found.group(2), f"The {what} could not start: "
                                f"{tail[i - 1][len('error: '):]}",
                                fix=(fixes[0] if fixes else None), log=str(log))
    return OutpostError("internal_error", f"The {what} exited with code {returncode}:\n"
                        + "\n".join(tail[-15:]), fix=f"Read {log} for the whole log.")


_RUN_STARTS: dict[Path, int] = {}  # each log's size when this run's process started


def _tail(log: Path, lines: int = 15) -> str:
    """The last ``lines`` lines this run's process wrote to ``log``."""
    try:
        with log.open("rb") as fh:
            fh.seek(_RUN_STARTS.get(log, 0))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _wait_for(check: Any, proc: subprocess.Popen[bytes], log: Path, what: str,
              timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise _exited(what, proc.returncode, log)
        try:
            result = check()
            if result:
                return result
        except OutpostError:
            pass
        time.sleep(0.1)
    raise OutpostError("invalid_request", f"The {what} did not become ready in {timeout:.0f} s."
                       f"\n{_tail(log)}", fix=f"Read {log} for the whole log.")


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _refuse(data_dir: Path, hub_pid: int | None, agent_pid: int | None,
            profile_name: str) -> None:
    """Outpost already runs on ``data_dir``: make its profile current, so the CLI talks to
    it, and say so (E8005) without starting anything."""
    from outpost.hub import config as hub_config

    init = hub_config.init(data_dir, [])  # an initialised directory: only read
    _save_profile(profile_name, init.url, init.ca_fingerprint, init.admin_token, data_dir)
    hub = f"hub pid {hub_pid} at {init.url}" if hub_pid else f"no hub running at {init.url}"
    agent = f"agent pid {agent_pid}" if agent_pid else "no agent running"
    owner = _up_pid(hub_pid or agent_pid)
    started_by = f"; started by 'outpost up', pid {owner}" if owner else ""
    pids = str(owner) if owner else " ".join(str(p) for p in (hub_pid, agent_pid) if p)
    cli = cli_command()
    raise OutpostError(
        "outpost_already_up",
        f"Outpost is already up in {data_dir} ({hub}, {agent}{started_by}).",
        fix=f"Use it: its profile '{profile_name}' is current now, so '{cli} machine list' "
            f"talks to it. To start it afresh, stop it first (Ctrl-C where it runs, or "
            f"'kill {pids}'), or pass another --data-dir.",
        data_dir=str(data_dir), url=init.url, hub_pid=hub_pid, agent_pid=agent_pid,
        up_pid=owner)


def _up_pid(child: int | None) -> int | None:
    """The pid of the 'outpost up' that started process ``child``, if one did."""
    import psutil

    try:
        parent = psutil.Process(child).parent() if child else None
        if parent is not None and "up" in parent.cmdline() and \
                any("outpost" in a for a in parent.cmdline()):
            return int(parent.pid)
    except psutil.Error:
        pass
    return None


def _machine_name() -> str:
    name = socket.gethostname()
    return name if 0 < len(name) <= 64 else "local"


SAMPLE = """#!/bin/bash
# The sample runbook that 'outpost up' publishes and runs once on the local agent.
echo "Hello from $(hostname), job $OUTPOST_JOB_ID"
echo "PROGRESS: 50% half way"
echo "Running as $(id -un) in $PWD"
echo "WARNING: this is what a warning record looks like"
"""


def _sample_job(api: Api) -> None:
    """Publish the sample runbook (once) and run it, so a new user sees a job end to end."""
    published = {r["name"] for r in api.get("/v1/runbooks")}
    if "hello" not in published:
        api.post("/v1/runbooks", {"name": "hello", "content": SAMPLE, "type": "bash",
                                  "description": "The sample runbook of 'outpost up'.",
                                  "log_progress": True})
    started = time.monotonic()
    job = api.post("/v1/jobs", {"runbook": "hello", "group": GROUP, "timeout": 60})
    deadline = started + 30
    while job["status"] not in ("Completed", "Failed", "Stopped", "Suspended") and \
            time.monotonic() < deadline:
        time.sleep(0.05)
        job = api.get(f"/v1/jobs/{job['id']}")
    out.print(f"\nSample job {job['id']} (runbook 'hello'): {job['status']} in "
              f"{time.monotonic() - started:.2f} s", markup=False)
    for record in api.get(f"/v1/jobs/{job['id']}/output"):
        prefix = "" if record["stream"] == "Output" else record["stream"].upper() + ": "
        out.print(f"  {prefix}{record['text']}", markup=False, highlight=False)


def cli_command() -> str:
    """``outpost`` as the user can run it from here: the bare name when that is on PATH and
    is this installation, else the absolute path of this installation's script (a venv that
    is not activated), else this interpreter with ``-m outpost``."""
    script = Path(sys.executable).parent / "outpost"
    found = shutil.which("outpost")
    if script.is_file():
        if found is not None and Path(found).resolve() == script.resolve():
            return "outpost"
        return shlex.quote(str(script))
    return "outpost" if found else f"{shlex.quote(sys.executable)} -m outpost"


def install_line(url: str, ca_fingerprint: str, account_id: str, account_key: str) -> str:
    """The one line that installs an agent on another machine and registers it in group
    'default' (the hub's ``GET /v1/agent/install.sh``, fetched with its CA pinned)."""
    from outpost.hub.install import install_line as line

    return line(url, ca_fingerprint, account_id, "default", account_key=account_key)


def _loopback(url: str) -> bool:
    from ipaddress import ip_address
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ip_address(host).is_loopback
    except ValueError:
        return False


def _hub_pid(data_dir: Path) -> int | None:
    """The pid of a running ``outpost hub run`` whose --data-dir is ``data_dir``: the hub
    keeps no pidfile, so its command line (as 'up' or a person started it) tells."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        args = proc.info.get("cmdline") or []
        if proc.info["pid"] == os.getpid() or not any("outpost" in a for a in args):
            continue
        for i, arg in enumerate(args[:-1]):
            if arg == "hub" and args[i + 1] == "run":
                break
        else:
            continue
        given = None
        for i, arg in enumerate(args):
            if arg == "--data-dir" and i + 1 < len(args):
                given = args[i + 1]
            elif arg.startswith("--data-dir="):
                given = arg.split("=", 1)[1]
        if given is None:
            continue
        path = Path(given)
        if not path.is_absolute():
            path = Path(proc.info.get("cwd") or "/") / path
        try:
            if path.resolve() == data_dir:
                return int(proc.info["pid"])
        except OSError:
            continue
    return None


def _already_up(data_dir: Path) -> tuple[int | None, int | None]:
    """(hub pid, agent pid) of a hub and an agent already running on ``data_dir``."""
    return _hub_pid(data_dir), StateDir(data_dir / "agent").running_pid()


def _save_profile(name: str, url: str, ca_fingerprint: str, token: str,
                  data_dir: Path) -> Profile:
    return Profiles.load().put(Profile(
        name=name, hub_urls=[url], ca_fingerprint=ca_fingerprint, data_dir=data_dir,
        state_dir=data_dir / "agent"), token=token)


def up(data_dir: Path, bind: str, hold: bool = True, profile_name: str = "local") -> int:
    from outpost.hub import config as hub_config
    from outpost.hub import db

    from .profiles import check_name

    started = time.monotonic()
    data_dir = data_dir.resolve()
    check_name(profile_name)
    paths = hub_config.HubPaths(data_dir)
    if paths.initialised():
        # Before anything starts: a second hub would fail to bind while the first one
        # answered its health check, and a second agent would stop on E2006 (the first
        # one holds the pidfile) only after the banner.
        hub_pid, agent_pid = _already_up(data_dir)
        if hub_pid or agent_pid:
            _refuse(data_dir, hub_pid, agent_pid, profile_name)
    init = hub_config.init(data_dir, [], bind=bind)
    config = hub_config.load_config(paths)
    if init.created:
        db.migrate_sync(config.database_url)
        out.print(f"Initialised a hub in {data_dir}")
    else:
        out.print(f"Using the hub in {data_dir}")
    profile = _save_profile(profile_name, config.url, init.ca_fingerprint, init.admin_token,
                            data_dir)
    hub = agent = None
    previous = {sig: signal.signal(sig, _interrupted) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        hub = _spawn(["hub", "run", "--data-dir", str(data_dir)], data_dir / "hub.log")
        api = Api(Target(config.url, init.admin_token, paths.ca_cert.read_text()), timeout=5)
        _wait_for(lambda: api.get("/healthz"), hub, data_dir / "hub.log", "hub", 30)
        state = StateDir(data_dir / "agent")
        reg = None
        try:
            reg = state.registration()
        except Exception:
            reg = None
        if reg is None:
            opts = reg_mod.RegisterOptions(
                hub=config.url, account_id=init.account_id, account_key=init.primary_key,
                group=GROUP, ca_fingerprint=init.ca_fingerprint, name=_machine_name(),
                force=True)
            reg = asyncio.run(reg_mod.register(state, opts, Clock()))
            out.print(f"Registered this machine as '{reg.name}' in group '{GROUP}'")
        agent = _spawn(["agent", "run", "--state-dir", str(state.root)],
                       data_dir / "agent.log")

        def healthy() -> list[dict[str, Any]] | None:
            rows: list[dict[str, Any]] = api.get("/v1/machines")
            mine = [r for r in rows if r["id"] == reg.machine_id]
            return rows if mine and mine[0]["status"] == "Healthy" else None

        rows = _wait_for(healthy, agent, data_dir / "agent.log", "agent", 30)
        out.print(f"\nOutpost is up ({time.monotonic() - started:.1f} s).")
        out.print(f"  Hub URL:        {config.url}", markup=False)
        out.print(f"  CA fingerprint: {init.ca_fingerprint}", markup=False)
        out.print(f"  Profile:        '{profile.name}' (current; its admin token is kept in "
                  f"{profile.token_file})", markup=False)
        out.print(f"  Logs:           {data_dir / 'hub.log'}, {data_dir / 'agent.log'}\n",
                  markup=False)
        machine_table(rows)
        _sample_job(api)
        cli = cli_command()
        out.print(f"\nTry: {cli} machine list", markup=False)
        out.print(f"     {cli} job start hello --group {GROUP} --wait", markup=False)
        out.print(f"     {cli} agent status", markup=False)
        out.print("\nAdd another machine (run this on it, as root for a system service):",
                  markup=False)
        out.print("  " + install_line(config.url, init.ca_fingerprint, init.account_id,
                                      init.primary_key),
                  markup=False, highlight=False, soft_wrap=True)
        if _loopback(config.url):
            out.print(f"  (this hub listens on {bind} only, so the line works on this "
                      "machine alone; for a fleet, make a hub that other machines can reach: "
                      "'outpost hub init --hostname NAME --bind 0.0.0.0:8443', README "
                      "'Use it across machines')", markup=False)
        if not hold:
            return 0
        out.print("Press Ctrl-C to stop.")
        sys.stdout.flush()
        while hub.poll() is None and agent.poll() is None:
            time.sleep(0.2)
        who = "hub" if hub.poll() is not None else "agent"
        out.print(f"The {who} stopped unexpectedly; see {data_dir / (who + '.log')}")
        return 1
    except KeyboardInterrupt:
        out.print("\nStopping the agent and the hub...")
        return 0
    finally:
        # A second Ctrl-C or SIGTERM (a supervisor that signals the whole process group)
        # must not cut the stopping short: they wait until both have stopped.
        quiet = {sig: signal.signal(sig, signal.SIG_IGN)
                 for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            _stop(agent)
            _stop(hub)
        finally:
            for sig, handler in {**quiet, **previous}.items():
                signal.signal(sig, handler)
