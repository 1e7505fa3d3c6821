"""Schedules: at the times of a cron expression, a runbook started on a group, or an
extension's operation asked of every machine of a group (or of one machine).

A schedule row holds its next due time, ``next_run_at``: a cron time plus the schedule's
offset within its spread (EX-7). The scheduler loop runs in one hub process, the leader
(leader.py: an advisory lock on PostgreSQL; the only process on SQLite). It fires a due
schedule with one conditional ``UPDATE ... SET next_run_at = new WHERE id = ? AND
next_run_at = old`` and inserts the job (or the operations) and the run's record in the same
transaction. A second hub process, or a hub killed half-way and started again, therefore
never starts one run twice: whoever loses the race updates no row and inserts nothing, and
the primary key of ``schedule_runs`` (schedule, due time) refuses a second record as a last
line of defence (for operations, so does the unique key (schedule, due time, machine) of
``extension_operations``).

An extension operation's schedule fires at the cron time itself; each machine's operation
starts at its own offset within the spread, a hash of (schedule, machine), so a fleet starts
spread over the window rather than at one second (``not_before``: hub/extension_ops.py).

Runs missed while no hub was running: only the most recent one is started, as soon as a hub
is back; older ones are skipped, and the run that fires records how many (``missed``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import time
from datetime import datetime
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import sqlalchemy as sa
from croniter import CroniterBadDateError, croniter
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from outpost.protocol import durations
from outpost.protocol.errors import OutpostError
from outpost.protocol.extensions import Manifest

from . import jobs
from .config import random_id
from .db import jobs as job_table
from .db import DatabaseUnavailable, extension_operations, extension_packages, schedule_runs
from .db import machines as machine_rows
from .db import schedules
from .dispatcher import Dispatcher
from .extension_ops import SCHEDULED, ExtensionOps
from .leader import Leadership
from .machines import check_group
from .machines import find as find_machine
from .runbooks import NAME_RE

log = logging.getLogger("outpost.hub.schedules")

MAX_SPREAD = 7 * 86400.0
MAX_SLEEP = 1.0  # how long the loop may miss a schedule created by another hub process
MISSED_COUNT_CAP = 1000  # counting skipped runs costs a cron step each
RETRY_AFTER = 30.0  # a schedule whose firing failed unexpectedly waits this long
_KEYWORDS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
# Jenkins-style hashed (H) and random (R) fields: --spread is the supported way to stagger.
_RANDOM_FIELD = re.compile(r"(?<![A-Za-z])[HR](?![A-Za-z])", re.IGNORECASE)
_ZONE_NAME = re.compile(r"^[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*$")


@cache
def _zone_names() -> frozenset[str]:
    return frozenset(available_timezones())


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``, or E6002."""
    if len(name) <= 64 and _ZONE_NAME.match(name) and name in _zone_names():
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            pass
    raise OutpostError("timezone_unknown", f"Unknown time zone '{name}'.",
                       timezone=name[:64])


def parse_spread(value: str | float) -> float:
    """``'90'``, ``'10min'``, ``'1h30m'``, ``'2d'`` or a number -> seconds, at most 7 days;
    else E7051 (protocol/durations.py, as every duration)."""
    return durations.parse(value, "spread", maximum=MAX_SPREAD)


def offset_for(schedule_id: str, spread: float) -> float:
    """A stable place in [0, spread) for this schedule, in whole milliseconds (EX-7).

    It comes from a hash of the schedule's id, so it is the same on every hub process and
    after every restart, and schedules made for the same cron time fall apart.
    """
    return _place(schedule_id, spread)


def machine_offset(schedule_id: str, machine_id: str, spread: float) -> float:
    """The place in [0, spread) of one machine's operation in each run of an extension
    operation's schedule (EX-7): a hash of both ids, so stable for the pair, and spread
    evenly over the window across a fleet."""
    return _place(f"{schedule_id}/{machine_id}", spread)


def _place(key: str, spread: float) -> float:
    if spread <= 0:
        return 0.0
    digest = hashlib.sha256(key.encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2.0**64
    return math.floor(fraction * spread * 1000) / 1000


class Cron:
    """A checked cron expression in a time zone: 5 fields, 6 with seconds first, or a
    keyword such as ``@daily``. Cron times are whole seconds since the epoch."""

    def __init__(self, expr: str, tz_name: str) -> None:
        self.expr = " ".join(expr.split())
        self.tz = zone(tz_name)
        self._check()

    def _invalid(self, why: str) -> OutpostError:
        return OutpostError("cron_invalid", f"Cron expression '{self.expr[:128]}': {why}.",
                            cron=self.expr[:128])

    def _check(self) -> None:
        if not self.expr or len(self.expr) > 128:
            raise self._invalid("give 1 to 128 characters")
        if self.expr.startswith("@"):
            if self.expr.lower() not in _KEYWORDS:
                raise self._invalid(f"unknown keyword; use one of {', '.join(_KEYWORDS)}")
            self.expr = self.expr.lower()
        else:
            fields = len(self.expr.split())
            if fields not in (5, 6):
                raise self._invalid(
                    f"it has {fields} fields; give 5 (minute hour day month weekday) or 6 "
                    "(second minute hour day month weekday)")
            if _RANDOM_FIELD.search(self.expr):
                raise self._invalid("random and hashed fields (R, H) are not supported; use "
                                    "--spread to stagger runs")
        try:
            self.after(time.time())
        except CroniterBadDateError as exc:
            raise self._invalid("it matches no date in the next 50 years") from exc
        # croniter reports a bad field as a ValueError subclass; the others guard odd input
        # reaching its parser.
        except (ValueError, KeyError, IndexError, TypeError, OverflowError) as exc:
            raise self._invalid(str(exc).rstrip(".") or type(exc).__name__) from exc

    def _iter(self, moment: float) -> Any:
        return croniter(self.expr, datetime.fromtimestamp(moment, self.tz),
                        second_at_beginning=True)

    def after(self, moment: float) -> float:
        """The first cron time strictly after ``moment``.

        When clocks go back, croniter yields a wall-clock time of the repeated hour twice;
        the second is skipped so a daily 02:30 runs once that night.
        """
        it = self._iter(moment)
        nxt: datetime = it.get_next(datetime)
        wall = datetime.fromtimestamp(moment, self.tz).replace(tzinfo=None)
        if nxt.replace(tzinfo=None) == wall:
            nxt = it.get_next(datetime)
        return float(round(nxt.timestamp()))

    def latest(self, moment: float) -> float:
        """The last cron time at or before ``moment``."""
        prev: datetime = self._iter(moment).get_prev(datetime)
        found = float(round(prev.timestamp()))
        following = self.after(found)
        return following if following <= moment else found


def _iso(moment: float | None, tz: ZoneInfo) -> str | None:
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, tz).isoformat(timespec="milliseconds")


def _view(row: Any) -> dict[str, Any]:
    tz = ZoneInfo(row.timezone)
    kind = "extension" if row.extension else "runbook"
    target_kind = "machine" if row.machine_name else "group"
    return {"id": row.id, "name": row.name, "kind": kind, "runbook_name": row.runbook_name,
            "extension": row.extension, "operation": row.operation,
            "target_kind": target_kind, "target": row.machine_name or row.group_name,
            "group_name": row.group_name, "machine_name": row.machine_name,
            "params": row.params, "cron": row.cron,
            "timezone": row.timezone, "spread_seconds": row.spread_seconds,
            "offset_seconds": row.offset_seconds, "enabled": bool(row.enabled),
            "next_run_at": row.next_run_at if row.enabled else None,
            "next_run": _iso(row.next_run_at, tz) if row.enabled else None,
            "last_run_at": row.last_run_at, "last_run": _iso(row.last_run_at, tz),
            "created_at": row.created_at}


def _target(runbook: str | None, extension: str | None, operation: str | None,
            group: str | None, machine: str | None) -> None:
    """Exactly one of runbook and extension (with its operation), of group and machine."""
    if (runbook is None) == (extension is None):
        raise OutpostError("schedule_kind_invalid", "Give exactly one of runbook (a job on "
                           "one machine of the group) and extension (an operation on every "
                           f"machine of it); {'both' if runbook else 'neither'} was given.")
    if runbook is not None and operation is not None:
        raise OutpostError("schedule_kind_invalid", "An operation is given with an "
                           "extension, not with a runbook.")
    if extension is not None and operation is None:
        raise OutpostError("schedule_kind_invalid", f"Say which operation of extension "
                           f"{extension} to run (--operation).")
    if (group is None) == (machine is None):
        raise OutpostError("schedule_target_invalid", "Give exactly one of group and "
                           f"machine; {'both' if group else 'neither'} was given.")
    if runbook is not None and machine is not None:
        raise OutpostError("schedule_target_invalid", "A runbook's schedule starts its job "
                           "on one machine of a group: give a group, not a machine.")


async def _check_operation(engine: AsyncEngine, account_id: str, extension: str,
                           operation: str) -> None:
    """The extension is published in the account and a version of it has the operation."""
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(extension_packages.c.manifest).where(
            extension_packages.c.account_id == account_id,
            extension_packages.c.name == extension))).all()
    if not rows:
        raise OutpostError("ext_not_found", f"No extension '{extension[:64]}' is published "
                           "in this account.", name=extension[:64])
    known: set[str] = set()
    for row in rows:
        known |= set(Manifest.model_validate(row.manifest).operations)
    if operation not in known:
        raise OutpostError(
            "schedule_operation_unknown", f"No published version of extension {extension} "
            f"has an operation '{operation[:64]}' (its operations: "
            f"{', '.join(sorted(known)) or 'none'}).", name=extension, operation=operation[:64])


async def create(engine: AsyncEngine, account_id: str, name: str, cron: str, tz_name: str,
                 spread: str | float, given: dict[str, Any], *, runbook: str | None = None,
                 group: str | None = None, extension: str | None = None,
                 operation: str | None = None, machine: str | None = None) -> dict[str, Any]:
    """Check everything (name, target, cron, zone, spread, runbook or operation, group or
    machine, parameters), then store."""
    if not NAME_RE.match(name):
        raise OutpostError("invalid_request", f"Invalid schedule name '{name[:128]}'.",
                           fix="Use 1 to 128 letters, digits, '.', '_' or '-'.")
    _target(runbook, extension, operation, group, machine)
    expr = Cron(cron, tz_name)
    spread_seconds = parse_spread(spread)
    schedule_id = random_id()
    if runbook is not None:
        # The job is checked now so a bad parameter is refused at once (the codes of 'job
        # start'), and the parameters given are stored typed as that check made them ("5"
        # for an int is 5); each run checks again against the runbook's latest version,
        # whose defaults fill in what was not given.
        job = await jobs.prepare(engine, account_id, runbook, str(group), given)
        given = {name: job["params"][name] for name in given}
        offset = offset_for(schedule_id, spread_seconds)
    else:
        # An operation's parameters are its own (public values, passed as given).
        if group is not None:
            check_group(group)
        else:
            machine = (await find_machine(engine, account_id, str(machine))).name
        await _check_operation(engine, account_id, str(extension), str(operation))
        offset = 0.0  # the run fires at the cron time; each machine has its own offset
    now = time.time()
    try:
        async with engine.begin() as conn:
            await conn.execute(schedules.insert().values(
                id=schedule_id, account_id=account_id, name=name, runbook_name=runbook,
                group_name=group, machine_name=machine, extension=extension,
                operation=operation, params=given, cron=expr.expr, timezone=tz_name,
                spread_seconds=spread_seconds, offset_seconds=offset, enabled=True,
                next_run_at=expr.after(now - offset) + offset, created_at=now))
    except IntegrityError as exc:
        raise OutpostError("conflict", f"A schedule named '{name}' already exists.",
                           fix="Choose another name, or remove it first with "
                               f"'outpost schedule remove {name}'.") from exc
    log.info("schedule %s created in account %s (%s, cron '%s' %s, spread %g s)", name,
             account_id, f"runbook {runbook}" if runbook else f"{extension} {operation}",
             expr.expr, tz_name, spread_seconds)
    return await get(engine, account_id, name)


async def _row(engine: AsyncEngine, account_id: str, name: str) -> Any:
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(schedules).where(
            schedules.c.account_id == account_id, schedules.c.name == name))).first()
    if row is None:
        raise OutpostError("not_found", f"No schedule '{name}' in this account.",
                           fix="See 'outpost schedule list'.")
    return row


async def get(engine: AsyncEngine, account_id: str, name: str,
              runs: int = 20) -> dict[str, Any]:
    """One schedule with its newest runs (each with its job's state, or the count of its
    operations by state); for an extension operation's schedule, the operations of its
    newest run, one per machine."""
    row = await _row(engine, account_id, name)
    r = schedule_runs.c
    o = extension_operations.c
    async with engine.connect() as conn:
        found = (await conn.execute(
            sa.select(r.due_at, r.fired_at, r.job_id, r.missed, r.error, r.operations,
                      r.skipped, job_table.c.status)
            .outerjoin(job_table, job_table.c.id == r.job_id)
            .where(r.schedule_id == row.id).order_by(r.due_at.desc()).limit(runs))).all()
        counts: dict[float, dict[str, int]] = {}
        latest: list[Any] = []
        if row.extension and found:
            oldest = found[-1].due_at
            for c in await conn.execute(
                    sa.select(o.schedule_due_at, o.status, sa.func.count())
                    .where(o.schedule_id == row.id, o.schedule_due_at >= oldest)
                    .group_by(o.schedule_due_at, o.status)):
                counts.setdefault(float(c[0]), {})[c[1]] = int(c[2])
            latest = list((await conn.execute(
                sa.select(o.id, o.status, o.code, o.message, o.not_before, o.started_at,
                          o.ended_at, machine_rows.c.name.label("machine"))
                .outerjoin(machine_rows, machine_rows.c.id == o.machine_id)
                .where(o.schedule_id == row.id, o.schedule_due_at == found[0].due_at)
                .order_by(o.not_before, machine_rows.c.name))).all())
    view = _view(row)
    tz = ZoneInfo(row.timezone)
    view["runs"] = [{"due_at": x.due_at, "due": _iso(x.due_at, tz), "fired_at": x.fired_at,
                     "job_id": x.job_id, "job_status": x.status, "missed": x.missed,
                     "error": x.error, "operations": x.operations, "skipped": x.skipped,
                     "operation_states": counts.get(float(x.due_at), {})
                     if row.extension else None} for x in found]
    if row.extension:
        due = found[0].due_at if found else 0.0
        view["latest_operations"] = [
            {"id": x.id, "machine": x.machine, "status": x.status, "code": x.code,
             "message": x.message, "not_before": x.not_before,
             "offset_seconds": None if x.not_before is None
             else round(x.not_before - due, 3),
             "started_at": x.started_at, "ended_at": x.ended_at} for x in latest]
    return view


async def listing(engine: AsyncEngine, account_id: str) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(schedules).where(
            schedules.c.account_id == account_id).order_by(schedules.c.name))).all()
    return [_view(row) for row in rows]


async def remove(engine: AsyncEngine, account_id: str, name: str) -> None:
    row = await _row(engine, account_id, name)
    async with engine.begin() as conn:
        await conn.execute(schedules.delete().where(schedules.c.id == row.id))
    log.info("schedule %s removed from account %s", name, account_id)


async def set_enabled(engine: AsyncEngine, account_id: str, name: str,
                      enabled: bool) -> dict[str, Any]:
    """Disable, or enable again from now on (runs due while disabled are not started)."""
    row = await _row(engine, account_id, name)
    values: dict[str, Any] = {"enabled": enabled}
    if enabled and not row.enabled:
        expr = Cron(row.cron, row.timezone)
        values["next_run_at"] = expr.after(time.time() - row.offset_seconds) + row.offset_seconds
    async with engine.begin() as conn:
        await conn.execute(schedules.update().where(schedules.c.id == row.id).values(**values))
    return await get(engine, account_id, name)


class Scheduler:
    """The loop that starts due runs; it fires only while this replica leads (see the module
    doc). Without ``leadership`` it always fires."""

    def __init__(self, engine: AsyncEngine, dispatcher: Dispatcher,
                 leadership: Leadership | None = None,
                 ext_ops: ExtensionOps | None = None) -> None:
        self._engine = engine
        self._dispatcher = dispatcher
        self._ext_ops = ext_ops
        self._wake = asyncio.Event()
        self._retry_at: dict[str, float] = {}
        self._leadership: Leadership | None = None
        if leadership is not None:
            self.follow(leadership)

    def follow(self, leadership: Leadership) -> None:
        """Fire only while ``leadership`` says this replica leads."""
        self._leadership = leadership
        leadership.on_change(self.wake)
        self.wake()

    def wake(self) -> None:
        """Look again now: a schedule was created or enabled in this process."""
        self._wake.set()

    async def run(self) -> None:
        """Fire due schedules, then sleep until the next is due (at most ``MAX_SLEEP``)."""
        while True:
            if self._leadership is None or self._leadership.leader:
                delay = await self.fire_due()
            else:
                delay = MAX_SLEEP  # a standby: woken when it becomes the leader
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass
            self._wake.clear()

    async def fire_due(self, batch: int = 200) -> float:
        """Start every due run; returns how long the loop may sleep."""
        now = time.time()
        async with self._engine.connect() as conn:
            due = (await conn.execute(
                sa.select(schedules).where(schedules.c.enabled.is_(True),
                                           schedules.c.next_run_at <= now)
                .order_by(schedules.c.next_run_at).limit(batch))).all()
        tried = 0
        for row in due:
            if self._retry_at.get(row.id, 0.0) > now:
                continue
            tried += 1
            try:
                await self._fire(row)
                self._retry_at.pop(row.id, None)
            except (asyncio.CancelledError, DatabaseUnavailable):
                raise  # an outage holds up every schedule alike: the loop's supervisor waits
            except Exception:
                # One broken schedule must not hold up the others, nor flood the log.
                self._retry_at[row.id] = time.time() + RETRY_AFTER
                log.exception("schedule %s (%s) could not be fired; retrying in %.0f s",
                              row.name, row.id, RETRY_AFTER)
        if len(due) == batch and tried:
            return 0.0  # more are due
        async with self._engine.connect() as conn:
            soonest = await conn.scalar(
                sa.select(sa.func.min(schedules.c.next_run_at)).where(
                    schedules.c.enabled.is_(True), schedules.c.next_run_at > now))
        if soonest is None:
            return MAX_SLEEP
        return min(MAX_SLEEP, max(0.0, float(soonest) - time.time()))

    async def _fire(self, row: Any) -> bool:
        """Start the run ``row`` is due for, unless another process did; True if started."""
        expr = Cron(row.cron, row.timezone)
        offset = float(row.offset_seconds)
        now = time.time()
        cron_at = float(round(row.next_run_at - offset))
        following = expr.after(cron_at)
        missed = 0
        if following + offset <= now:
            # The hub was down (or far behind) over several due times: start the newest.
            newest = expr.latest(now - offset)
            probe = cron_at
            while probe < newest and missed < MISSED_COUNT_CAP:
                missed += 1
                probe = expr.after(probe)
            cron_at, following = newest, expr.after(newest)
        due_at = cron_at + offset
        if row.extension:
            return await self._fire_operations(row, expr, due_at, following + offset, missed)
        job: dict[str, Any] | None = None
        error = None
        try:
            job = await jobs.prepare(self._engine, row.account_id, row.runbook_name,
                                     row.group_name, dict(row.params))
        except OutpostError as exc:  # the runbook was removed, or its parameters changed
            error = f"{exc.code} {exc.message}"
        async with self._engine.begin() as conn:
            if not await self._move(conn, row, following + offset, due_at):
                return False  # another hub process fired it, or it was changed meanwhile
            if job is not None:
                await jobs.insert(conn, job)
            await conn.execute(schedule_runs.insert().values(
                schedule_id=row.id, due_at=due_at, fired_at=time.time(),
                job_id=job["id"] if job else None, missed=missed, error=error))
        if job is None:
            log.warning("schedule %s (account %s) could not start its run due %s: %s",
                        row.name, row.account_id, _iso(due_at, expr.tz), error)
            return False
        self._log_missed(row, expr, due_at, missed)
        log.info("schedule %s started job %s (due %s)", row.name, job["id"],
                 _iso(due_at, expr.tz))
        return True

    async def _move(self, conn: AsyncConnection, row: Any, next_run_at: float,
                    due_at: float) -> bool:
        """The conditional UPDATE that makes this process the one that fires the run."""
        moved = await conn.execute(schedules.update().where(
            schedules.c.id == row.id, schedules.c.enabled.is_(True),
            schedules.c.next_run_at == row.next_run_at,
        ).values(next_run_at=next_run_at, last_run_at=due_at))
        return bool(moved.rowcount == 1)

    def _log_missed(self, row: Any, expr: Cron, due_at: float, missed: int) -> None:
        if missed:
            log.warning("schedule %s (account %s) missed %d%s run(s) while no hub could "
                        "start them (none running, or its database unreachable); started "
                        "only the one due %s", row.name, row.account_id,
                        missed, "+" if missed >= MISSED_COUNT_CAP else "",
                        _iso(due_at, expr.tz))

    async def _fire_operations(self, row: Any, expr: Cron, due_at: float,
                               next_run_at: float, missed: int) -> bool:
        """Ask the operation of every machine of the target, each at its own offset within
        the spread; a machine the extension is not set for is skipped (and counted), one
        whose agent cannot take it gets an operation that Failed at once with the code
        'extension run' would have answered."""
        if self._ext_ops is None:
            raise RuntimeError("this scheduler was made without extension operations")
        m = machine_rows.c
        spread = float(row.spread_seconds)
        goals = await self._ext_ops.goals(row.account_id)
        async with self._engine.begin() as conn:
            if not await self._move(conn, row, next_run_at, due_at):
                return False
            query = sa.select(machine_rows).where(m.account_id == row.account_id)
            query = query.where(m.name == row.machine_name) if row.machine_name \
                else query.where(m.group_name == row.group_name)
            targets = (await conn.execute(query.order_by(m.name))).all()
            slots = []
            for machine in targets:
                offset = machine_offset(row.id, machine.id, spread)
                starts = due_at + offset
                clock = datetime.fromtimestamp(starts, expr.tz).strftime("%H:%M:%S")
                slots.append((machine, starts, f"{SCHEDULED}starts at {clock} (offset "
                              f"{durations.describe(offset)} of spread "
                              f"{durations.describe(spread)})"))
            ids = await self._ext_ops.ask_scheduled(
                conn, goals, row.account_id, row.extension, row.operation, dict(row.params),
                slots, schedule_id=row.id, due_at=due_at,
                requested_by=f"schedule {row.name}")
            asked = sum(1 for i in ids if i is not None)
            skipped = len(ids) - asked
            error = None
            if not targets:
                error = (f"no machine named {row.machine_name}" if row.machine_name
                         else f"no machine in group {row.group_name}")
            await conn.execute(schedule_runs.insert().values(
                schedule_id=row.id, due_at=due_at, fired_at=time.time(), job_id=None,
                missed=missed, error=error, operations=asked, skipped=skipped))
        self._log_missed(row, expr, due_at, missed)
        log.info("schedule %s asked %s %s of %d machine(s), skipped %d (due %s, spread %g s)",
                 row.name, row.extension, row.operation, asked, skipped,
                 _iso(due_at, expr.tz), spread)
        return True
