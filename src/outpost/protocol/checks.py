"""The diagnosis engine behind ``outpost check`` and ``outpost hub check``.

A check is a small function with an id, a title, the ids of the checks it needs, and a line
saying what it looks at. ``run_checks`` runs them in order; a check whose prerequisite ended
in an error (or was itself skipped) is skipped and says which. A check returns an
``Outcome``; raising ``OutpostError`` counts as an error with that error's code, message and
fix. The agent's checks live in ``outpost.agent.checks`` and the hub's in
``outpost.hub.checks``; this module is shared so neither imports the other.
"""

from __future__ import annotations

import inspect
import shutil
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from .errors import OutpostError, entry

OK, WARNING, ERROR, SKIPPED = "ok", "warning", "error", "skipped"
RESULTS = (OK, WARNING, ERROR, SKIPPED)

Ctx = TypeVar("Ctx")


@dataclass
class Outcome:
    """What one check found: its result, a line of details, and for a problem the fix and
    the catalog code (``E2004``)."""

    result: str
    details: str
    fix: str | None = None
    code: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


def ok(details: str, **data: Any) -> Outcome:
    return Outcome(OK, details, data=data)


def problem(result: str, key: str, details: str, fix: str | None = None,
            **data: Any) -> Outcome:
    """A warning or an error with the catalog entry ``key`` (a name or a code); the fix
    defaults to the catalog's first fix."""
    item = entry(key)
    return Outcome(result, details, fix or item.fixes[0], item.code, data)


def warning(key: str, details: str, fix: str | None = None, **data: Any) -> Outcome:
    return problem(WARNING, key, details, fix, **data)


def error(key: str, details: str, fix: str | None = None, **data: Any) -> Outcome:
    return problem(ERROR, key, details, fix, **data)


def from_error(exc: OutpostError, result: str = ERROR) -> Outcome:
    data = {k: v for k, v in exc.details.items() if v not in (None, "", [], {})}
    return Outcome(result, exc.message, exc.fix, exc.code, data)


CheckFn = Callable[[Ctx], "Outcome | Awaitable[Outcome]"]


@dataclass(frozen=True)
class Check(Generic[Ctx]):
    id: str
    title: str
    looks_at: str
    fn: CheckFn[Ctx]
    needs: tuple[str, ...] = ()
    scenarios: tuple[str, ...] = ()


@dataclass
class Result:
    id: str
    title: str
    result: str
    details: str
    fix: str | None = None
    code: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    skipped_because: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "result": self.result,
                "details": self.details, "fix": self.fix, "code": self.code,
                "skipped_because": self.skipped_because, "data": self.data}


class Registry(Generic[Ctx]):
    """An ordered set of checks; ``add`` is a decorator."""

    def __init__(self) -> None:
        self.checks: list[Check[Ctx]] = []

    def add(self, id: str, title: str, looks_at: str, needs: Sequence[str] = (),
            scenarios: Sequence[str] = ()) -> Callable[[CheckFn[Ctx]], CheckFn[Ctx]]:
        known = {c.id for c in self.checks}
        missing = [n for n in needs if n not in known]
        if missing:  # a prerequisite must come earlier in the order
            raise ValueError(f"check {id} needs {missing}, which are not registered before it")

        def register(fn: CheckFn[Ctx]) -> CheckFn[Ctx]:
            self.checks.append(Check(id, title, looks_at, fn, tuple(needs), tuple(scenarios)))
            return fn

        return register

    def listing(self) -> list[dict[str, Any]]:
        return [{"id": c.id, "title": c.title, "looks_at": c.looks_at, "needs": list(c.needs),
                 "scenarios": list(c.scenarios)} for c in self.checks]


async def run_checks(checks: Sequence[Check[Ctx]], ctx: Ctx,
                     on_result: Callable[[Result], None] | None = None) -> list[Result]:
    """Every check in order; ``on_result`` sees each result as soon as it is known."""
    done: dict[str, Result] = {}
    for check in checks:
        failed = [n for n in check.needs if done[n].result in (ERROR, SKIPPED)]
        if failed:
            first = done[failed[0]]
            why = "failed" if first.result == ERROR else "was skipped"
            res = Result(check.id, check.title, SKIPPED,
                         f"skipped: needs '{first.id}' ({first.title}), which {why}",
                         skipped_because=first.id)
        else:
            outcome = await _outcome(check, ctx)
            res = Result(check.id, check.title, outcome.result, outcome.details, outcome.fix,
                         outcome.code, outcome.data)
        done[check.id] = res
        if on_result is not None:
            on_result(res)
    return list(done.values())


async def _outcome(check: Check[Ctx], ctx: Ctx) -> Outcome:
    try:
        value = check.fn(ctx)
        if inspect.isawaitable(value):
            value = await value
        assert isinstance(value, Outcome)
        return value
    except OutpostError as exc:
        return from_error(exc)
    except Exception as exc:  # a check that breaks must not hide the others' results
        return Outcome(ERROR, f"the check itself failed: {type(exc).__name__}: {exc}",
                       "Run the command again with --verbose and report it.",
                       entry("internal_error").code)


def counts(results: Sequence[Result]) -> dict[str, int]:
    return {name: sum(1 for r in results if r.result == name) for name in RESULTS}


def exit_status(results: Sequence[Result], warnings_as_errors: bool = False) -> int:
    """0 with only oks, warnings and skips; 1 on an error (or a warning, if asked)."""
    bad = {ERROR, WARNING} if warnings_as_errors else {ERROR}
    return 1 if any(r.result in bad for r in results) else 0


# Free disk below these is a warning, then an error: the agent's spool and the hub's
# SQLite database both stop accepting writes when the disk fills.
DISK_WARNING_BYTES = 500 * 2**20
DISK_ERROR_BYTES = 50 * 2**20


def disk_outcome(path: Path, what: str) -> Outcome:
    """Free space where ``path`` lives (its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    free_mb = usage.free / 2**20
    data = {"path": str(path), "free_bytes": usage.free, "total_bytes": usage.total}
    text = f"{free_mb:,.0f} MB free of {usage.total / 2**20:,.0f} MB at {path}"
    fix = (f"Free space on the file system that holds {path}, or move the {what} to a "
           f"larger one.")
    if usage.free < DISK_ERROR_BYTES:
        return error("disk_low", f"{text}; at least {DISK_ERROR_BYTES // 2**20} MB is needed",
                     fix, **data)
    if usage.free < DISK_WARNING_BYTES:
        return warning("disk_low", f"{text}; below {DISK_WARNING_BYTES // 2**20} MB", fix,
                       **data)
    return ok(text, **data)
