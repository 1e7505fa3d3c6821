"""Jobs: a runbook version run on one machine of a group, with its attempts and output.

States and transitions (docs/jobs.md)::

    Queued -> Activating (claimed under a lease) -> Running -> Completed | Failed
    Activating/Running -- failed activation (lease expired, agent lost the job, sandbox
        killed by a signal the agent did not send) --> Queued, or Suspended on the third
    stop:    Queued/Suspended -> Stopped;  on a machine -> Stopping -> Stopped
    suspend: Queued -> Suspended;  on a machine -> Suspending -> Suspended (paused there)
    resume:  paused on a machine -> Resuming -> Running;  not on a machine -> Queued

Output records are kept once per (job, sequence), so an agent that sends a batch again after
a lost answer duplicates nothing. Each attempt numbers its records from
``(attempt - 1) << 32``, so the records of every attempt of a job sort in one sequence.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

import sqlalchemy as sa
from pydantic import TypeAdapter, ValidationError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from outpost.protocol import durations, params
from outpost.protocol.errors import ACTIVATE_FAILED_TEXT, OutpostError
from outpost.protocol.models import INT64_MAX, RECORD_TEXT_MAX, OutputRecord

from . import fanout, runbooks
from .config import random_id
from .db import groups, job_attempts, job_records, jobs, machines
from .db import runbooks as runbook_table
from .machines import check_group
from .machines import status as machine_status

STATES = ("New", "Queued", "Activating", "Running", "Completed", "Failed", "Stopping",
          "Stopped", "Suspending", "Suspended", "Resuming")
FINAL = ("Completed", "Failed", "Stopped")
STREAMS = ("Output", "Error", "Warning", "Verbose", "Progress", "Debug")
# A job is held by a machine in these states; its lease is renewed by the machine's heartbeat.
HELD = ("Activating", "Running", "Stopping", "Suspending", "Suspended", "Resuming")
# A lease lasts this many heartbeat intervals (the machine turns Unresponsive at the same
# point), and never less than LEASE_MIN seconds.
LEASE_BEATS = 3
# Told of every job that reaches a final state: (status, started_at or None, ended_at). The
# hub's metrics listen (metrics.py); a listener must be quick and must not raise.
ended_listeners: list[Callable[[str, float | None, float], None]] = []


def _tell_ended(status: str, started_at: float | None, ended_at: float) -> None:
    for listener in ended_listeners:
        listener(status, started_at, ended_at)


LEASE_MIN = 5.0
MAX_ACTIVATIONS = 3
ACTIVATE_FAILED = ACTIVATE_FAILED_TEXT  # HW-1, exactly as the seed shows it
SEQ_SHIFT = 32
MAX_TIMEOUT = 7 * 86400.0
FULL_ID = 36  # random_id(): a UUID


async def start(engine: AsyncEngine, account_id: str, runbook: str, group: str,
                given: dict[str, Any], version: int | None = None,
                timeout: float | str | None = None) -> dict[str, Any]:
    """Check everything, then queue: a bad parameter is refused before anything is stored."""
    values = await prepare(engine, account_id, runbook, group, given, version, timeout)
    async with engine.begin() as conn:
        await insert(conn, values)
    # What was stored is known: the answer is made from it, not read back.
    view = {key: values.get(key) for key in VIEW_KEYS}
    view["attempts"] = []
    return view


async def start_many(engine: AsyncEngine, account_id: str,
                     entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Queue every entry or none: each is checked as ``start`` checks one, before anything is
    stored, then all are inserted in one transaction. Returns their views in order.

    An entry holds ``runbook``, ``group``, ``params`` and optionally ``version`` and
    ``timeout``. The first bad entry refuses the batch with the error ``start`` would give,
    its message prefixed ``jobs[INDEX]: ``. Entries are read one at a time, so a caller
    that checks each as it is read refuses at the first bad one too. Each distinct
    (runbook, version) is read once. The caller wakes each group's pollers afterwards.
    """
    books: dict[tuple[str, int | None], dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for index, entry in enumerate(entries):
        try:
            row = await prepare(engine, account_id, entry["runbook"], entry["group"],
                                entry.get("params") or {}, entry.get("version"),
                                entry.get("timeout"), books)
        except OutpostError as exc:
            raise OutpostError(exc.reason, f"jobs[{index}]: {exc.message}", fix=exc.fix,
                               **{**exc.details, "index": index}) from exc
        # Claims take the oldest first: entries keep their order even within one clock tick.
        if rows and row["created_at"] <= rows[-1]["created_at"]:
            row["created_at"] = rows[-1]["created_at"] + 1e-6
        rows.append(row)
    if not rows:
        return []
    async with engine.begin() as conn:
        await conn.execute(jobs.insert(), rows)
    views = []
    for values in rows:
        view = {key: values.get(key) for key in VIEW_KEYS}
        view["attempts"] = []
        views.append(view)
    return views


async def prepare(engine: AsyncEngine, account_id: str, runbook: str, group: str,
                  given: dict[str, Any], version: int | None = None,
                  timeout: float | str | None = None,
                  books: dict[tuple[str, int | None], dict[str, Any]] | None = None
                  ) -> dict[str, Any]:
    """The row of a new job, checked (group, timeout, runbook, parameters) but not stored.

    Schedules and webhooks call this, then ``insert`` in a transaction of their own.
    ``books`` keeps the runbook versions read, for a caller preparing many (``start_many``).
    """
    check_group(group)
    if timeout is not None:
        timeout = durations.parse(timeout, "timeout", maximum=MAX_TIMEOUT, positive=True)
    books = {} if books is None else books
    if (runbook, version) not in books:
        books[(runbook, version)] = await runbooks.get(engine, account_id, runbook, version)
    book = books[(runbook, version)]
    values = params.check(book["params"], given)
    return {"id": random_id(), "account_id": account_id, "runbook_name": book["name"],
            "runbook_version": book["version"], "group_name": group, "params": values,
            "status": "Queued", "timeout_seconds": timeout, "created_at": time.time(),
            "activations": 0, "attempt": 0}


_INSERT = jobs.insert()


async def insert(conn: AsyncConnection, values: dict[str, Any]) -> None:
    """Queue a prepared job. The caller wakes the group's pollers after its commit."""
    await conn.execute(_INSERT, values)


def lease_seconds(machine: Any) -> float:
    return max(LEASE_BEATS * float(machine.heartbeat_interval or 30), LEASE_MIN)


# The statements of the hot paths (claim, reports) are built once, with bound parameters:
# building a statement and generating its cache key cost more than SQLite takes to run it.
_HELD_BY = sa.select(sa.func.count()).select_from(jobs).where(
    jobs.c.machine_id == sa.bindparam("b_machine"), jobs.c.status.in_(HELD))
# The pick is a materialized CTE, run once: as a subquery PostgreSQL may run it again for
# each row it updates, and FOR UPDATE then sees the rows just claimed as no longer Queued and
# picks further ones, so a claim could take more than the free slots.
_PICK = (sa.select(jobs.c.id)
         .where(jobs.c.account_id == sa.bindparam("b_account"),
                jobs.c.group_name == sa.bindparam("b_group"), jobs.c.status == "Queued",
                # a child of a job on every machine of a group is for its machine only
                sa.or_(jobs.c.target_machine_id.is_(None),
                       jobs.c.target_machine_id == sa.bindparam("b_machine")))
         .order_by(jobs.c.created_at).limit(sa.bindparam("b_free"))
         .with_for_update(skip_locked=True)
         .cte("pick").prefix_with("MATERIALIZED", dialect="postgresql"))
_CLAIM = (jobs.update()
          .where(jobs.c.id.in_(sa.select(_PICK.c.id)), jobs.c.status == "Queued")
          .values(status="Activating", machine_id=sa.bindparam("b_machine"),
                  lease_expires_at=sa.bindparam("b_lease"),
                  activations=jobs.c.activations + 1, attempt=jobs.c.attempt + 1)
          .returning(jobs))
_NEW_ATTEMPT = job_attempts.insert()
_SETTINGS = sa.select(groups.c.run_as, groups.c.memory_mb, groups.c.cpus,
                      groups.c.max_processes).where(
    groups.c.account_id == sa.bindparam("b_account"), groups.c.name == sa.bindparam("b_group"))


async def claim(conn: AsyncConnection, machine: Any, capacity: int) -> list[dict[str, Any]]:
    """Claim queued jobs of the machine's group in one statement, under a lease.

    ``capacity`` is how many jobs the agent runs at most; the jobs this machine already holds
    count against it, so a slot is free only once its job's end has reached the hub.
    """
    if capacity <= 0:
        return []
    held = await conn.scalar(_HELD_BY, {"b_machine": machine.id})
    free = capacity - int(held or 0)
    if free <= 0:
        return []
    now = time.time()
    rows = (await conn.execute(_CLAIM, {
        "b_account": machine.account_id, "b_group": machine.group_name, "b_free": free,
        "b_machine": machine.id, "b_lease": now + lease_seconds(machine)})).all()
    if not rows:
        return []
    rows.sort(key=lambda r: r.created_at)
    await conn.execute(_NEW_ATTEMPT, [
        {"id": random_id(), "job_id": r.id, "number": r.attempt, "machine_id": machine.id,
         "started_at": now} for r in rows])
    books = await _books(conn, machine.account_id,
                         {(r.runbook_name, r.runbook_version) for r in rows})
    settings = (await conn.execute(_SETTINGS, {"b_account": machine.account_id,
                                               "b_group": machine.group_name})).first()
    run_as = settings.run_as if settings is not None else None
    # The group's limits; the agent's defaults stand in for those it does not set.
    limits = {"memory_mb": settings.memory_mb, "cpus": settings.cpus,
              "processes": settings.max_processes} if settings is not None else None
    claimed = []
    for row in rows:
        book = books[(row.runbook_name, row.runbook_version)]
        claimed.append({"id": row.id, "kind": "job", "created_at": row.created_at, "payload": {
            "job_id": row.id, "attempt": row.attempt, "runbook": row.runbook_name,
            "version": row.runbook_version, "type": book.type, "content": book.content,
            "params": row.params, "timeout": row.timeout_seconds,
            "log_verbose": book.log_verbose, "log_progress": book.log_progress,
            "run_as": run_as, "limits": limits,
            "seq_base": (row.attempt - 1) << SEQ_SHIFT}})
    return claimed


# A runbook version never changes once published (a new version is a new row) and is never
# deleted, so what a claim sends of it is kept here after the first read, up to
# _BOOKS_BYTES of content (then the cache starts again empty).
_BOOKS_BYTES = 16 * 1024 * 1024
_books_seen: dict[tuple[str, str, int], Any] = {}
_books_size = [0]


async def _books(conn: AsyncConnection, account_id: str,
                 wanted: set[tuple[str, int]]) -> dict[tuple[str, int], Any]:
    """The type, content and stream switches of each runbook version (name, version)."""
    found = {key: _books_seen[(account_id, *key)] for key in wanted
             if (account_id, *key) in _books_seen}
    missing = [key for key in wanted if key not in found]
    if missing:
        rb = runbook_table.c
        for b in (await conn.execute(sa.select(
                rb.name, rb.version, rb.type, rb.content, rb.log_verbose, rb.log_progress
        ).where(rb.account_id == account_id,
                sa.tuple_(rb.name, rb.version).in_(missing)))).all():
            found[(b.name, b.version)] = b
            size = len(b.content)
            if _books_size[0] + size > _BOOKS_BYTES:
                _books_seen.clear()
                _books_size[0] = 0
            _books_seen[(account_id, b.name, b.version)] = b
            _books_size[0] += size
    return found


async def _attempt(conn: AsyncConnection, machine_id: str, job_id: str, attempt: int) -> Any:
    """The job, if ``attempt`` of it was made by this machine; else not found."""
    row = (await conn.execute(
        sa.select(jobs).join(job_attempts, job_attempts.c.job_id == jobs.c.id).where(
            jobs.c.id == job_id, job_attempts.c.number == attempt,
            job_attempts.c.machine_id == machine_id))).first()
    if row is None:
        raise _no_attempt(job_id, attempt)
    return row


def _no_attempt(job_id: str, attempt: int) -> OutpostError:
    return OutpostError("not_found", f"No attempt {attempt} of job '{job_id}' was made by "
                        "this machine.")


def _current(row: Any, machine_id: str, attempt: int) -> bool:
    return bool(row.machine_id == machine_id and row.attempt == attempt
                and row.status in HELD)


async def report(engine: AsyncEngine, machine_id: str, job_id: str, attempt: int, *,
                 started: bool = False, records: list[dict[str, Any]] | None = None,
                 end: dict[str, Any] | None = None) -> str:
    """What an agent reports of one attempt, in one transaction: that its process started,
    output records, and its end. Returns the job's state after it.

    Records of an attempt that has ended are still taken from the machine that made it: an
    agent that was cut off or restarted delivers what it spooled, and nothing is lost.
    """
    rows = await _record_rows(job_id, attempt, records or [])
    async with engine.begin() as conn:
        return await _apply(conn, machine_id, job_id, attempt, started, rows, end)


async def report_many(engine: AsyncEngine, machine: Any, reports: list[dict[str, Any]],
                      capacity: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Several attempts' reports in one transaction, each as ``report`` takes it; then, if
    any of them ended an attempt and ``capacity`` is given, a claim for the freed slots.

    Returns one result per report, in order (``{"id", "status"}``, or ``{"id", "error"}``
    for a report that is refused: the others still count), and the claimed jobs. The
    statements are one per kind of change for the whole batch, not one per report.
    """
    results: list[dict[str, Any]] = [{} for _ in reports]
    checked = []
    for index, item in enumerate(reports):
        try:
            rows = await _record_rows(item["job_id"], item["attempt"],
                                      item.get("records") or [])
        except OutpostError as exc:
            results[index] = {"id": item["job_id"], "error": exc.to_body()}
            continue
        checked.append((index, item, rows))
    ended = False
    async with engine.begin() as conn:
        made = await _attempts(conn, machine.id, [item["job_id"] for _, item, _ in checked])
        now = time.time()
        running: list[dict[str, Any]] = []
        records: list[dict[str, Any]] = []
        closing: list[dict[str, Any]] = []
        finishing: list[dict[str, Any]] = []
        parents: list[str | None] = []
        for index, item, rows in checked:
            job_id, attempt, end = item["job_id"], item["attempt"], item.get("end")
            row = made.get((job_id, attempt))
            if row is None:
                results[index] = {"id": job_id, "error": _no_attempt(job_id, attempt).to_body()}
                continue
            status = str(row.status)
            current = _current(row, machine.id, attempt)
            started_at = row.started_at
            if item.get("started") and current and status in ("Activating", "Resuming"):
                if status == "Activating":
                    started_at = now
                status = "Running"
                if end is None:
                    running.append({"b_id": job_id, "b_started": started_at})
            records += rows
            if end is not None and current:
                ended = True
                final = _outcome(status, end.get("exit_code"), end.get("signal"),
                                 end.get("cause", "exit"))
                if final is None:  # a failed activation: rare, so one at a time
                    if started_at != row.started_at:
                        await conn.execute(_MARK_RUNNING, [{"b_id": job_id,
                                                            "b_started": started_at}])
                    status = await _activation_failed(
                        conn, row, now, end.get("reason", ""), end.get("exit_code"),
                        end.get("signal"), end.get("run_as"))
                else:
                    closing.append({"b_job": job_id, "b_number": attempt, "b_ended": now,
                                    "b_exit": end.get("exit_code"), "b_signal": end.get("signal"),
                                    "b_reason": end.get("reason", ""),
                                    "b_run_as": end.get("run_as")})
                    finishing.append(_ended_values(row, final, now, end, started_at))
                    status = final
                    if final in FINAL:
                        parents.append(row.parent_id)
            elif end is not None:
                ended = True
            results[index] = {"id": job_id, "status": status}
        if running:
            await conn.execute(_MARK_RUNNING, running)
        await _insert_records(conn, records)
        if closing:
            await conn.execute(_CLOSE_ATTEMPT, closing)
            await conn.execute(_FINISH_JOB, finishing)
            await fanout.ended(conn, parents)
        claimed = await claim(conn, machine, capacity) if ended and capacity > 0 else []
    for values in finishing:
        if values["b_ended"] is not None:
            _tell_ended(values["b_status"], values["b_started"], values["b_ended"])
    return results, claimed


_MARK_RUNNING = jobs.update().where(jobs.c.id == sa.bindparam("b_id")).values(
    status="Running", started_at=sa.bindparam("b_started"))
_CLOSE_ATTEMPT = job_attempts.update().where(
    job_attempts.c.job_id == sa.bindparam("b_job"),
    job_attempts.c.number == sa.bindparam("b_number"),
    job_attempts.c.ended_at.is_(None)).values(
    ended_at=sa.bindparam("b_ended"), exit_code=sa.bindparam("b_exit"),
    signal=sa.bindparam("b_signal"), reason=sa.bindparam("b_reason"),
    run_as=sa.bindparam("b_run_as"))
_FINISH_JOB = jobs.update().where(jobs.c.id == sa.bindparam("b_id")).values(
    status=sa.bindparam("b_status"), started_at=sa.bindparam("b_started"),
    ended_at=sa.bindparam("b_ended"), exit_code=sa.bindparam("b_exit"),
    signal=sa.bindparam("b_signal"), reason=sa.bindparam("b_reason"), lease_expires_at=None,
    machine_id=sa.bindparam("b_machine"))


def _ended_values(row: Any, final: str, now: float, end: dict[str, Any],
                  started_at: float | None) -> dict[str, Any]:
    """The parameters of _FINISH_JOB for an attempt that ended the job in ``final``."""
    return {"b_id": row.id, "b_status": final, "b_started": started_at,
            "b_ended": now if final in FINAL else None, "b_exit": end.get("exit_code"),
            "b_signal": end.get("signal"), "b_reason": end.get("reason", ""),
            "b_machine": None if final == "Suspended" else row.machine_id}


async def _attempts(conn: AsyncConnection, machine_id: str, job_ids: list[str]
                    ) -> dict[tuple[str, int], Any]:
    """The jobs, by (job id, attempt number), of every attempt this machine made of them."""
    if not job_ids:
        return {}
    rows = (await conn.execute(_ATTEMPTS, {"b_ids": sorted(set(job_ids)),
                                           "b_machine": machine_id})).all()
    return {(r.id, r.number): r for r in rows}


_ATTEMPTS = (sa.select(jobs, job_attempts.c.number)
             .join(job_attempts, job_attempts.c.job_id == jobs.c.id)
             .where(job_attempts.c.job_id.in_(sa.bindparam("b_ids", expanding=True)),
                    job_attempts.c.machine_id == sa.bindparam("b_machine")))


async def _apply(conn: AsyncConnection, machine_id: str, job_id: str, attempt: int,
                 started: bool, rows: list[dict[str, Any]],
                 end: dict[str, Any] | None) -> str:
    row = await _attempt(conn, machine_id, job_id, attempt)
    status = str(row.status)
    started_at = row.started_at
    if started and _current(row, machine_id, attempt) and status in (
            "Activating", "Resuming"):
        values: dict[str, Any] = {"status": "Running"}
        if status == "Activating":
            values["started_at"] = started_at = time.time()
        await conn.execute(jobs.update().where(jobs.c.id == job_id).values(**values))
        status = "Running"
    await _insert_records(conn, rows)
    if end is not None and _current(row, machine_id, attempt):
        # (a repeated end, or one after the lease expired, changes nothing)
        status = await _finish(conn, row, status, **end, started_at=started_at)
    return status


_RECORD = TypeAdapter(OutputRecord)


def _record_row(job_id: str, base: int, index: int, record: Any) -> dict[str, Any]:
    """One record as a row. The common case (exact types within range) is checked here in
    a few comparisons: a request may carry tens of thousands of records, and validating each
    through the model cost several times as much. Anything else goes through the model,
    which coerces what it may (``"5"``) and names the field that is wrong."""
    try:
        seq, stream, text, at = record["seq"], record["stream"], record["text"], record["at"]
        continues = record.get("continues", False)
    except (KeyError, TypeError, AttributeError):
        seq = stream = text = at = continues = None
    if not (type(seq) is int and 0 <= seq <= INT64_MAX and type(stream) is str
            and type(text) is str and len(text) <= RECORD_TEXT_MAX
            and type(at) in (float, int) and 0 <= at <= INT64_MAX
            and type(continues) is bool):
        try:
            valid = _RECORD.validate_python(record)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = "".join(f".{p}" for p in first.get("loc", ()))
            raise OutpostError("invalid_request", f"Malformed output record: records[{index}]"
                               f"{field}: {first['msg']}.", fix="Send records with seq, stream, "
                               "text (at most 1 MiB) and at (seconds since the epoch).",
                               field=f"records[{index}]{field}") from exc
        seq, stream, text, at = valid.seq, valid.stream, valid.text, valid.at
        continues = valid.continues
    if stream not in STREAMS:
        raise OutpostError("invalid_request", f"Unknown stream '{stream[:32]}'.",
                           fix=f"Use one of {', '.join(STREAMS)}.")
    if not base <= seq < base + (1 << SEQ_SHIFT):
        raise OutpostError("invalid_request", f"Record {seq} is outside the numbers of "
                           f"attempt {(base >> SEQ_SHIFT) + 1}.")
    if "\x00" in text:
        # A runbook may print NUL, which PostgreSQL cannot store in text. Refusing the report
        # would lose the job's output: it is kept with U+FFFD in its place, on both
        # databases (every other text field refuses NUL: see hub/edge.py).
        text = text.replace("\x00", "\ufffd")
    return {"job_id": job_id, "seq": seq, "stream": stream, "text": text, "at": float(at),
            "continues": continues}


async def _record_rows(job_id: str, attempt: int, records: list[Any]) -> list[dict[str, Any]]:
    """The records as rows, checked; other requests run between slices of them (see
    _insert_records)."""
    base = (attempt - 1) << SEQ_SHIFT
    rows: list[dict[str, Any]] = []
    for start in range(0, len(records), RECORDS_AT_ONCE):
        if start:
            await asyncio.sleep(0)
        rows += [_record_row(job_id, base, index, record)
                 for index, record in enumerate(records[start:start + RECORDS_AT_ONCE], start)]
    return rows


RECORDS_AT_ONCE = 2000


async def _insert_records(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    """Insert output records a slice at a time, letting other requests run in between: on
    SQLite each statement runs in the event loop's thread (hub/sqlite_inline.py), and the
    tens of thousands of records one request may carry would hold every other request up."""
    for start in range(0, len(rows), RECORDS_AT_ONCE):
        if start:
            await asyncio.sleep(0)
        await conn.execute(_insert_new(conn), rows[start:start + RECORDS_AT_ONCE])


def _insert_new(conn: AsyncConnection) -> Any:
    """INSERT that skips a (job, seq) already stored: a batch sent twice adds nothing."""
    name = conn.dialect.name
    if name not in _INSERT_NEW:
        if name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            _INSERT_NEW[name] = pg_insert(job_records).on_conflict_do_nothing()
        else:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            _INSERT_NEW[name] = sqlite_insert(job_records).on_conflict_do_nothing()
    return _INSERT_NEW[name]


_INSERT_NEW: dict[str, Any] = {}


async def paused(engine: AsyncEngine, machine_id: str, job_id: str, attempt: int) -> str:
    """The agent stopped the runbook's process group (SIGSTOP) as asked."""
    async with engine.begin() as conn:
        row = await _attempt(conn, machine_id, job_id, attempt)
        if _current(row, machine_id, attempt) and row.status == "Suspending":
            await conn.execute(jobs.update().where(jobs.c.id == job_id).values(
                status="Suspended", reason="suspended by the operator"))
            return "Suspended"
        return str(row.status)


async def _close_attempt(conn: AsyncConnection, job_id: str, attempt: int, now: float,
                         exit_code: int | None, signal: int | None, reason: str,
                         run_as: str | None = None) -> None:
    await conn.execute(job_attempts.update().where(
        job_attempts.c.job_id == job_id, job_attempts.c.number == attempt,
        job_attempts.c.ended_at.is_(None)).values(
        ended_at=now, exit_code=exit_code, signal=signal, reason=reason, run_as=run_as))


async def _activation_failed(conn: AsyncConnection, row: Any, now: float, reason: str,
                             exit_code: int | None = None, signal: int | None = None,
                             run_as: str | None = None) -> str:
    """HW-1: back to the queue for any machine of the group; the third failure suspends."""
    await _close_attempt(conn, row.id, row.attempt, now, exit_code, signal, reason, run_as)
    if row.activations >= MAX_ACTIVATIONS:
        status, why = "Suspended", ACTIVATE_FAILED
    else:
        status, why = "Queued", f"activation {row.activations} failed: {reason}"
    await conn.execute(jobs.update().where(jobs.c.id == row.id).values(
        status=status, reason=why, machine_id=None, lease_expires_at=None))
    return status


def _outcome(status: str, exit_code: int | None, signal: int | None,
             cause: str = "exit") -> str | None:
    """The state an attempt's end leaves the job in; None for a failed activation."""
    if status == "Stopping" or cause == "stopped":
        return "Stopped"
    if status == "Suspending" and cause != "exit":
        # Asked to pause, and the process went away first: nothing is left to resume, so
        # resuming queues it afresh.
        return "Suspended"
    if cause in ("killed", "lost"):
        return None
    return "Completed" if exit_code == 0 and signal is None else "Failed"


async def _finish(conn: AsyncConnection, row: Any, status: str, exit_code: int | None,
                  signal: int | None, reason: str, cause: str = "exit",
                  run_as: str | None = None, started_at: float | None = None) -> str:
    """The attempt's process ended; returns the job's state after it.

    ``cause`` says who ended it: ``exit`` (the runbook, by itself), ``timeout``, ``stopped``
    (the agent, asked by the operator), ``killed`` (a signal the agent did not send: the
    sandbox died) or ``lost`` (the agent restarted while the job ran). The last two are
    failed activations; a runbook that exits non-zero is Failed and never retried.
    """
    now = time.time()
    final = _outcome(status, exit_code, signal, cause)
    if final is None:
        return await _activation_failed(conn, row, now, reason, exit_code, signal, run_as)
    await _close_attempt(conn, row.id, row.attempt, now, exit_code, signal, reason, run_as)
    await conn.execute(jobs.update().where(jobs.c.id == row.id).values(
        status=final, ended_at=now if final in FINAL else None, exit_code=exit_code,
        signal=signal, reason=reason, lease_expires_at=None,
        machine_id=None if final == "Suspended" else row.machine_id))
    if final in FINAL:
        await fanout.ended(conn, [row.parent_id])
        _tell_ended(final, started_at if started_at is not None else row.started_at, now)
    return final


async def renew(engine: AsyncEngine, machine: Any,
                held: list[tuple[str, int]]) -> list[str]:
    """Renew the leases of the jobs a heartbeat says the agent runs.

    Returns the jobs the agent should let go of: those it runs on an attempt the hub has
    given up (its lease expired while it was cut off, or the job was removed).
    """
    if not held:
        return []
    now = time.time()
    async with engine.begin() as conn:
        rows = {r.id: r for r in (await conn.execute(
            sa.select(jobs.c.id, jobs.c.attempt, jobs.c.status, jobs.c.machine_id).where(
                jobs.c.id.in_([job_id for job_id, _ in held])))).all()}
        keep, drop = [], []
        for job_id, attempt in held:
            row = rows.get(job_id)
            if row is not None and row.attempt == attempt and row.machine_id == machine.id:
                if row.status in HELD:
                    keep.append(job_id)
                # else it has just ended: its report crossed this heartbeat
            else:
                drop.append(job_id)  # reaped, retried elsewhere, or gone
        if keep:
            await conn.execute(jobs.update().where(
                jobs.c.id.in_(keep), jobs.c.machine_id == machine.id).values(
                lease_expires_at=now + lease_seconds(machine)))
    return drop


async def _extend_leases(conn: AsyncConnection, now: float) -> None:
    """Every held job gets a full lease from ``now`` (see Reaper)."""
    interval = sa.select(machines.c.heartbeat_interval).where(
        machines.c.id == jobs.c.machine_id).scalar_subquery()
    length = sa.func.coalesce(interval, 30.0) * LEASE_BEATS
    # (a job held by no machine, such as the parent of a job on every machine, has no lease)
    await conn.execute(jobs.update().where(jobs.c.status.in_(HELD),
                                           jobs.c.machine_id.isnot(None)).values(
        lease_expires_at=now + sa.case((length < LEASE_MIN, LEASE_MIN), else_=length)))


# An attempt whose claim the machine never received (the answer that carried it was lost)
NOT_RECEIVED = ("the machine never received it: its heartbeats went on without listing the "
                "job (the answer that carried it was lost); queued again, not counted as a "
                "failed activation")
# ... is not counted at most this many times a job, so a job an agent always drops without
# a word still ends Suspended rather than circling for ever.
NOT_RECEIVED_MAX = 3


async def _never_received(conn: AsyncConnection, row: Any) -> bool:
    """Whether an Activating job whose lease expired never reached its machine.

    The machine's agent lists every job it holds in each heartbeat, from the moment it gets
    the claim. If it went on heartbeating for a whole interval after the claim and no
    heartbeat listed the job (none renewed the lease), the claim never arrived: not a failed
    activation. A machine that stopped heartbeating (killed, cut off) still fails it."""
    if row.status != "Activating" or row.m_beat is None:
        return False
    claimed = await conn.scalar(sa.select(job_attempts.c.started_at).where(
        job_attempts.c.job_id == row.id, job_attempts.c.number == row.attempt))
    if claimed is None or row.m_beat < claimed + float(row.m_interval or 30):
        return False
    earlier = await conn.scalar(sa.select(sa.func.count()).select_from(job_attempts).where(
        job_attempts.c.job_id == row.id, job_attempts.c.reason == NOT_RECEIVED))
    return int(earlier or 0) < NOT_RECEIVED_MAX


# A pass of the reaper that begins this long after the last one ended (the database hung
# without an error, or the process stalled) finds leases nobody could renew meanwhile.
REAP_GAP = 3.0


class Reaper:
    """HW-1's reaper in one hub process (run once a second): every expired lease ends.

    A lease must not run out for time during which the hub could not record its renewals:
    when the database comes back, the agents' next heartbeats (still listing their attempts)
    must find their leases standing. So a pass first gives every held job a full lease from
    now when this process may have missed renewals since its last completed pass: on its
    first pass (the hub just started), after any database failure it saw (a request or a
    task, counted in the engine's ``health``), or when the pass begins more than REAP_GAP
    seconds after the last one ended. The extension and the judging are one transaction, so
    no pass judges a lease through an outage its process saw. A machine that stays silent
    for a whole lease after that still loses its jobs (HW-1).
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._ended: float | None = None  # time.monotonic() as the last completed pass ended
        self._failures = 0  # the engine's failures as that pass began

    async def __call__(self) -> list[tuple[str, str]]:
        """One pass; returns the (account, group) pairs to wake."""
        health = getattr(self.engine, "health", None)
        failures = health.failures if health is not None else 0
        async with self.engine.begin() as conn:
            # Taken once the connection answered: time before that was not the database's.
            now, began = time.time(), time.monotonic()
            if self._ended is None or began - self._ended > REAP_GAP \
                    or failures != self._failures:
                await _extend_leases(conn, now)
            woken = await _reap(conn, now)
        self._ended, self._failures = time.monotonic(), failures
        return woken


async def _reap(conn: AsyncConnection, now: float) -> list[tuple[str, str]]:
    """End every lease that expired before ``now``; returns the (account, group) pairs to
    wake."""
    woken = []
    rows = (await conn.execute(
        sa.select(jobs, machines.c.last_heartbeat_at.label("m_beat"),
                  machines.c.heartbeat_interval.label("m_interval"))
        .select_from(jobs.outerjoin(machines, machines.c.id == jobs.c.machine_id))
        .where(jobs.c.status.in_(HELD), jobs.c.lease_expires_at < now)
        .with_for_update(of=jobs, skip_locked=True))).all()
    for row in rows:
        reason = "lease expired: the machine stopped renewing it (no heartbeat)"
        if await _never_received(conn, row):
            await _close_attempt(conn, row.id, row.attempt, now, None, None, NOT_RECEIVED)
            await conn.execute(jobs.update().where(jobs.c.id == row.id).values(
                status="Queued", machine_id=None, lease_expires_at=None,
                activations=jobs.c.activations - 1,
                reason=f"attempt {row.attempt}: {NOT_RECEIVED}"))
            woken.append((row.account_id, row.group_name))
        elif row.status == "Stopping":
            await _close_attempt(conn, row.id, row.attempt, now, None, None, reason)
            await conn.execute(jobs.update().where(jobs.c.id == row.id).values(
                status="Stopped", ended_at=now, lease_expires_at=None,
                reason="stopped; the machine was lost before it confirmed"))
            await fanout.ended(conn, [row.parent_id])
            _tell_ended("Stopped", row.started_at, now)
        elif row.status in ("Suspending", "Suspended", "Resuming"):
            await _close_attempt(conn, row.id, row.attempt, now, None, None, reason)
            await conn.execute(jobs.update().where(jobs.c.id == row.id).values(
                status="Suspended", machine_id=None, lease_expires_at=None,
                reason="suspended; the machine that held it was lost"))
        elif await _activation_failed(conn, row, now, reason) == "Queued":
            woken.append((row.account_id, row.group_name))
    return woken


async def control(engine: AsyncEngine, account_id: str, job_id: str,
                  action: str) -> tuple[dict[str, Any], str | None]:
    """stop, suspend or resume; returns the job and the machine to tell, if one holds it."""
    async with engine.connect() as conn:
        parent = await fanout.is_parent(conn, account_id, job_id)
    if parent:  # a job on every machine of a group: its children are told
        if action != "stop":
            raise OutpostError("fanout_control_unsupported", job=job_id, action=action)
        await fanout.stop(engine, account_id, job_id)
        return await get(engine, account_id, job_id), None
    async with engine.begin() as conn:
        row = (await conn.execute(sa.select(jobs).where(
            jobs.c.id == job_id, jobs.c.account_id == account_id))).first()
        if row is None:
            raise OutpostError("not_found", f"No job '{job_id}' in this account.",
                               fix="See 'outpost job list'.")
        now = time.time()
        on_machine = row.machine_id is not None and row.status in HELD
        values: dict[str, Any]
        if action == "stop" and row.status in ("New", "Queued", "Suspended") \
                and not on_machine:
            values = {"status": "Stopped", "ended_at": now, "reason": "stopped by the operator"}
        elif action == "stop" and on_machine and row.status != "Stopping":
            values = {"status": "Stopping", "reason": "stop requested by the operator"}
        elif action == "suspend" and row.status in ("New", "Queued"):
            values = {"status": "Suspended", "reason": "suspended by the operator"}
        elif action == "suspend" and row.status in ("Activating", "Running", "Resuming"):
            values = {"status": "Suspending", "reason": "suspend requested by the operator"}
        elif action == "resume" and row.status == "Suspended" and on_machine:
            values = {"status": "Resuming", "reason": "resume requested by the operator"}
        elif action == "resume" and row.status == "Suspended":
            # A fresh start: the count of failed activations begins again (HW-1); attempts
            # keep their numbers.
            values = {"status": "Queued", "activations": 0, "reason": "resumed by the operator"}
        else:
            allowed = {"stop": "New, Queued, Activating, Running, Suspending, Suspended or "
                               "Resuming", "suspend": "Queued, Activating, Running or Resuming",
                       "resume": "Suspended"}[action]
            raise OutpostError("job_state_conflict", f"Job '{job_id}' is {row.status}; "
                               f"'{action}' applies to a job that is {allowed}.",
                               job=job_id, status=row.status, action=action)
        await conn.execute(jobs.update().where(jobs.c.id == job_id).values(**values))
        if values["status"] == "Stopped":
            await fanout.ended(conn, [row.parent_id])
    if values["status"] == "Stopped":
        _tell_ended("Stopped", row.started_at, now)
    tell = row.machine_id if on_machine and values["status"] in (
        "Stopping", "Suspending", "Resuming") else None
    return await get(engine, account_id, job_id), tell


PREFIX_MIN = 4  # the shortest start of a job id taken in place of the id
_PREFIX = re.compile(r"^[0-9a-f-]+$")
_CANDIDATES = 10  # how many jobs an ambiguous prefix names


async def resolve(engine: AsyncEngine, account_id: str, job_id: str) -> str:
    """The id of the account's job that ``job_id`` names: the id itself, or any unique start
    of it of at least PREFIX_MIN characters (as git takes commits). A full id is returned
    unread (the route reads it anyway); none matching is left for the route to refuse
    (E3002), several matching are refused here (E8040) with the candidates."""
    text = job_id.strip().lower()
    if len(text) >= FULL_ID or not _PREFIX.match(text):
        return job_id
    if len(text) < PREFIX_MIN:
        raise OutpostError("not_found", f"No job '{job_id}' in this account.",
                           fix=f"Give at least {PREFIX_MIN} characters of the job's id "
                               "('outpost job list').", job=job_id)
    async with engine.connect() as conn:
        found = (await conn.execute(
            sa.select(jobs.c.id, jobs.c.runbook_name, jobs.c.status)
            .where(jobs.c.account_id == account_id, jobs.c.id.like(text + "%"))
            .order_by(jobs.c.created_at.desc()).limit(_CANDIDATES + 1))).all()
    if len(found) == 1:
        return str(found[0].id)
    if not found:
        return job_id
    shown = ", ".join(f"{r.id} ({r.runbook_name}, {r.status})" for r in found[:_CANDIDATES])
    more = " and more" if len(found) > _CANDIDATES else ""
    raise OutpostError("job_id_ambiguous",
                       f"Job id prefix '{job_id}' matches several jobs: {shown}{more}.",
                       fix="Give more characters of the id.", prefix=job_id,
                       candidates=[r.id for r in found[:_CANDIDATES]])


VIEW_KEYS = ("id", "runbook_name", "runbook_version", "group_name", "params", "status",
             "timeout_seconds", "created_at", "started_at", "ended_at", "machine_id",
             "activations", "attempt", "exit_code", "signal", "reason", "parent_id")


def _view(row: Any) -> dict[str, Any]:
    return {k: row._mapping[k] for k in VIEW_KEYS}


async def get(engine: AsyncEngine, account_id: str, job_id: str) -> dict[str, Any]:
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(jobs).where(
            jobs.c.id == job_id, jobs.c.account_id == account_id))).first()
        if row is None:
            raise OutpostError("not_found", f"No job '{job_id}' in this account.",
                               fix="See 'outpost job list'.")
        parent = await fanout.detail(conn, account_id, job_id)
        if parent is not None:
            return parent
        tried = (await conn.execute(
            sa.select(job_attempts, machines.c.name.label("machine"))
            .select_from(job_attempts.outerjoin(
                machines, machines.c.id == job_attempts.c.machine_id))
            .where(job_attempts.c.job_id == job_id).order_by(job_attempts.c.number))).all()
        waiting = await _waiting_for(conn, row) if row.status == "Queued" else None
    view = _view(row)
    view["attempts"] = [{k: a._mapping[k] for k in (
        "number", "machine_id", "machine", "started_at", "ended_at", "exit_code", "signal",
        "reason", "run_as")} for a in tried]
    if waiting:
        view["waiting_for"] = waiting
    return view


async def _waiting_for(conn: AsyncConnection, row: Any) -> str | None:
    """Why a queued job may wait long: its group has no machine, or none is Healthy."""
    members = (await conn.execute(sa.select(machines).where(
        machines.c.account_id == row.account_id,
        machines.c.group_name == row.group_name))).all()
    group = row.group_name
    if not members:
        return (f"No machine is registered in group '{group}': the job waits until one is "
                f"('outpost agent register ... --group {group}').")
    now = time.time()
    states = {m.name: machine_status(m, now) for m in members}
    if "Healthy" in states.values():
        return None
    shown = ", ".join(f"{name} {state}" for name, state in sorted(states.items())[:5])
    return (f"No machine of group '{group}' is Healthy ({shown}): the job waits until one "
            f"heartbeats ('outpost machine list').")


async def listing(engine: AsyncEngine, account_id: str, status: str | None = None,
                  limit: int = 200) -> list[dict[str, Any]]:
    if status is not None:  # in any case, as a stream's name
        known = {state.lower(): state for state in STATES}
        if status.strip().lower() not in known:
            raise OutpostError("invalid_request", f"Unknown job status '{status}'.",
                               fix=f"Use one of {', '.join(STATES)} (in any case).")
        status = known[status.strip().lower()]
    # A job on every machine of a group is listed once, as its parent.
    query = sa.select(jobs).where(jobs.c.account_id == account_id, jobs.c.parent_id.is_(None))
    if status:
        query = query.where(jobs.c.status == status)
    async with engine.connect() as conn:
        rows = (await conn.execute(
            query.order_by(jobs.c.created_at.desc()).limit(limit))).all()
    return [_view(r) for r in rows]


def stream_name(name: str) -> str:
    """A stream's name as stored, from any case ("error" is Error); else E3003."""
    for stream in STREAMS:
        if stream.lower() == name.strip().lower():
            return stream
    raise OutpostError("invalid_request", f"Unknown stream '{name}'.",
                       fix=f"Use one of {', '.join(STREAMS)} (in any case).", stream=name)


async def records(engine: AsyncEngine, account_id: str, job_id: str, after: int = -1,
                  streams: list[str] | None = None, limit: int = 10000
                  ) -> list[dict[str, Any]]:
    """Up to ``limit`` records after sequence ``after``, in order (a page: ask again with the
    last one's ``seq`` for the next)."""
    if streams:
        streams = [stream_name(s) for s in streams]
    async with engine.connect() as conn:  # existence and account
        if await conn.scalar(sa.select(jobs.c.id).where(
                jobs.c.id == job_id, jobs.c.account_id == account_id)) is None:
            raise OutpostError("not_found", f"No job '{job_id}' in this account.",
                               fix="See 'outpost job list'.")
    query = sa.select(job_records).where(job_records.c.job_id == job_id,
                                         job_records.c.seq > after)
    if streams:
        query = query.where(job_records.c.stream.in_(streams))
    async with engine.connect() as conn:
        rows = (await conn.execute(query.order_by(job_records.c.seq).limit(limit))).all()
    return [{"seq": r.seq, "stream": r.stream, "text": r.text, "at": r.at,
             "continues": bool(r.continues)} for r in rows]
