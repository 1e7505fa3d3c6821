"""``outpost agent ...``: register this machine, run the daemon, show its status."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from outpost.protocol.errors import OutpostError

from . import signals
from .options import ClockSkew, Json, StateDirOpt, profile_state_dir, state_dir
from .output import EXIT_NOT_RUNNING, ago, out, print_json, say

if TYPE_CHECKING:
    from outpost.agent.state import StateDir

# The agent's modules (registration, daemon, transport: pydantic, cryptography, httpx) are
# imported by the commands that use them: every other command, and the agent daemon this
# process becomes, would pay for them at each start.

app = typer.Typer(no_args_is_help=True, help="The agent on a managed machine.")

ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", help="Agent config file in YAML (default: STATE_DIR/agent.yaml if present).")]


def _labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise OutpostError("invalid_request", f"Label '{item}' is not KEY=VALUE.",
                               fix="Write labels as --label KEY=VALUE.")
        labels[key] = value
    return labels


def _config_path(state: StateDir, path: Path | None) -> Path | None:
    if path is not None:
        return path
    default = state.root / "agent.yaml"
    return default if default.exists() else None


@app.command()
def register(
    hub: Annotated[list[str], typer.Option(
        help="The hub's URL; repeat it for several hubs, tried in this order (ED-4).")],
    account_id: Annotated[str, typer.Option(help="The account to join.")],
    account_key: Annotated[str, typer.Option(
        envvar="OUTPOST_ACCOUNT_KEY", help="The account's primary or secondary key "
        "(or set OUTPOST_ACCOUNT_KEY to keep it out of the shell history).")],
    group: Annotated[str, typer.Option(help="The group of machines to join.")],
    ca_fingerprint: Annotated[str, typer.Option(help="SHA-256 of the hub's CA.")],
    name: Annotated[Optional[str], typer.Option(
        help="Machine name, 1 to 64 characters (default: the host name).")] = None,
    label: Annotated[Optional[list[str]], typer.Option(help="KEY=VALUE; repeatable.")] = None,
    state_dir_: StateDirOpt = None,
    force: Annotated[bool, typer.Option(help="Replace an existing registration.")] = False,
    proxy: Annotated[Optional[str], typer.Option(
        help="HTTP(S) proxy URL (default: HTTPS_PROXY from the environment).")] = None,
    json: Json = False,
    clock_skew: ClockSkew = 0.0,
) -> None:
    """Register this machine with a hub (once). The private key never leaves the machine."""
    from outpost.agent import registration as reg_mod
    from outpost.agent.transport import Clock

    state = state_dir(state_dir_)
    opts = reg_mod.RegisterOptions(
        hub=hub[0], extra_hubs=hub[1:], account_id=account_id, account_key=account_key,
        group=group, ca_fingerprint=ca_fingerprint,
        name=socket.gethostname() if name is None else name,
        labels=_labels(label or []), force=force, proxy=proxy)
    reg = asyncio.run(reg_mod.register(state, opts, Clock(clock_skew)))
    if json:
        print_json({"machine_id": reg.machine_id, "account_id": reg.account_id,
                    "name": reg.name, "group": reg.group, "hub": hub[0],
                    "hub_urls": reg.hub_urls,
                    "state_dir": str(state.root)})
        return
    out.print(f"Registered '{reg.name}' (machine {reg.machine_id}) in group '{reg.group}' "
              f"of account {reg.account_id}.")
    out.print(f"Start the agent: outpost agent run --state-dir {state.root}")


@app.command()
def deregister(state_dir_: StateDirOpt = None, json: Json = False,
               clock_skew: ClockSkew = 0.0) -> None:
    """Remove this machine's registration, on the hub and here."""
    from outpost.agent import registration as reg_mod
    from outpost.agent.transport import Clock

    state = state_dir(state_dir_)
    reg, at_hub = asyncio.run(reg_mod.deregister(state, Clock(clock_skew)))
    if json:
        print_json({"machine_id": reg.machine_id, "name": reg.name, "removed_at_hub": at_hub})
        return
    out.print(f"Removed the registration of '{reg.name}' from {state.root}.")
    if not at_hub:
        out.print("The hub could not be told; remove the machine there with "
                  f"'outpost machine remove {reg.name}'.")


@app.command()
def run(state_dir_: StateDirOpt = None, config: ConfigOpt = None,
        clock_skew: ClockSkew = 0.0) -> None:
    """Run the agent daemon in the foreground (SIGTERM or Ctrl-C stops it)."""
    args = [sys.executable, "-m", "outpost.cli.agentd"]
    state_dir_ = state_dir_ or profile_state_dir()  # the one 'outpost up' made, if current
    if state_dir_ is not None:
        args += ["--state-dir", str(state_dir_)]
    if config is not None:
        args += ["--config", str(config)]
    env = dict(os.environ)
    if clock_skew:
        env["OUTPOST_TEST_CLOCK_SKEW"] = str(clock_skew)
    sys.stdout.flush()
    sys.stderr.flush()
    signals.daemon()  # SIGPIPE stays ignored across exec; agentd sets the rest again
    # Same pid, without the CLI's libraries in memory (see outpost.cli.agentd).
    os.execve(sys.executable, args, env)


@app.command()
def status(state_dir_: StateDirOpt = None, json: Json = False) -> None:
    """Show whether the agent runs, its processes, hub, and last heartbeat."""
    from outpost.agent.daemon import read_status

    state = state_dir(state_dir_)
    info = read_status(state)
    if info is None:
        pid = state.running_pid()
        start = f"outpost agent run --state-dir {state.root}"
        if json:
            print_json({"running": False, "pid": pid, "state_dir": str(state.root),
                        "start_command": start, "code": "E2003",
                        "last_stop": state.last_stop()})
        elif pid:
            out.print(f"The agent process {pid} exists but does not answer on its status "
                      f"socket. Restart it: kill {pid}; {start}")
        else:
            out.print(f"The Outpost agent is not running (state dir {state.root}).")
            stop = state.last_stop()
            if stop is not None:  # a graceful stop, noted by the agent as it stopped
                told = stop.get("hub_told")
                say(f"It was stopped {ago(stop['at'])}; " + (
                    f"the hub at {told} was told (the machine shows Stopped)." if told else
                    "no hub answered its stop notice."))
            out.print(f"Start it with: {start}")
            out.print("or, as a service: systemctl start outpost-agent")
        raise typer.Exit(EXIT_NOT_RUNNING)
    info["running"] = True
    if json:
        print_json(info)
        return
    out.print(f"Agent {info['version']} running, pid {info['pid']}, up "
              f"{info['uptime_seconds']:.0f}s")
    out.print(f"  machine:        {info['machine_name']} ({info['machine_id']})")
    out.print(f"  account/group:  {info['account_id']} / {info['group']}")
    out.print(f"  hub:            {info['hub_url']}")
    out.print(f"  state dir:      {info['state_dir']}")
    out.print(f"  config:         {info['config_path'] or '(defaults)'}")
    sandbox = info.get("sandbox")
    if sandbox:
        out.print(f"  runbooks run as: {sandbox['run_as']}", markup=False)
        out.print(f"  job limits:     {sandbox['limits_by']}", markup=False)
    out.print(f"  last heartbeat: {ago(info['last_heartbeat_ack_at'])} (acknowledged)")
    error = info.get("last_error")
    say(f"  last error:     {error['code']} {error['message']}" if error
        else "  last error:     none")
    out.print("  processes:")
    for proc in info["processes"]:
        out.print(f"    {proc['pid']:>7}  {proc['role']}")
    extensions = info.get("extensions") or []
    out.print("  extensions:" if extensions else "  extensions:     none")
    for ext in extensions:
        version = ext.get("version") or "-"
        target = ext.get("target_version")
        towards = f" -> {target}" if target and target != ext.get("version") else ""
        step = f" ({ext['step']})" if ext.get("step") else ""
        out.print(f"    {ext['name']} {version}{towards}: {ext['state']}{step}", markup=False)
        if ext.get("message"):
            say(f"      {ext['message']}")
        if ext.get("failed_versions"):
            out.print(f"      not tried again until retried: "
                      f"{', '.join(ext['failed_versions'])}", markup=False)


    modules = info.get("modules")
    if modules:
        name = modules.get("deployment") or "none"
        out.print(f"  deployment:     {name} (version {modules.get('version')})", markup=False)
        if modules.get("fetch_error"):
            say(f"      last fetch failed: {modules['fetch_error']}")
        for m in modules.get("modules") or []:
            shown_pid = f" pid {m['pid']}" if m.get("pid") else ""
            code = f" exit {m['exit_code']}" if m.get("exit_code") is not None else ""
            out.print(f"    module {m['name']}: {m['state']}{shown_pid}{code}, "
                      f"{m['restart_count']} restarts", markup=False)
            if m.get("reason"):
                say(f"      {m['reason']}")


@app.command()
def restart(
    module: Annotated[Optional[str], typer.Argument(
        help="Restart this module only (its restart count too); the agent keeps running.")]
    = None,
    state_dir_: StateDirOpt = None, json: Json = False,
) -> None:
    """Restart the agent, or one module (ED-3).

    Without MODULE the agent alone is stopped and started again (as a systemd unit with
    systemctl, else with its own command line); its modules keep running and the new agent
    adopts them. With MODULE the running agent stops that module and starts it afresh.
    """
    state = state_dir(state_dir_)
    if module is not None:
        from outpost.agent.modules.hook import ask_restart

        answer = ask_restart(state.root, module)
        if not answer.get("ok"):
            body = answer.get("error") or {}
            raise OutpostError("module_unknown", str(body.get("message") or
                                                     f"The agent refused: {answer}"),
                               module=module[:64])
        if json:
            print_json({"restarted": module})
        else:
            out.print(f"Module {module} restarted.", markup=False)
        return
    from outpost.agent import service

    lines: list[str] = []

    def tell(line: str) -> None:
        lines.append(line)
        if not json:
            out.print(line, markup=False)

    running = service.inspect(state)
    if running is None:
        raise OutpostError("agent_not_running", f"The agent is not running (state dir "
                           f"{state.root}).",
                           fix=f"Start it: outpost agent run --state-dir {state.root}")
    tell(f"The agent runs as pid {running.pid}, started by {running.how}.")
    service.stop(running, tell)
    service.start_again(running, tell)
    if json:
        print_json({"restarted": "agent", "lines": lines})


# ED-1, EX-9: the agent's logs, each job's kept log, and the support bundle.
from . import agent_logs_cmd  # noqa: E402

app.command("logs")(agent_logs_cmd.logs)
app.command("support-bundle")(agent_logs_cmd.support_bundle)


@app.command("reset-cache")
def reset_cache(
    state_dir_: StateDirOpt = None,
    start: Annotated[bool, typer.Option(
        "--start/--no-start", help="Start the agent again if it was running.")] = True,
    json: Json = False,
) -> None:
    """Stop the agent, clear its cache, start it again (HW-9's manual fix).

    The cache is what the hub can send again (registration.json, hub.json); the machine key
    and identity.json are never removed. A systemd unit is stopped and started with
    systemctl; an agent started by hand is started again detached, with the same command.
    """
    from outpost.agent import service
    from outpost.agent.daemon import read_status

    state = state_dir(state_dir_)
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        if not json:
            out.print(line)

    running = service.inspect(state)
    if running is not None and "up" in running.parent_cmdline \
            and any("outpost" in arg for arg in running.parent_cmdline):
        raise OutpostError(
            "agent_already_running", f"The agent (pid {running.pid}) runs under 'outpost up' "
            f"({running.parent}), which stops the hub too when its agent stops.",
            fix="Stop 'outpost up' (Ctrl-C), run 'outpost agent reset-cache' again, then "
                "'outpost up'.")
    start_command = f"outpost agent run --state-dir {state.root}"
    if running is None:
        say(f"The agent is not running (state dir {state.root}).")
    else:
        say(f"The agent runs as pid {running.pid}, started by {running.how}.")
        service.stop(running, say)
    removed = service.clear(state, say)
    started = False
    if running is not None and start:
        if state.running_pid() is not None:
            say(f"The agent was already started again (pid {state.running_pid()}), by "
                f"{running.how}.")
        else:
            service.start_again(running, say)
            started = True
    else:
        say(f"Start the agent with: {start_command}"
            + (f"  (or: {' '.join(running.systemctl('start'))})"
               if running is not None and running.unit else ""))
    if started:
        # The fresh agent answers on its status socket once it runs; its first heartbeat
        # fetches the cache again.
        deadline = time.monotonic() + 20
        info = None
        while info is None and time.monotonic() < deadline:
            time.sleep(0.2)
            info = read_status(state, timeout=1.0)
        if info is None:
            say(f"The agent did not answer within 20 s; see {state.root / 'agent.log'} and "
                f"'outpost agent status --state-dir {state.root}'.")
            if json:
                print_json({"removed": [p.name for p in removed], "was_running": True,
                            "started": False, "lines": lines})
            raise typer.Exit(1)
        say(f"The agent runs again (pid {info['pid']}).")
    if json:
        print_json({"removed": [p.name for p in removed],
                    "was_running": running is not None,
                    "started_by": running.how if running else None,
                    "started": started, "start_command": None if started else start_command,
                    "lines": lines})
