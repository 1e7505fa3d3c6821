"""Runbook parameters: the ``NAME:TYPE[=DEFAULT]`` spec language and value checking.

A parameter without a default is required. Values arrive as strings (``--param k=v``) or as
JSON values, and are converted to the declared type before anything is queued, so a bad or
missing parameter is refused with its name.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .errors import OutpostError

TYPES = ("string", "int", "bool", "json")
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
# Job starts in one batch (POST /v1/jobs/batch, `job start --count`); here rather than in
# models.py, which the CLI does not import (pydantic costs every command its start-up).
BATCH_MAX = 1000


def parse_spec(spec: str) -> dict[str, Any]:
    """``"count:int=3"`` -> ``{"name": "count", "type": "int", "default": 3,
    "required": False}``."""
    head, has_default, default = spec.partition("=")
    name, _, kind = head.partition(":")
    name, kind = name.strip(), (kind.strip() or "string").lower()
    if not NAME_RE.match(name):
        raise OutpostError("param_spec_invalid",
                           f"Parameter spec '{spec}': '{name}' is not a valid name.",
                           fix="Use letters, digits and '_', starting with a letter or '_'.",
                           spec=spec)
    if kind not in TYPES:
        raise OutpostError("param_spec_invalid",
                           f"Parameter spec '{spec}': unknown type '{kind}'.",
                           fix=f"Use one of {', '.join(TYPES)}: NAME:TYPE[=DEFAULT].", spec=spec)
    parsed: dict[str, Any] = {"name": name, "type": kind, "required": not has_default,
                              "default": None}
    if has_default:
        try:
            parsed["default"] = convert(kind, default)
        except ValueError as exc:
            raise OutpostError("param_spec_invalid",
                               f"Parameter spec '{spec}': the default {exc}.",
                               fix=f"Give a default that is a valid {kind}.",
                               spec=spec) from exc
    return parsed


def parse_specs(specs: list[str]) -> list[dict[str, Any]]:
    parsed = [parse_spec(s) for s in specs]
    seen: set[str] = set()
    for p in parsed:
        if p["name"] in seen:
            raise OutpostError("param_spec_invalid", f"Parameter '{p['name']}' is declared twice.",
                               fix="Declare each parameter once.", spec=p["name"])
        seen.add(p["name"])
    return parsed


def convert(kind: str, value: Any) -> Any:
    """The value as ``kind``; raises ValueError saying what is wrong."""
    if kind == "string":
        if isinstance(value, (dict, list)):
            raise ValueError("is not a string")
        return value if isinstance(value, str) else json.dumps(value)
    if kind == "int":
        if isinstance(value, bool):
            raise ValueError(f"'{value}' is not an integer")
        if isinstance(value, int):
            return value
        try:
            return int(str(value).strip(), 10)
        except ValueError:
            raise ValueError(f"'{value}' is not an integer") from None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(f"'{value}' is not true or false")
    if kind == "json":
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except ValueError:
            raise ValueError(f"'{value}' is not valid JSON") from None
    raise ValueError(f"unknown type '{kind}'")


def check(specs: list[dict[str, Any]], given: dict[str, Any]) -> dict[str, Any]:
    """The full, typed parameter set for a job, or the error naming the first bad one."""
    known = {s["name"]: s for s in specs}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise OutpostError("param_invalid", f"Unknown parameter '{unknown[0]}'.",
                           fix=f"This runbook takes: {', '.join(known) or 'no parameters'}.",
                           parameter=unknown[0])
    values: dict[str, Any] = {}
    for name, spec in known.items():
        if name not in given:
            if spec["required"]:
                raise OutpostError("param_missing", f"Parameter '{name}' is required.",
                                   fix=f"Pass --param {name}=VALUE ({spec['type']}).",
                                   parameter=name)
            values[name] = spec["default"]
            continue
        try:
            values[name] = convert(spec["type"], given[name])
        except ValueError as exc:
            raise OutpostError("param_invalid", f"Parameter '{name}': {exc}.",
                               fix=f"Pass a valid {spec['type']} for '{name}'.",
                               parameter=name, expected=spec["type"]) from exc
    return values


def split_assignments(items: list[str]) -> dict[str, str]:
    """``["a=1", "b=x=y"]`` -> ``{"a": "1", "b": "x=y"}`` (for ``--param k=v``); a name
    given twice is refused (E8042) rather than the last value silently winning."""
    values: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise OutpostError("param_invalid", f"'{item}' is not NAME=VALUE.",
                               fix="Write parameters as --param NAME=VALUE.", parameter=item)
        if key in values:
            raise OutpostError("param_duplicate",
                               f"Parameter '{key}' is given twice (--param {key}="
                               f"{values[key]} and --param {item}).",
                               fix=f"Give --param {key}=VALUE once.", parameter=key)
        values[key] = value
    return values
