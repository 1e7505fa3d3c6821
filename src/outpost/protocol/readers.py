"""What the hub sends an agent most often, read without pydantic.

An agent spends its life in a long-poll that carries its heartbeat, answered with a
``PollAnswer`` holding a ``HeartbeatAck``, and now and then a work item: a job to run, a
job to stop, a ping. Building pydantic's validators for the wire models (models.py, work.py)
costs an agent about 10 MB of resident memory, a quarter of its 40 MB budget, so these are
read here with plain checks instead. The models stay the wire's definition (the hub sends
and documents them) and the readers follow them: tests/unit/test_agent_imports.py holds
each reader to its model's fields and defaults, and to the same answer on the same input.

Like the models, a reader ignores fields it does not know and raises ``ReadError`` (a
``ValueError``, as pydantic's ValidationError is) naming every field that does not fit.
Unlike them it converts nothing: a number sent as a string is refused, and a null where the
model has a default reads as that default.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

# Ranges at the edge: a number the database cannot hold (an INTEGER column is 32 bits on
# PostgreSQL, 64 on SQLite) or JSON cannot carry (NaN, Infinity) is refused as bad input
# with the field named, never left to fail in the database or in the answer (models.py).
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

T = TypeVar("T")
Check = Callable[[Any], Any]


class ReadError(ValueError):
    """What did not fit, one ``field: why`` per problem."""

    def __init__(self, what: str, problems: list[str]) -> None:
        super().__init__(f"{what}: " + "; ".join(problems))
        self.problems = problems


class _Bad(Exception):
    pass


def text(max_length: int | None = None) -> Check:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise _Bad(f"a string was expected, not {type(value).__name__}")
        if max_length is not None and len(value) > max_length:
            raise _Bad(f"at most {max_length} characters")
        return value
    return check


def integer(ge: int | None = None, le: int | None = None) -> Check:
    def check(value: Any) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(f"an integer was expected, not {value!r}")
        found = int(value)
        if ge is not None and found < ge:
            raise _Bad(f"{found} is under {ge}")
        if le is not None and found > le:
            raise _Bad(f"{found} is over {le}")
        return found
    return check


def number(ge: float | None = None) -> Check:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
                value):
            raise _Bad(f"a finite number was expected, not {value!r}")
        if ge is not None and value < ge:
            raise _Bad(f"{value} is under {ge}")
        return float(value)
    return check


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"true or false was expected, not {value!r}")
    return value


def obj(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Bad(f"an object was expected, not {type(value).__name__}")
    return value


def one_of(*allowed: str) -> Check:
    def check(value: Any) -> str:
        if value not in allowed:
            raise _Bad(f"one of {', '.join(allowed)} was expected, not {value!r}")
        return str(value)
    return check


def list_of(each: Check) -> Check:
    def check(value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise _Bad(f"a list was expected, not {type(value).__name__}")
        out = []
        for i, item in enumerate(value):
            try:
                out.append(each(item))
            except _Bad as exc:
                raise _Bad(f"item {i}: {exc}") from None
        return out
    return check


def dict_of(each: Check) -> Check:
    """An object whose values each pass ``each`` (a nested reader's problems are named
    ``key.field``)."""
    def check(value: Any) -> dict[str, Any]:
        found = obj(value)
        out: dict[str, Any] = {}
        problems: list[str] = []
        for key, item in found.items():
            try:
                out[str(key)] = each(item)
            except _Bad as exc:
                problems.append(f"{key}: {exc}")
            except ReadError as exc:
                problems += [f"{key}.{problem}" for problem in exc.problems]
        if problems:
            raise ReadError("object", problems)
        return out
    return check


REQUIRED = object()


def read(cls: Callable[..., T], what: str, data: Any,
         fields: dict[str, tuple[Check, Any]]) -> T:
    """``cls(**values)`` from ``data``: each field's check, or its default when absent or
    null (``REQUIRED``: the field must be there)."""
    if not isinstance(data, dict):
        raise ReadError(what, [f"an object was expected, not {type(data).__name__}"])
    values: dict[str, Any] = {}
    problems = []
    for name, (check, default) in fields.items():
        value = data.get(name)
        if value is None:
            if default is REQUIRED:
                problems.append(f"{name}: required")
            else:
                values[name] = default() if callable(default) else default
            continue
        try:
            values[name] = check(value)
        except _Bad as exc:
            problems.append(f"{name}: {exc}")
        except ReadError as exc:  # a nested object
            problems += [f"{name}.{problem}" for problem in exc.problems]
    if problems:
        raise ReadError(what, problems)
    return cls(**values)


# --- the long-poll and the heartbeat ----------------------------------------------------
@dataclass
class HeartbeatAck:
    """``models.HeartbeatAck``: the hub's answer to a heartbeat."""

    hub_time: float | None = None
    min_agent_version: str = ""
    machine_id: str = ""
    abandon: list[str] = field(default_factory=list)
    extensions_etag: str = ""
    deployment_etag: str = ""

    @classmethod
    def read(cls, data: Any) -> HeartbeatAck:
        return read(cls, "heartbeat acknowledgement", data, {
            "hub_time": (number(), None), "min_agent_version": (text(), ""),
            "machine_id": (text(), ""), "abandon": (list_of(text()), list),
            "extensions_etag": (text(), ""), "deployment_etag": (text(), "")})


@dataclass
class PollAnswer:
    """``work.PollAnswer``: the answer to ``POST /v1/agent/poll``; its items stay raw (each
    is read by the handler of its kind)."""

    items: list[dict[str, Any]] = field(default_factory=list)
    heartbeat: dict[str, Any] | None = None
    heartbeat_error: dict[str, Any] | None = None
    extensions_etag: str | None = None
    deployment_etag: str | None = None

    @classmethod
    def read(cls, data: Any) -> PollAnswer:
        return read(cls, "poll answer", data, {
            "items": (list_of(obj), list), "heartbeat": (obj, None),
            "heartbeat_error": (obj, None), "extensions_etag": (text(), None),
            "deployment_etag": (text(), None)})


# --- work items (work.py has the kinds' models and what each means) ---------------------
@dataclass
class RawItem:
    id: str
    kind: str
    payload: dict[str, Any] = field(default_factory=dict)
    created_at: float | None = None

    @classmethod
    def read(cls, data: Any) -> RawItem:
        return read(cls, "item", data, {
            "id": (text(), REQUIRED), "kind": (text(64), REQUIRED), "payload": (obj, dict),
            "created_at": (number(), None)})


@dataclass
class PingPayload:
    sent_at: float

    @classmethod
    def read(cls, data: Any) -> PingPayload:
        return read(cls, "ping", data, {"sent_at": (number(), REQUIRED)})


@dataclass
class JobControlPayload:
    job_id: str
    attempt: int
    action: str

    @classmethod
    def read(cls, data: Any) -> JobControlPayload:
        return read(cls, "job control", data, {
            "job_id": (text(), REQUIRED), "attempt": (integer(1, INT32_MAX), REQUIRED),
            "action": (one_of("stop", "suspend", "resume"), REQUIRED)})


def timeout(value: Any) -> float:
    """A module call's timeout: over 0, at most 300 seconds (``work.ModuleCallPayload``)."""
    found = float(number()(value))
    if not 0 < found <= 300:
        raise _Bad(f"{found} is not within (0, 300] seconds")
    return found


@dataclass
class ModuleCallPayload:
    """``work.ModuleCallPayload``: a module's method called through the long-poll; read
    without pydantic so that an agent running modules stays within its memory budget."""

    module: str
    method: str
    payload: Any = None
    timeout_seconds: float = 30.0

    @classmethod
    def read(cls, data: Any) -> ModuleCallPayload:
        return read(cls, "module call", data, {
            "module": (text(64), REQUIRED), "method": (text(128), REQUIRED),
            "payload": (lambda value: value, None), "timeout_seconds": (timeout, 30.0)})


@dataclass
class JobLimits:
    memory_mb: int | None = None
    cpus: float | None = None
    processes: int | None = None

    @classmethod
    def read(cls, data: Any) -> JobLimits:
        return read(cls, "limits", data, {
            "memory_mb": (integer(0, INT64_MAX), None), "cpus": (number(0), None),
            "processes": (integer(0, INT64_MAX), None)})


def _cpus(value: Any) -> float:
    found = float(number()(value))
    if not 0 < found <= 1024:
        raise _Bad(f"{found:g} is not within (0, 1024]")
    return found


@dataclass
class Limits:
    """``extensions.Limits``: the cgroup an extension's or a module's manifest asks for
    (None: the agent's default)."""

    memory_mb: int | None = None
    cpus: float | None = None
    processes: int | None = None

    @classmethod
    def read(cls, data: Any) -> Limits:
        return read(cls, "limits", data, {
            "memory_mb": (integer(1, INT32_MAX), None), "cpus": (_cpus, None),
            "processes": (integer(1, INT32_MAX), None)})


@dataclass
class JobClaim:
    """``work.JobClaim``: one job attempt claimed for this machine."""

    job_id: str
    runbook: str
    version: int
    type: str
    content: str
    attempt: int = 1
    params: dict[str, Any] = field(default_factory=dict)
    timeout: float | None = None
    log_verbose: bool = False
    log_progress: bool = False
    run_as: str | None = None
    limits: JobLimits | None = None
    seq_base: int = 0
    job_token: str | None = None

    @classmethod
    def read(cls, data: Any) -> JobClaim:
        return read(cls, "job claim", data, {
            "job_id": (text(), REQUIRED), "attempt": (integer(1, INT32_MAX), 1),
            "runbook": (text(), REQUIRED), "version": (integer(), REQUIRED),
            "type": (text(), REQUIRED), "content": (text(), REQUIRED),
            "params": (obj, dict), "timeout": (number(), None),
            "log_verbose": (boolean, False), "log_progress": (boolean, False),
            "run_as": (text(), None), "limits": (JobLimits.read, None),
            "seq_base": (integer(0, INT64_MAX), 0), "job_token": (text(), None)})

    def as_job(self) -> dict[str, Any]:
        """The claim as the runner takes it (a dict, as the sandbox and helper files read
        it)."""
        job = dict(self.__dict__)
        job["limits"] = None if self.limits is None else dict(self.limits.__dict__)
        return job
