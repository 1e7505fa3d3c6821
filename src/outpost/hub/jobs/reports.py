"""Reports: what an agent says of an attempt (started, output records, end, paused), and
how an attempt's end settles the job."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import sqlalchemy as sa
from pydantic import TypeAdapter, ValidationError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from outpost.protocol.errors import OutpostError
from outpost.protocol.models import INT64_MAX, RECORD_TEXT_MAX, OutputRecord

from .. import fanout, notify
from ..db import job_attempts, job_records, jobs
from .claims import claim
from .states import ACTIVATE_FAILED, FINAL, HELD, MAX_ACTIVATIONS, SEQ_SHIFT, STREAMS, _tell_ended


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
        parents: list[tuple[str, str | None]] = []
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
                        parents.append((row.id, row.parent_id))
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
        keys = []
        if ended and not claimed:
            # Nothing was claimed here (no capacity given, or no job queued): the waiting
            # long-poll looks again, for work items too.
            keys.append(notify.machine(machine.id))
        if any(result.get("status") == "Queued" for result in results):
            keys.append(notify.group(machine.account_id, machine.group_name))
        if keys:
            await notify.wake(conn, *keys)
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
    if end is not None:
        # The machine's slot is free: its waiting long-poll claims again at once; a failed
        # activation is queued again for any machine of the group.
        await notify.wake(conn, notify.machine(machine_id), *(
            [notify.group(row.account_id, row.group_name)] if status == "Queued" else []))
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
        await fanout.ended(conn, [(row.id, row.parent_id)])
        _tell_ended(final, started_at if started_at is not None else row.started_at, now)
    return final
