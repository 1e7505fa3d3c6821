"""``outpost job ...``: start runbooks on a group, watch them, read their output."""

from __future__ import annotations

import time
from json import dumps
from collections.abc import Iterator
from typing import Annotated, Any, Optional
from urllib.parse import quote

import typer

from outpost.protocol import durations
from outpost.protocol.errors import HubRefused, OutpostError, TransportError
from outpost.protocol.params import BATCH_MAX
from outpost.protocol.params import split_assignments

from . import signals
from .client import Api
from .options import CaFingerprint, DataDir, Hub, Json, Token, api
from .output import (EXIT_FAILED, RecordPrinter, ago, err, out, print_json, safe, say, table,
                     value_text)

app = typer.Typer(no_args_is_help=True, help="Jobs: runbooks running on machines.")
FINAL = ("Completed", "Failed", "Stopped", "Suspended")
STREAMS = ("Output", "Error", "Warning", "Verbose", "Progress", "Debug")
PAGE = 10000  # records a request
MAX_TIMEOUT = 7 * 86400.0
FULL_ID = 36  # a job id is a UUID
JobId = Annotated[str, typer.Argument(
    help="The job's id, or any unique start of it (at least 4 characters).")]


SHORT = 8  # characters of a job id shown in tables; any unique prefix is accepted back


def short_ids(ids: list[str]) -> dict[str, str]:
    """Each id cut to SHORT characters, longer where two of them share that prefix (as git
    abbreviates commits), so every id in a table is unique and can be typed back."""
    shown: dict[str, str] = {}
    for full in ids:
        size = SHORT
        while size < len(full) and any(o != full and o[:size] == full[:size] for o in ids):
            size += 1
        shown[full] = full[:size]
    return shown


def _print_records(records: list[dict[str, Any]], json: bool,
                   printer: RecordPrinter | None = None) -> None:
    (printer or RecordPrinter(json)).print(records)


def _pages(client: Api, job_id: str, after: int, streams: list[str] | None = None,
           patient: bool = False) -> Iterator[list[dict[str, Any]]]:
    """Every record after ``after`` that the hub has now, a page at a time (``patient``:
    riding out the hub's absence, as a waiting command does)."""
    get = client.get_riding_out if patient else client.get
    while True:
        params: dict[str, Any] = {"after": after, "limit": PAGE}
        if streams:
            params["stream"] = streams
        page: list[dict[str, Any]] = get(
            f"/v1/jobs/{quote(job_id, safe='')}/output", params=params)
        if page:
            yield page
            after = page[-1]["seq"]
        if len(page) < PAGE:
            return


def _follow(client: Api, job_id: str, show_output: bool, json: bool,
            streams: list[str] | None = None) -> dict[str, Any]:
    """Wait until the job ends, printing its records as they arrive when asked to; a hub
    that restarts meanwhile is waited for (Api.get_riding_out)."""
    after, delay = -1, 0.02
    printer = RecordPrinter(json)  # joins a long line's pieces across pages
    while True:
        job: dict[str, Any] = client.get_riding_out(f"/v1/jobs/{quote(job_id, safe='')}")
        if show_output:
            for page in _pages(client, job_id, after, streams, patient=True):
                _print_records(page, json, printer)
                after, delay = page[-1]["seq"], 0.02
        if job["status"] in FINAL:
            if show_output:  # what arrived between the two reads
                for page in _pages(client, job_id, after, streams, patient=True):
                    _print_records(page, json, printer)
                printer.flush()
            return job
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


@app.command()
def start(
    runbook: str,
    group: Annotated[Optional[str], typer.Option(
        help="The group whose machines may run it (required).")] = None,
    param: Annotated[Optional[list[str]], typer.Option(help="NAME=VALUE; repeatable.")] = None,
    version: Annotated[Optional[int], typer.Option(min=1, help="Runbook version "
                                                   "(default: the latest).")] = None,
    timeout: Annotated[Optional[str], typer.Option(help="End the job after this long "
                                                   "(90s, 5m, 10min, 1h30m; at most 7d).")]
    = None,
    count: Annotated[int, typer.Option(min=1, max=BATCH_MAX, help="Queue this many such "
                                       "jobs in one request, all or none; prints one id a "
                                       "line.")] = 1,
    wait: Annotated[bool, typer.Option("--wait", help="Block until the job ends (all of "
                                       "them, with --count); exit 0 only if each Completed.")]
    = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Like --wait, printing "
                                         "the output live (one job only).")] = False,
    all_: Annotated[bool, typer.Option("--all", help="Run it on every machine of the group: "
                                       "one child job per machine (Stopped ones left out); "
                                       "prints the parent job's id.")] = False,
    max_concurrency: Annotated[Optional[str], typer.Option(
        help="With --all: children on machines at once, N or P% of the group's machines "
             "(at least 1). Default: all at once.")] = None,
    max_errors: Annotated[Optional[str], typer.Option(
        help="With --all: failed children that may pass, N or P% of the children; at the "
             "next failure no further child starts (0: stop at the first). Default: no "
             "limit.")] = None,
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """Queue RUNBOOK on a machine of GROUP and print the job id; with --all, on every
    machine of GROUP, at most --max-concurrency at a time ('job show' shows each one)."""
    _check_fanout_options(group, all_, count, follow, max_concurrency, max_errors)
    if group is None:
        raise typer.BadParameter("Missing option: give the group whose machines may run it "
                                 "(with --all, every machine of it).", param_hint="'--group'")
    if follow and count > 1:
        raise typer.BadParameter(f"--follow shows one job's output; to wait for all {count} "
                                 "jobs use --wait.")
    body: dict[str, Any] = {"runbook": runbook, "group": group,
                            "params": split_assignments(param or [])}
    if version is not None:
        body["version"] = version
    if timeout is not None:
        body["timeout"] = durations.parse(timeout, "--timeout", positive=True,
                                          maximum=MAX_TIMEOUT)
    client = api(hub, token, ca_fingerprint, data_dir)
    if wait or follow:
        signals.daemon(term_interrupts=True)
    if all_:
        _start_all(client, {**body, "max_concurrency": max_concurrency,
                            "max_errors": max_errors}, wait, json)
        return
    if count > 1:
        _start_many(client, body, count, wait, json)
        return
    job = client.post_once("/v1/jobs", body)
    _warn(job.get("warnings"))
    _warn_if_waiting(client, job)
    if not (wait or follow):
        if json:
            print_json(job)
        else:
            out.print(job["id"])
        return
    if not json and not follow:
        out.print(job["id"])
    job = _follow(client, job["id"], follow, json and follow)
    if json and not follow:
        print_json(job)
    elif json:  # the records were JSON lines: the job's end is one more, {"job": ...}
        out.print(dumps({"job": job}), markup=False, highlight=False, soft_wrap=True)
    elif not json:
        say(f"Job {job['id']} {job['status']} ({job['reason'] or ''}).")
    if job["status"] != "Completed":
        raise typer.Exit(EXIT_FAILED)


def _check_fanout_options(group: str | None, all_: bool, count: int, follow: bool,
                          max_concurrency: str | None, max_errors: str | None) -> None:
    """E8120 for --all without --group, or with --count or --follow; and for the rate
    options without --all."""
    problem = None
    if all_ and group is None:
        problem = "--all runs the job on every machine of a group: give --group G."
    elif all_ and count > 1:
        problem = "--all queues one job for each machine of the group; --count does not apply."
    elif all_ and follow:
        problem = ("--follow shows one job's output; to wait for every machine's child use "
                   "--wait, then 'outpost job show PARENT'.")
    elif not all_ and (max_concurrency is not None or max_errors is not None):
        given = "--max-concurrency" if max_concurrency is not None else "--max-errors"
        problem = f"{given} applies to a job on every machine of a group: add --all."
    if problem:
        raise OutpostError("fanout_options_invalid", problem)


def _start_all(client: Api, body: dict[str, Any], wait: bool, json: bool) -> None:
    """``job start --all``: the parent job, one child per machine; with ``wait``, its end."""
    parent = client.post_once("/v1/fanouts", body)
    _warn(parent.get("warnings"))
    if not wait:
        if json:
            print_json(parent)
        else:
            out.print(parent["id"])
        return
    if not json:
        out.print(parent["id"])
    parent = _follow(client, parent["id"], False, False)
    if json:
        print_json(parent)
    else:
        say(f"Job {parent['id']} {parent['status']} ({parent['reason'] or ''}).")
    if parent["status"] != "Completed":
        raise typer.Exit(EXIT_FAILED)


def _warn(warnings: list[str] | None) -> None:
    """The hub's warnings on stderr (a group no machine has joined, with a did-you-mean)."""
    for line in warnings or []:
        err.print(f"warning: {line}", markup=False)


def _warn_if_waiting(client: Api, job: dict[str, Any]) -> None:
    """On stderr: the job was queued where no Healthy machine can take it yet."""
    if job.get("status") != "Queued":
        return
    try:
        waiting = client.get(f"/v1/jobs/{quote(job['id'], safe='')}").get("waiting_for")
    except (HubRefused, TransportError) as exc:
        if isinstance(exc, HubRefused) and exc.status < 500:
            raise
        return  # the job is queued: a hub (or its database) gone since only costs the hint
    if waiting:
        err.print(f"warning: {safe(waiting)}", markup=False, highlight=False)


def _start_many(client: Api, body: dict[str, Any], count: int, wait: bool,
                json: bool) -> None:
    """``job start --count N``: one batch request; with ``wait``, every job's end."""
    answer = client.post_once("/v1/jobs/batch", {"jobs": [body] * count})
    queued: list[dict[str, Any]] = answer["jobs"]
    _warn(answer.get("warnings"))
    if queued:  # all went to one group: the first tells for all
        _warn_if_waiting(client, queued[0])
    if json and not wait:
        print_json(queued)
        return
    if not json:
        for job in queued:
            out.print(job["id"])
    if not wait:
        return
    # One job at a time: those that ended meanwhile cost one request each.
    ended = [_follow(client, job["id"], False, False) for job in queued]
    if json:
        print_json(ended)
    else:
        for job in ended:
            say(f"Job {job['id']} {job['status']} ({job['reason'] or ''}).")
    if any(job["status"] != "Completed" for job in ended):
        raise typer.Exit(EXIT_FAILED)


@app.command("list")
def list_(status: Annotated[Optional[str], typer.Option(help="Only jobs in this state.")]
          = None,
          limit: Annotated[int, typer.Option(min=1, max=10000, help="At most this many.")]
          = 200,
          hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
          data_dir: DataDir = None, json: Json = False) -> None:
    """The newest jobs of the account, newest first. The ID column shows the start of each
    id (any unique start is accepted back); --json and 'job show' give the full ids."""
    query: dict[str, Any] = {"limit": limit}
    if status:
        query["status"] = status
    rows = api(hub, token, ca_fingerprint, data_dir).get("/v1/jobs", params=query)
    if json:
        print_json(rows)
        return
    if not rows:
        out.print("No jobs.")
        return
    short = short_ids([r["id"] for r in rows])
    table(["ID", "RUNBOOK", "GROUP", "STATUS", "CREATED", "REASON"], [
        [short[r["id"]], f"{r['runbook_name']} v{r['runbook_version']}", r["group_name"],
         r["status"], ago(r["created_at"]), r["reason"]] for r in rows])


@app.command()
def show(job_id: JobId, hub: Hub = None, token: Token = None,
         ca_fingerprint: CaFingerprint = None, data_dir: DataDir = None,
         json: Json = False) -> None:
    """A job's state, parameters and every activation attempt."""
    job = api(hub, token, ca_fingerprint, data_dir).get(f"/v1/jobs/{quote(job_id, safe='')}")
    if json:
        print_json(job)
        return
    say(f"Job {job['id']}: {job['status']}")
    say(f"  runbook:  {job['runbook_name']} version {job['runbook_version']}")
    say(f"  group:    {job['group_name']}   params: {value_text(job['params'])}")
    say(f"  result:   {job['reason'] or '-'}")
    if job.get("waiting_for"):
        say(f"  waiting:  {job['waiting_for']}")
    if job.get("fanout"):
        _show_fanout(job["fanout"])
        return
    table(["#", "MACHINE", "STARTED", "ENDED", "EXIT", "SIGNAL", "REASON"], [
        [a["number"], a.get("machine") or a["machine_id"], ago(a["started_at"]),
         ago(a["ended_at"]) if a["ended_at"] else "-", a["exit_code"], a["signal"],
         a["reason"] or "-"] for a in job["attempts"]],
        title="attempts")
    for a in job["attempts"]:
        if a.get("run_as"):
            say(f"  attempt {a['number']} run as: {a['run_as']}")


def _show_fanout(fan: dict[str, Any]) -> None:
    """A job on every machine of a group: its rate control, counts and one line a machine."""
    errors = "no limit" if fan["max_errors"] is None else \
        f"{fan['max_errors']} may fail (--max-errors {fan['errors_given']})"
    say(f"  machines: {fan['children']}, at most {fan['max_concurrency']} at a time "
        f"(--max-concurrency {fan['concurrency_given']}); errors: {errors}")
    if fan.get("halted"):
        say(f"  halted:   {fan['halted']}")
    counts = fan["counts"]
    say("  children: " + (", ".join(f"{n} {s}" for s, n in sorted(
        counts.items(), key=lambda item: (-item[1], item[0]))) or "none"))
    rows = fan["breakdown"]
    short = short_ids([r["job_id"] for r in rows])
    table(["MACHINE", "JOB", "STATUS", "EXIT", "STARTED", "ENDED", "REASON"], [
        [r["machine"] or r["machine_id"], short[r["job_id"]], r["status"], r["exit_code"],
         ago(r["started_at"]) if r["started_at"] else "-",
         ago(r["ended_at"]) if r["ended_at"] else "-", r["reason"] or "-"] for r in rows],
        title="children")


def _control(action: str, job_id: str, hub: Hub, token: Token,
             ca_fingerprint: CaFingerprint, data_dir: DataDir, json: bool) -> None:
    job = api(hub, token, ca_fingerprint, data_dir).post(
        f"/v1/jobs/{quote(job_id, safe='')}/{action}")
    if json:
        print_json(job)
    else:
        say(f"Job {job['id']}: {job['status']} ({job['reason'] or '-'}).")


@app.command()
def stop(job_id: JobId, hub: Hub = None, token: Token = None,
         ca_fingerprint: CaFingerprint = None, data_dir: DataDir = None,
         json: Json = False) -> None:
    """Stop a job: its whole process group gets TERM, then KILL after a grace period."""
    _control("stop", job_id, hub, token, ca_fingerprint, data_dir, json)


@app.command()
def suspend(job_id: JobId, hub: Hub = None, token: Token = None,
            ca_fingerprint: CaFingerprint = None, data_dir: DataDir = None,
            json: Json = False) -> None:
    """Pause a job: a queued one is held back, a running one's processes are paused."""
    _control("suspend", job_id, hub, token, ca_fingerprint, data_dir, json)


@app.command()
def resume(job_id: JobId, hub: Hub = None, token: Token = None,
           ca_fingerprint: CaFingerprint = None, data_dir: DataDir = None,
           json: Json = False) -> None:
    """Resume a Suspended job: paused processes go on; otherwise it is queued afresh."""
    _control("resume", job_id, hub, token, ca_fingerprint, data_dir, json)


@app.command()
def output(job_id: JobId,
           stream: Annotated[Optional[list[str]], typer.Option(
               help=f"Only these streams ({', '.join(STREAMS)}; any case); repeatable.")]
           = None,
           follow: Annotated[bool, typer.Option("--follow", "-f",
                                                help="Keep printing until the job ends.")]
           = False,
           hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
           data_dir: DataDir = None, json: Json = False) -> None:
    """A job's output records, in order."""
    client = api(hub, token, ca_fingerprint, data_dir)
    if len(job_id) < FULL_ID:  # a prefix: the hub names the job once
        job_id = client.get(f"/v1/jobs/{quote(job_id, safe='')}")["id"]
    if follow:
        signals.daemon(term_interrupts=True)
        _follow(client, job_id, True, json, stream)
        return
    if json:
        print_json([r for page in _pages(client, job_id, -1, stream) for r in page])
        return
    printer = RecordPrinter(json)
    for page in _pages(client, job_id, -1, stream):
        _print_records(page, json, printer)
    printer.flush()
