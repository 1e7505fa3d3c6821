"""The hub's answers an idle agent reads at every poll, read without pydantic.

An idle agent does one thing: a long-poll that carries its heartbeat, answered with a
``PollAnswer`` holding a ``HeartbeatAck``. Building pydantic's validators for the wire models
(models.py, work.py) costs an agent about 10 MB of resident memory, more than a quarter of
its 40 MB budget, so these two answers are read here with plain type checks instead; the
models stay the wire's definition (the hub answers with them, the API docs show them), and
tests/unit/test_agent_imports.py holds both to the same fields and defaults.

Like the models, a reader ignores fields it does not know and raises ``ValueError`` (which
pydantic's ValidationError also is) naming the first field that does not fit; unlike them,
it reads a null where the model has a default as that default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def _object(data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"{what}: an object was expected, not {type(data).__name__}")
    return data


def _optional(data: dict[str, Any], name: str, kind: type, what: str) -> Any:
    value = data.get(name)
    if value is None:
        return None
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"{what}.{name}: a finite number was expected, not {value!r}")
        return float(value)
    if not isinstance(value, kind):
        raise ValueError(f"{what}.{name}: {kind.__name__} was expected, not "
                         f"{type(value).__name__}")
    return value


def _list_of(data: dict[str, Any], name: str, kind: type, what: str) -> list[Any]:
    value: list[Any] | None = _optional(data, name, list, what)
    if value is None:
        return []
    for i, each in enumerate(value):
        if not isinstance(each, kind):
            raise ValueError(f"{what}.{name}.{i}: {kind.__name__} was expected, not "
                             f"{type(each).__name__}")
    return value


@dataclass
class HeartbeatAck:
    """``models.HeartbeatAck``: the hub's answer to a heartbeat."""

    hub_time: float | None = None
    min_agent_version: str = ""
    machine_id: str = ""
    abandon: list[str] = field(default_factory=list)
    extensions_etag: str = ""

    @classmethod
    def read(cls, data: Any) -> HeartbeatAck:
        what = "heartbeat acknowledgement"
        data = _object(data, what)
        return cls(hub_time=_optional(data, "hub_time", float, what),
                   min_agent_version=_optional(data, "min_agent_version", str, what) or "",
                   machine_id=_optional(data, "machine_id", str, what) or "",
                   abandon=_list_of(data, "abandon", str, what),
                   extensions_etag=_optional(data, "extensions_etag", str, what) or "")


@dataclass
class PollAnswer:
    """``work.PollAnswer``: the answer to ``POST /v1/agent/poll``; its items stay raw (each
    is parsed by the handler of its kind)."""

    items: list[dict[str, Any]] = field(default_factory=list)
    heartbeat: dict[str, Any] | None = None
    heartbeat_error: dict[str, Any] | None = None
    extensions_etag: str | None = None

    @classmethod
    def read(cls, data: Any) -> PollAnswer:
        what = "poll answer"
        data = _object(data, what)
        return cls(items=_list_of(data, "items", dict, what),
                   heartbeat=_optional(data, "heartbeat", dict, what),
                   heartbeat_error=_optional(data, "heartbeat_error", dict, what),
                   extensions_etag=_optional(data, "extensions_etag", str, what))
