"""``outpost schedule ...``: start runbooks, or ask extensions' operations of machines, at
the times of a cron expression."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Annotated, Any, Optional
from urllib.parse import quote
from zoneinfo import ZoneInfo

import typer

from outpost.protocol import durations
from outpost.protocol.params import split_assignments

from .job_cmd import short_ids
from .options import CaFingerprint, DataDir, Hub, Json, Token, api
from .output import out, print_json, say, table, value_text

app = typer.Typer(no_args_is_help=True, help="Schedules: at the times of a cron expression, "
                  "once per due time, start a runbook on a group, or ask an extension's "
                  "operation of every machine of a group (each at its own offset within the "
                  "spread).")

MAX_SPREAD = 7 * 86400.0


def duration(seconds: float) -> str:
    """3725 -> '1h2m5s', 1.5 -> '1.5s', 0 -> '0s' (milliseconds only below a minute)."""
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    whole, parts = round(seconds), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if whole >= size:
            parts.append(f"{whole // size}{unit}")
            whole %= size
    return "".join(parts)


def until(moment: float | None) -> str:
    if moment is None:
        return "-"
    seconds = moment - time.time()
    if seconds < 1:
        return "due now"
    # Seconds matter only for the next hour.
    return f"in {duration(round(seconds) if seconds < 3600 else round(seconds / 60) * 60)}"


def _local(iso: str | None) -> str:
    """'2030-01-31T02:30:00.000+01:00' -> '2030-01-31 02:30:00' (the schedule's zone)."""
    return iso[:19].replace("T", " ") if iso else "never"


def _spread(s: dict[str, Any]) -> str:
    if not s["spread_seconds"]:
        return "-"
    if s.get("kind") == "extension":
        return f"{duration(s['spread_seconds'])} (each machine at its own offset)"
    return f"{duration(s['spread_seconds'])} (offset {duration(s['offset_seconds'])})"


def _what(s: dict[str, Any]) -> str:
    if s.get("kind") == "extension":
        return f"{s['extension']} {s['operation']}"
    return f"runbook {s['runbook_name']}"


def _on(s: dict[str, Any]) -> str:
    if s.get("kind") != "extension":
        return f"group {s['group_name']}"
    if s.get("target_kind") == "machine":
        return f"machine {s['target']}"
    return f"every machine of group {s['target']}"


def _summary(s: dict[str, Any]) -> str:
    """'nightly on group web', or 'operation snapshot of extension backup on every machine
    of group web'."""
    if s.get("kind") == "extension":
        return f"operation {s['operation']} of extension {s['extension']} on {_on(s)}"
    return f"{s['runbook_name']} on group {s['group_name']}"


def _states(counts: dict[str, int] | None) -> str:
    return ", ".join(f"{n} {state}" for state, n in sorted((counts or {}).items())) or "-"


def _next(s: dict[str, Any]) -> str:
    if not s["enabled"]:
        return "disabled"
    return f"{_local(s['next_run'])} ({until(s['next_run_at'])})"


def _path(name: str) -> str:
    return f"/v1/schedules/{quote(name, safe='')}"


@app.command()
def create(
    name: str,
    cron: Annotated[str, typer.Option(help="When: 'MIN HOUR DAY MONTH WEEKDAY', 6 fields "
                                      "with seconds first, or @hourly, @daily, @weekly...")],
    runbook: Annotated[Optional[str], typer.Option(help="The runbook to start on one "
                                                   "machine of the group (its latest "
                                                   "version at each run).")] = None,
    extension: Annotated[Optional[str], typer.Option(help="Instead of a runbook: the "
                                                     "extension whose --operation is asked "
                                                     "of every machine of the group (or of "
                                                     "--machine).")] = None,
    operation: Annotated[Optional[str], typer.Option(help="The extension's operation, "
                                                     "e.g. snapshot.")] = None,
    group: Annotated[Optional[str], typer.Option(help="The group: a runbook runs on one "
                                                 "of its machines, an operation on each "
                                                 "machine the extension is set for.")] = None,
    machine: Annotated[Optional[str], typer.Option(help="One machine (name or id), for an "
                                                   "extension's operation, instead of "
                                                   "--group.")] = None,
    timezone: Annotated[str, typer.Option(help="IANA time zone the cron times are read "
                                          "in, e.g. Europe/Berlin.")] = "UTC",
    spread: Annotated[str, typer.Option(help="Start each run at a stable offset within "
                                        "this window (10m, 10min, 1h30m; at most 7d), so a "
                                        "fleet does not fire at one second (EX-7); an "
                                        "operation starts on each machine at that machine's "
                                        "own offset.")] = "0",
    param: Annotated[Optional[list[str]], typer.Option(help="NAME=VALUE; repeatable (the "
                                                       "runbook's or the operation's; an "
                                                       "operation's are public, never a "
                                                       "secret).")]
    = None,
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """At every time CRON names, once per due time: start RUNBOOK on a machine of GROUP, or
    ask OPERATION of EXTENSION on every machine of GROUP (or on MACHINE), each machine at
    its own offset within the spread.

    Example: outpost schedule create nightly --extension backup --operation snapshot
    --group web --cron '0 2 * * *' --spread 2h"""
    body = {"name": name, "runbook": runbook, "extension": extension,
            "operation": operation, "group": group, "machine": machine, "cron": cron,
            "timezone": timezone, "spread": durations.parse(spread, "--spread",
                                                            maximum=MAX_SPREAD),
            "params": split_assignments(param or [])}
    made = api(hub, token, ca_fingerprint, data_dir).post(
        "/v1/schedules", {k: v for k, v in body.items() if v is not None})
    if json:
        print_json(made)
        return
    say(f"Created schedule {made['name']}: {_summary(made)}, cron '{made['cron']}' "
        f"({made['timezone']}), spread {_spread(made)}.")
    if made.get("params"):
        say(f"  params:   {value_text(made['params'])}")
    say(f"  next run: {_next(made)}")


@app.command("list")
def list_(hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
          data_dir: DataDir = None, json: Json = False) -> None:
    """Every schedule of the account: what it starts, on what, and its next run."""
    rows = api(hub, token, ca_fingerprint, data_dir).get("/v1/schedules")
    if json:
        print_json(rows)
        return
    if not rows:
        out.print("No schedules in this account.")
        return
    table(["NAME", "STARTS", "ON", "CRON (TIME ZONE)", "SPREAD", "PARAMS", "NEXT RUN",
           "LAST RUN"],
          [[s["name"], _what(s), _on(s), f"{s['cron']} ({s['timezone']})",
            _spread(s), s["params"] or "-", _next(s), _local(s["last_run"])] for s in rows])


@app.command()
def show(name: str, hub: Hub = None, token: Token = None,
         ca_fingerprint: CaFingerprint = None, data_dir: DataDir = None,
         json: Json = False) -> None:
    """A schedule, its next run, and its newest runs with their jobs (or operations)."""
    s = api(hub, token, ca_fingerprint, data_dir).get(_path(name))
    if json:
        print_json(s)
        return
    say(f"Schedule {s['name']}: {_summary(s)}")
    say(f"  cron:      {s['cron']} ({s['timezone']})")
    say(f"  spread:    {_spread(s)}")
    say(f"  params:    {value_text(s['params']) if s['params'] else '-'}")
    say(f"  next run:  {_next(s)}")
    say(f"  last run:  {_local(s['last_run'])}")
    if not s["runs"]:
        out.print("  no runs yet")
        return
    if s.get("kind") == "extension":
        _operation_runs(s)
        return
    short = short_ids([r["job_id"] for r in s["runs"] if r["job_id"]])
    table(["DUE", "JOB", "STATUS", "MISSED BEFORE IT", "ERROR"], [
        [_local(r["due"]), short.get(r["job_id"]) or "-", r["job_status"] or "-", r["missed"] or "",
         r["error"] or ""] for r in s["runs"]], title="newest runs")


def _operation_runs(s: dict[str, Any]) -> None:
    table(["DUE", "OPERATIONS", "SKIPPED", "MISSED BEFORE IT", "ERROR"], [
        [_local(r["due"]), _states(r["operation_states"]), r["skipped"] or "",
         r["missed"] or "", r["error"] or ""] for r in s["runs"]], title="newest runs")
    ops = s.get("latest_operations") or []
    if not ops:
        return
    due = s["runs"][0]["due_at"]
    table(["MACHINE", "STARTS AT", "OFFSET", "STATUS", "CODE", "OPERATION", "MESSAGE"], [
        [o["machine"] or "-", _clock(o["not_before"] or due, s["timezone"]),
         duration(o["offset_seconds"] or 0), o["status"], o["code"] or "",
         o["id"], o["message"] or ""] for o in ops],
        title="operations of the newest run")


def _clock(moment: float, zone: str) -> str:
    return datetime.fromtimestamp(moment, ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M:%S")


@app.command()
def remove(name: str, hub: Hub = None, token: Token = None,
           ca_fingerprint: CaFingerprint = None, data_dir: DataDir = None,
           json: Json = False) -> None:
    """Remove a schedule; jobs it started are kept."""
    done = api(hub, token, ca_fingerprint, data_dir).delete(_path(name))
    if json:
        print_json(done)
        return
    say(f"Removed schedule {name}.")


@app.command()
def enable(name: str, hub: Hub = None, token: Token = None,
           ca_fingerprint: CaFingerprint = None, data_dir: DataDir = None,
           json: Json = False) -> None:
    """Enable a schedule from now on; runs that fell due while disabled are not started."""
    s = api(hub, token, ca_fingerprint, data_dir).post(_path(name) + "/enable")
    if json:
        print_json(s)
        return
    out.print(f"Enabled schedule {s['name']}; next run {_next(s)}.", markup=False)


@app.command()
def disable(name: str, hub: Hub = None, token: Token = None,
            ca_fingerprint: CaFingerprint = None, data_dir: DataDir = None,
            json: Json = False) -> None:
    """Stop starting runs until the schedule is enabled again."""
    s = api(hub, token, ca_fingerprint, data_dir).post(_path(name) + "/disable")
    if json:
        print_json(s)
        return
    out.print(f"Disabled schedule {s['name']}.", markup=False)
