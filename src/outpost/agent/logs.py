"""The agent's own log: JSON lines in the state directory, rotated by size (ED-1, EX-9).

Each line is one record: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message`` and
any fields the record carries, such as ``job`` for a line about one job. A line that names a
job in the agent's usual way (``job ID: ...``) is tagged with it, so ``outpost agent logs
--job ID`` finds the agent's lines about a job without every call site passing the id.

The daemon loads this module, so it needs the standard library only (the agent's memory
budget, see docs/architecture.md).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from outpost.protocol import durations
from outpost.protocol.errors import OutpostError

LEVELS = ("debug", "info", "warning", "error")
LOG_NAME = "agent.log"
# Attributes every LogRecord has; whatever else a record carries is a field of the line.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_JOB_LINE = re.compile(r"job ([A-Za-z0-9][A-Za-z0-9_.-]{0,127})[: ]")


def resolve_level(configured: str, env_value: str | None) -> str:
    """The level to log at: ``OUTPOST_LOG`` when set wins over the config's ``log_level``."""
    level = (env_value if env_value not in (None, "") else configured) or "info"
    level = level.strip().lower()
    if level == "warn":
        level = "warning"
    if level not in LEVELS:
        where = "OUTPOST_LOG" if env_value else "log_level"
        raise OutpostError("log_level_invalid", f"{where}={level} is not a log level.",
                           fix=f"Use one of {', '.join(LEVELS)}, for example OUTPOST_LOG=debug.",
                           value=level[:32], setting=where)
    return level


def parse_duration(text: str | float) -> float:
    """Seconds in ``90``, ``90s``, ``10m``, ``10min``, ``2h``, ``1d``, ``1w`` or ``1h30m``
    (protocol/durations.py); ValueError for anything else or a negative value."""
    seconds = durations.seconds(text)
    if seconds is None:
        raise ValueError(f"'{text}' is not a duration")
    return seconds


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def job_of(record: logging.LogRecord) -> str | None:
    job = getattr(record, "job", None)
    if job:
        return str(job)
    if isinstance(record.msg, str) and record.msg.startswith("job %s") and record.args:
        args = record.args if isinstance(record.args, tuple) else (record.args,)
        return str(args[0])
    match = _JOB_LINE.match(record.getMessage())
    return match.group(1) if match else None


def as_dict(record: logging.LogRecord) -> dict[str, Any]:
    """One log record as the JSON object written to the file."""
    data: dict[str, Any] = {"time": iso(record.created), "level": record.levelname,
                            "logger": record.name, "message": record.getMessage()}
    job = job_of(record)
    if job:
        data["job"] = job
    for key, value in vars(record).items():
        if key not in _STANDARD and key not in data and not key.startswith("_"):
            data[key] = value if isinstance(value, (str, int, float, bool, type(None))) \
                else str(value)
    if record.exc_info:
        data["exception"] = logging.Formatter().formatException(record.exc_info)
    return data


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(as_dict(record), ensure_ascii=False, default=str)


def setup(state_root: Path, level: str, rotate: tuple[int, int],
          job_sink: logging.Handler | None = None, stream: IO[str] | None = None) -> None:
    """Log at ``level`` to ``STATE/agent.log`` (JSON lines, rotated at ``rotate[0]`` bytes,
    ``rotate[1]`` kept) and as readable text to ``stream`` (stderr by default)."""
    root = logging.getLogger("outpost")
    root.setLevel(level.upper())
    text = logging.StreamHandler(stream or sys.stderr)
    text.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    rotating = logging.handlers.RotatingFileHandler(
        state_root / LOG_NAME, maxBytes=rotate[0], backupCount=max(1, rotate[1]),
        encoding="utf-8")
    rotating.setFormatter(JsonFormatter())
    handlers: list[logging.Handler] = [text, rotating]
    if job_sink is not None:
        handlers.append(job_sink)
    root.handlers = handlers
    root.propagate = False


# --- reading ------------------------------------------------------------------------------
def log_files(state_root: Path) -> list[Path]:
    """The agent's log files, oldest first: agent.log.N ... agent.log.1, agent.log."""
    rotated = []
    for path in state_root.glob(LOG_NAME + ".*"):
        suffix = path.name[len(LOG_NAME) + 1:]
        if suffix.isdigit():
            rotated.append((int(suffix), path))
    files = [p for _, p in sorted(rotated, reverse=True)]
    current = state_root / LOG_NAME
    if current.exists():
        files.append(current)
    return files


def parse_line(line: str) -> dict[str, Any] | None:
    """A record from one line of the log; a line that is not JSON (an older agent wrote
    text) becomes a record holding the line as its message."""
    line = line.rstrip("\n")
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        return {"time": None, "ts": None, "level": "", "logger": "", "message": line}
    record["ts"] = _timestamp(record.get("time"))
    return record


def _timestamp(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class Filter:
    """Which records to show: at or above a level, since a moment, about one job."""

    def __init__(self, since: float | None = None, job: str | None = None,
                 level: str | None = None) -> None:
        self.since = since
        self.job = job
        self.rank = LEVELS.index(level) if level else 0

    def __call__(self, record: dict[str, Any]) -> bool:
        if self.job is not None and record.get("job") != self.job:
            return False
        if self.since is not None and (record.get("ts") is None or record["ts"] < self.since):
            return False
        if self.rank:
            name = str(record.get("level", "")).lower()
            if name in LEVELS and LEVELS.index(name) < self.rank:
                return False
        return True


Position = tuple[int, int]  # (inode, byte offset) in agent.log


def _records(data: bytes, keep: Callable[[dict[str, Any]], bool]) -> Iterator[dict[str, Any]]:
    for raw in data.split(b"\n"):
        record = parse_line(raw.decode("utf-8", "replace"))
        if record is not None and keep(record):
            yield record


def read(files: Iterable[Path], keep: Callable[[dict[str, Any]], bool],
         last: int | None = None) -> tuple[list[dict[str, Any]], Position | None]:
    """The records of ``files`` in order that ``keep`` accepts (only the ``last`` N if
    given), and where the last file's whole lines end, to follow it from there."""
    found: deque[dict[str, Any]] = deque(maxlen=last if last else None)
    position: Position | None = None
    for path in files:
        try:
            fh = path.open("rb")
        except FileNotFoundError:  # rotated away while we looked
            continue
        with fh:
            data = fh.read()
            cut = data.rfind(b"\n") + 1
            found.extend(_records(data[:cut], keep))
            position = (os.fstat(fh.fileno()).st_ino, cut)
    return list(found), position


def follow(state_root: Path, keep: Callable[[dict[str, Any]], bool],
           stop: Callable[[], bool], position: Position | None = None,
           interval: float = 0.2) -> Iterator[dict[str, Any]]:
    """Records written to agent.log after ``position`` (from ``read``), across rotations,
    until ``stop()`` is true.

    The open file is read to its end; when agent.log is a new file (the old one was renamed
    to agent.log.1) the old one is finished first, then the new one is read from its start,
    so no line is lost or shown twice.
    """
    path = state_root / LOG_NAME
    fh: IO[bytes] | None = None
    partial = b""
    try:
        if position is not None:
            fh = _open_at(state_root, position)
        while not stop():
            if fh is None:
                try:
                    fh = path.open("rb")
                except FileNotFoundError:
                    time.sleep(interval)
                    continue
            chunk = fh.read()
            if chunk:
                data = partial + chunk
                cut = data.rfind(b"\n") + 1
                partial = data[cut:]
                yield from _records(data[:cut], keep)
                continue
            try:
                now = path.stat()
            except FileNotFoundError:
                time.sleep(interval)
                continue
            if now.st_ino != os.fstat(fh.fileno()).st_ino:
                rest = fh.read()  # written just before the rename
                fh.close()
                fh = None
                yield from _records(partial + rest, keep)
                partial = b""
                continue
            if now.st_size < fh.tell():  # truncated by hand
                fh.seek(0)
                partial = b""
                continue
            time.sleep(interval)
    finally:
        if fh is not None:
            fh.close()


def _open_at(state_root: Path, position: Position) -> IO[bytes] | None:
    """The file with the inode of ``position`` (agent.log, or agent.log.1 if it has been
    rotated since), at its offset; None if it is gone."""
    for path in (state_root / LOG_NAME, state_root / f"{LOG_NAME}.1"):
        try:
            fh = path.open("rb")
        except FileNotFoundError:
            continue
        if os.fstat(fh.fileno()).st_ino == position[0]:
            fh.seek(position[1])
            return fh
        fh.close()
    return None


def text_line(record: dict[str, Any]) -> str:
    """One readable line for a record: time, level, logger, message, fields."""
    if record.get("ts") is None and not record.get("level"):
        return str(record.get("message", ""))
    when = iso(record["ts"]) if record.get("ts") is not None else str(record.get("time"))
    if "stream" in record:  # a job's output, from its kept log
        return (f"{when} {str(record['stream']).upper():<8} "
                f"[attempt {record.get('attempt', '?')}] {record.get('message', '')}")
    extra = {k: v for k, v in record.items()
             if k not in ("time", "ts", "level", "logger", "message", "exception")}
    tail = "".join(f" {k}={v}" for k, v in extra.items())
    line = f"{when} {record.get('level', ''):<8} {record.get('logger', '')}: " \
           f"{record.get('message', '')}{tail}"
    if record.get("exception"):
        line += "\n" + str(record["exception"])
    return line


def json_line(record: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in record.items() if k != "ts"}, ensure_ascii=False,
                      default=str)
