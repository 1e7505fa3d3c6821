"""``outpost agent logs`` and ``outpost agent support-bundle`` (ED-1, EX-9): thin commands
over agent/logs.py, agent/joblogs.py and agent/bundle.py."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from outpost.agent import config as agent_config
from outpost.agent import joblogs
from outpost.agent import logs as agent_logs
from outpost.agent.state import StateDir
from outpost.protocol import durations
from outpost.protocol.errors import OutpostError

from . import signals
from .options import Json, StateDirOpt, state_dir
from .output import err, out, print_json, safe, table

FOLLOW_INTERVAL = 0.2


def _since(value: str | None) -> float | None:
    if value is None:
        return None
    return time.time() - durations.parse(value, "--since")


def _level(value: str | None) -> str | None:
    if value is None:
        return None
    name = value.strip().lower()
    name = "warning" if name == "warn" else name
    if name not in agent_logs.LEVELS:
        raise OutpostError("log_level_invalid", f"--level {value} is not a log level.",
                           fix=f"Use one of {', '.join(agent_logs.LEVELS)}.",
                           value=value[:32], setting="--level")
    return name


def _retention(state: StateDir, config: Path | None) -> float:
    from .agent_cmd import _config_path

    try:
        return agent_config.load(_config_path(state, config)).job_log_retention
    except OutpostError:  # a broken config must not hide the logs
        return agent_config.AgentConfig().job_log_retention


_held: dict[tuple[Any, Any], list[str]] = {}  # pieces of a long output line, until its last


def _emit(records: Iterable[dict[str, Any]], json: bool) -> None:
    """--json: each record as it is. Text: a line each, the pieces of a job's long output
    line joined, control characters escaped (output.safe)."""
    for record in records:
        if json:
            sys.stdout.write(agent_logs.json_line(record) + "\n")
            continue
        if "stream" in record:
            key = (record.get("attempt"), record["stream"])
            if record.get("continues"):
                _held.setdefault(key, []).append(str(record.get("message", "")))
                continue
            if key in _held:
                record = {**record, "message": "".join(_held.pop(key))
                          + str(record.get("message", ""))}
        sys.stdout.write(safe(agent_logs.text_line(record)) + "\n")
    sys.stdout.flush()


def _job_log(state: StateDir, job: str, keep: agent_logs.Filter, lines: int | None,
             follow: bool, json: bool) -> None:
    found = joblogs.records(state.root, job)
    if found is None:
        raise OutpostError("job_log_not_found",
                           f"No log of job {job} is kept in {state.root}.", job=job[:128])
    shown = [r for r in found if keep(r)]
    _emit(shown[-lines:] if lines else shown, json)
    if not follow:
        return
    seen = {_identity(r) for r in found}
    while True:  # a job's log is small: read it again and print what is new
        time.sleep(FOLLOW_INTERVAL * 2)
        fresh = [r for r in joblogs.records(state.root, job) or [] if _identity(r) not in seen]
        seen.update(_identity(r) for r in fresh)
        _emit([r for r in fresh if keep(r)], json)


def _identity(record: dict[str, Any]) -> tuple[Any, ...]:
    if "stream" in record:
        return ("out", record.get("attempt"), record.get("seq"), record.get("stream"))
    return ("log", record.get("time"), record.get("message"))


def logs(
    module: Annotated[Optional[str], typer.Argument(
        help="A module's log (what it prints) instead of the agent's own.")] = None,
    follow: Annotated[bool, typer.Option(
        "--follow", "-f", help="Keep printing new lines as they are written, across log "
        "rotations, until Ctrl-C.")] = False,
    job: Annotated[Optional[str], typer.Option(
        "--job", help="Show one job's log kept on this machine: the agent's lines about it "
        "and each attempt's output.")] = None,
    jobs: Annotated[bool, typer.Option(
        "--jobs", help="List the job logs kept on this machine and when each is removed.")]
    = False,
    since: Annotated[Optional[str], typer.Option(
        "--since", help="Only lines of the last DURATION: 30s, 10m, 10min, 2h, 1d.")] = None,
    level: Annotated[Optional[str], typer.Option(
        "--level", help="Only lines at this level or above: debug, info, warning, error.")]
    = None,
    lines: Annotated[Optional[int], typer.Option(
        "--lines", "-n", "--tail", min=1, help="Only the last N lines (before following).")]
    = None,
    state_dir_: StateDirOpt = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="Agent config file, for job_log_retention (default: "
        "STATE_DIR/agent.yaml if present).")] = None,
    json: Json = False,
) -> None:
    """Show the agent's log, or one job's log kept on this machine (ED-1).

    Reads STATE_DIR/agent.log and its rotated files, oldest first, one readable line per
    record; --json prints each record as one JSON object a line. The level the agent logs
    at is the config's log_level; OUTPOST_LOG=debug in the agent's environment wins
    (restart it). Examples: 'outpost agent logs -f', 'outpost agent logs --since 10m
    --level warning', 'outpost agent logs --job ID'.

    With MODULE: that module's stdout and stderr (STATE_DIR/logs/modules/MODULE.log and
    the rotated .1 before it), with the agent's '---' line at each start; --since counts
    from those lines (the module's own lines carry no time of the agent's).
    """
    state = state_dir(state_dir_)
    if follow:
        signals.daemon(term_interrupts=True)
    keep = agent_logs.Filter(since=_since(since), level=_level(level))
    try:
        if module is not None:
            _module_log(state, module, _since(since), lines, follow)
        elif jobs:
            _job_index(state, config, json)
        elif job is not None:
            _job_log(state, job, keep, lines, follow, json)
        else:
            _agent_log(state, keep, lines, follow, json)
    except KeyboardInterrupt:  # how -f ends
        try:
            sys.stdout.flush()
        except BrokenPipeError as exc:
            raise signals.ReaderGone from exc
    except BrokenPipeError as exc:  # -f ignores SIGPIPE (see signals)
        raise signals.ReaderGone from exc


def _agent_log(state: StateDir, keep: agent_logs.Filter, lines: int | None, follow: bool,
               json: bool) -> None:
    files = agent_logs.log_files(state.root)
    if not files and not follow:
        err.print(f"No agent log in {state.root} yet: the agent writes "
                  f"{state.root / agent_logs.LOG_NAME} while it runs "
                  f"('outpost agent run --state-dir {state.root}').", markup=False)
        return
    records, position = agent_logs.read(files, keep, lines)
    _emit(records, json)
    if follow:
        for record in agent_logs.follow(state.root, keep, lambda: False, position,
                                        FOLLOW_INTERVAL):
            _emit([record], json)


def _module_log(state: StateDir, module: str, since: float | None, lines: int | None,
                follow: bool) -> None:
    from outpost.agent.modules import logview

    path = logview.path(state.root, module)
    found = logview.read(path, since) if path is not None else None
    if path is None or found is None:
        raise OutpostError("module_unknown", f"No log of a module named '{module}' is kept "
                           f"in {state.root} (this machine runs no such module).",
                           module=module[:64])
    shown = found[-lines:] if lines else found
    for line in shown:
        sys.stdout.write(safe(line) + "\n")
    sys.stdout.flush()
    if follow:
        for line in logview.follow(path, FOLLOW_INTERVAL):
            sys.stdout.write(safe(line) + "\n")
            sys.stdout.flush()


def _job_index(state: StateDir, config: Path | None, json: bool) -> None:
    rows = joblogs.index(state.root, _retention(state, config))
    for row in rows:
        row.pop("updated_ts", None)
    if json:
        print_json(rows)
        return
    if not rows:
        out.print(f"No job logs are kept in {state.root}.")
        return
    table(["JOB", "ATTEMPTS", "BYTES", "UPDATED", "REMOVED AFTER"],
          [[r["job"], ",".join(map(str, r["attempts"])), r["bytes"], r["updated_at"],
            r["expires_at"]] for r in rows])


def support_bundle(
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="The archive to write (default: "
        "./outpost-support-HOST-TIME.tar.gz).")] = None,
    state_dir_: StateDirOpt = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="Agent config file (default: STATE_DIR/agent.yaml if present).")]
    = None,
    checks: Annotated[bool, typer.Option(
        "--checks/--no-checks", help="Run 'outpost check' and include its results (it "
        "tries the network, a few seconds).")] = True,
    json: Json = False,
) -> None:
    """Write one tar.gz for support, every secret removed (EX-9).

    It holds the agent's logs, status, config, check results, versions, environment and
    the index of job logs. The machine key is never included; keys, tokens, passwords and
    passwords in URLs read \\[redacted]. Prints the file's path and size."""
    from outpost.agent import bundle

    from .agent_cmd import _config_path

    state = state_dir(state_dir_)
    target = output or Path.cwd() / f"{bundle.default_name()}.tar.gz"

    def progress(step: str) -> None:
        if not json:
            err.print(f"collecting: {step}", markup=False, style="dim")

    done = bundle.write(state, target, _config_path(state, config), dict(os.environ),
                        progress, run_checks=checks)
    if json:
        print_json(done)
        return
    out.print(f"Wrote {done['path']} ({_size(done['bytes'])}, {len(done['members'])} files; "
              "secrets removed).", markup=False)


def _size(count: int) -> str:
    return f"{count / 1024:.1f} KiB" if count < 2**20 else f"{count / 2**20:.1f} MiB"
