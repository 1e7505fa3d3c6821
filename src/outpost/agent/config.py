"""The agent's YAML config file, with errors that name the file, line and column (ED-2)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from outpost.protocol.errors import OutpostError

from .logs import parse_duration

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class AgentConfig:
    """The agent's settings. A plain dataclass rather than a pydantic model: the daemon's
    resident memory has a 40 MB budget and pydantic alone costs several MB of it."""

    # Hub URLs in the order to try; empty means the URL given at registration.
    hub_urls: list[str] = field(default_factory=list)
    log_level: str = "info"
    # An explicit proxy; when unset the standard HTTPS_PROXY/NO_PROXY variables apply.
    proxy: str | None = None
    heartbeat_interval: float = 30.0
    poll_timeout: float = 25.0
    max_concurrent_jobs: int = 4
    # ED-8: a smaller agent for constrained devices (fewer jobs, smaller buffers).
    constrained: bool = False
    request_timeout: float = 15.0
    backoff_max: float = 60.0
    # HW-1b: claim no job while CPU or memory stays above these for pressure_seconds.
    max_cpu_percent: float = 95.0
    max_memory_percent: float = 95.0
    pressure_seconds: float = 30.0
    # Claim no job while the state directory's disk has less free than this (MB): a job
    # whose output the spool cannot keep only fails there (0: never).
    min_free_disk_mb: float = 64.0
    # ED-1/EX-9: how long a job's log stays on the machine after it last changed (seconds;
    # the file may say 7d, 12h, 30m).
    job_log_retention: float = 7 * 86400.0
    # The agent log rotates at this size and keeps this many old files; unset: 5 MB and 3
    # (1 MB and 1 when constrained).
    log_max_bytes: int | None = None
    log_backups: int | None = None
    # An agent running as root runs runbooks as one unprivileged user per job slot
    # (outpost-job1..N, made at its first start); false runs them as root (not advised).
    job_users: bool = True
    # A job's limits where its group sets none (0: no limit): memory in MiB, CPUs,
    # processes (sandbox.py).
    job_memory_mb: int = 512
    job_cpus: float = 1.0
    job_processes: int = 256
    # An extension's limits where its manifest sets none (0: no limit): its handlers and
    # what they leave running share one control group (extensions/runtime.py).
    extension_memory_mb: int = 256
    extension_cpus: float = 1.0
    extension_processes: int = 128

    def effective(self) -> AgentConfig:
        """The settings the daemon runs with: constrained mode (ED-8) lowers the limits a
        small device cannot afford, whatever the file says."""
        if not self.constrained:
            return self
        return replace(self, max_concurrent_jobs=min(self.max_concurrent_jobs, 1))

    @property
    def connections(self) -> int:
        """HTTP connections to keep: one for the long-poll, one for everything else."""
        return 2 if self.constrained else 4

    @property
    def log_bytes(self) -> tuple[int, int]:
        """(size at which the log rotates, how many rotated logs to keep)."""
        size, keep = (1 * 2**20, 1) if self.constrained else (5 * 2**20, 3)
        return (self.log_max_bytes or size, keep if self.log_backups is None
                else self.log_backups)


# Range checks: setting -> (lowest, highest).
_RANGES: dict[str, tuple[float, float]] = {
    "heartbeat_interval": (1.0, 3600.0),
    "poll_timeout": (1.0, 300.0),
    "max_concurrent_jobs": (1, 256),
    "request_timeout": (1.0, 300.0),
    "backoff_max": (1.0, 3600.0),
    "max_cpu_percent": (0.0, 100.0),
    "max_memory_percent": (0.0, 100.0),
    "pressure_seconds": (0.0, 3600.0),
    "min_free_disk_mb": (0.0, 1024.0 * 1024.0),
    "job_log_retention": (0.0, 366 * 86400.0),
    "log_max_bytes": (1024, 2**30),
    "log_backups": (1, 100),
    "job_memory_mb": (0, 2**22),
    "job_cpus": (0.0, 1024.0),
    "job_processes": (0, 2**22),
    "extension_memory_mb": (0, 2**22),
    "extension_cpus": (0.0, 1024.0),
    "extension_processes": (0, 2**22),
}
_TYPES = {f.name: f.type for f in fields(AgentConfig)}


def _check(key: str, value: Any) -> Any:
    """The value converted to the setting's type, or ValueError saying what is wrong."""
    kind = _TYPES[key]
    if key == "job_log_retention":
        try:
            value = parse_duration(value)
        except ValueError:
            raise ValueError("must be a duration such as 7d, 12h, 30m or a number of "
                             "seconds") from None
        kind = "float"
    elif kind == "int | None":
        if value is None:
            return None
        kind = "int"
    if kind == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("must be a list of URLs")
        for url in value:
            if not url.startswith("https://"):
                raise ValueError(f"'{url}' is not an https:// URL")
        return value
    if kind == "str | None":
        if value is not None and not isinstance(value, str):
            raise ValueError("must be a URL string")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError("must be true or false")
        return value
    if kind == "str":
        if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return value.lower()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a number")
    if kind == "int" and not float(value).is_integer():
        raise ValueError("must be a whole number")
    low, high = _RANGES[key]
    if not low <= value <= high:
        raise ValueError(f"must be between {low:g} and {high:g}")
    return int(value) if kind == "int" else float(value)


def validate(raw: dict[str, Any]) -> AgentConfig:
    """An AgentConfig from a mapping; raises KeyError for an unknown setting and
    ValueError (with the setting in ``args[1]``) for a bad value."""
    values = {}
    for key, value in raw.items():
        if key not in _TYPES:
            raise KeyError(key)
        try:
            values[key] = _check(key, value)
        except ValueError as exc:
            raise ValueError(str(exc), key) from exc
    return AgentConfig(**values)


def _tab_position(text: str) -> tuple[int, int] | None:
    for number, line in enumerate(text.splitlines(), start=1):
        indent = line[: len(line) - len(line.lstrip(" \t"))]
        if "\t" in indent:
            return number, indent.index("\t") + 1
    return None


def _marks(text: str) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """For each top-level key, the line and column (1-based) of the key and of its value."""
    marks: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}
    node = yaml.compose(text)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            marks[str(key.value)] = ((key.start_mark.line + 1, key.start_mark.column + 1),
                                     (value.start_mark.line + 1, value.start_mark.column + 1))
    return marks


def parse(text: str, path: Path) -> AgentConfig:
    where = str(path)
    tab = _tab_position(text)
    if tab:
        line, col = tab
        raise OutpostError(
            "config_tab",
            f"{where}:{line}:{col}: the configuration contains a tab in its indentation; "
            f"YAML does not allow tabs, use spaces.",
            fix=f"Replace the tab at line {line}, column {col} of {where} with spaces.",
            file=where, line=line, column=col,
        )
    try:
        raw: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        problem = getattr(exc, "problem", None) or str(exc)
        raise OutpostError(
            "config_invalid", f"{where}:{line}:{col}: {problem}",
            fix=f"Correct the YAML at line {line}, column {col} of {where}.",
            file=where, line=line, column=col,
        ) from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise OutpostError("config_invalid", f"{where}:1:1: the file must hold a mapping of "
                           f"settings, not {type(raw).__name__}", file=where, line=1, column=1)
    try:
        return validate(raw)
    except (KeyError, ValueError) as exc:
        key_mark, value_mark = _marks(text).get(str(exc.args[-1]), ((1, 1), (1, 1)))
        if isinstance(exc, KeyError):
            key, problem = str(exc.args[0]), f"unknown setting '{exc.args[0]}'"
            line, col = key_mark
        else:
            key = str(exc.args[1])
            problem = f"{exc.args[0]} (found {raw[key]!r})"
            line, col = value_mark  # point at the value that is wrong
        raise OutpostError(
            "config_invalid", f"{where}:{line}:{col}: {key}: {problem}",
            fix=f"Correct '{key}' at line {line} of {where}.",
            file=where, line=line, column=col, setting=key,
        ) from exc


def load(path: Path | None) -> AgentConfig:
    """The config at ``path``; defaults when no path is given or the default file is absent."""
    if path is None:
        return AgentConfig()
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise OutpostError("config_invalid", f"{path}: the configuration file does not exist.",
                           fix="Create it, or leave out --config to use the defaults.",
                           file=str(path)) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise OutpostError("config_invalid", f"{path}: cannot read the file: {exc}",
                           file=str(path)) from exc
    return parse(text, path)
