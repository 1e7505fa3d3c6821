"""Each job's own log, kept on the machine after the job ends (ED-1, EX-9).

``STATE/joblogs/JOB/`` holds, for one job:

- ``agent.jsonl``: the agent's log lines about the job (started, control requests, delivery
  trouble), in the agent log's JSON format;
- ``ATTEMPT.jsonl``: each attempt's output records and its end, exactly as spooled (after
  the spool's meta line, which is not shown). When the hub has an attempt's spool, the
  file is moved here (a rename: nothing is copied) instead of being deleted.

A job's directory is removed by the agent once it has not changed for
``job_log_retention`` (7 days by default). Until an attempt is delivered its records are in
``STATE/spool/JOB.ATTEMPT.jsonl``, which ``records`` reads too, so a running job's log can
be followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from . import logs

log = logging.getLogger("outpost.agent.joblogs")

DIR = "joblogs"
AGENT_FILE = "agent.jsonl"
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_LEVEL = {"Error": "ERROR", "Warning": "WARNING", "Debug": "DEBUG"}


def safe_id(job_id: str) -> bool:
    return bool(_SAFE_ID.fullmatch(job_id)) and ".." not in job_id


def job_dir(state_root: Path, job_id: str) -> Path:
    return state_root / DIR / job_id


def keep(spool_path: Path) -> None:
    """Keep a delivered attempt's spool ``STATE/spool/JOB.N.jsonl`` as the job's log."""
    job_id, _, attempt = spool_path.stem.rpartition(".")
    if not safe_id(job_id) or not attempt.isdigit():
        return
    target = job_dir(spool_path.parent.parent, job_id)
    try:
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.replace(spool_path, target / f"{attempt}.jsonl")
    except OSError as exc:  # the job log is a convenience: never fail a delivery for it
        log.warning("job %s: could not keep the log of attempt %s: %s", job_id, attempt, exc)


class JobLineHandler(logging.Handler):
    """Appends the agent's log lines about a job to that job's ``agent.jsonl``."""

    def __init__(self, state_root: Path) -> None:
        super().__init__()
        self.root = state_root / DIR

    def emit(self, record: logging.LogRecord) -> None:
        job_id = logs.job_of(record)
        if not job_id or not safe_id(job_id):
            return
        try:
            line = json.dumps(logs.as_dict(record), ensure_ascii=False, default=str)
            folder = self.root / job_id
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            with (folder / AGENT_FILE).open("a", encoding="utf-8") as fh:
                fh.write(line + "\n")
        except Exception:  # a log handler must never raise into the code that logs
            self.handleError(record)


# --- reading --------------------------------------------------------------------------------
def _output(path: Path, job_id: str, attempt: int) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    try:
        data = path.read_bytes()
        ended_at = path.stat().st_mtime
    except FileNotFoundError:
        return records
    last_ts: float | None = None
    for raw in data.split(b"\n"):
        try:
            item = json.loads(raw)
        except ValueError:
            continue  # empty, or a line torn by a crash
        if not isinstance(item, dict) or "meta" in item:
            continue  # the meta line is the agent's (runner.Spool), not output
        if "end" in item:
            end = item["end"] or {}
            records.append({"time": logs.iso(ended_at), "ts": ended_at, "job": job_id,
                            "attempt": attempt, "stream": "End", "level": "INFO",
                            "logger": "job", "message": _end_text(end), "end": end})
            continue
        last_ts = float(item.get("at") or last_ts or ended_at)
        stream = str(item.get("stream", "Output"))
        records.append({"time": logs.iso(last_ts), "ts": last_ts, "job": job_id,
                        "attempt": attempt, "seq": item.get("seq"), "stream": stream,
                        "level": _LEVEL.get(stream, "INFO"), "logger": "job",
                        "message": str(item.get("text", ""))})
    return records


def _end_text(end: dict[str, Any]) -> str:
    cause = end.get("cause") or "exit"
    return f"attempt ended ({cause}): {end.get('reason') or ''}".rstrip(": ")


def records(state_root: Path, job_id: str) -> list[dict[str, Any]] | None:
    """The job's log: the agent's lines about it and each attempt's output, in time order;
    None when this machine keeps nothing about the job."""
    if not safe_id(job_id):
        return None
    folder = job_dir(state_root, job_id)
    sources: list[tuple[int, Path]] = []
    if folder.is_dir():
        sources += [(int(p.stem), p) for p in folder.glob("*.jsonl") if p.stem.isdigit()]
    spool = state_root / "spool"
    if spool.is_dir():  # attempts not delivered yet (running, or the hub was away)
        for path in spool.glob(f"{job_id}.*.jsonl"):
            owner, _, number = path.stem.rpartition(".")
            if owner == job_id and number.isdigit():
                sources.append((int(number), path))
    found: list[dict[str, Any]] = []
    agent_lines = folder / AGENT_FILE
    if agent_lines.exists():
        found += logs.read([agent_lines], lambda r: True)[0]
    for attempt, path in sorted(sources):
        found += _output(path, job_id, attempt)
    if not found and not folder.is_dir():
        return None
    # Stable: records of equal time keep their file order (output before its end).
    found.sort(key=lambda r: float(r.get("ts") or 0.0))
    return found


def _size(folder: Path) -> tuple[int, float, list[int]]:
    size, newest, attempts = 0, 0.0, []
    for path in folder.iterdir():
        with contextlib.suppress(FileNotFoundError):
            st = path.stat()
            size += st.st_size
            newest = max(newest, st.st_mtime)
            if path.suffix == ".jsonl" and path.stem.isdigit():
                attempts.append(int(path.stem))
    return size, newest, sorted(attempts)


def index(state_root: Path, retention: float) -> list[dict[str, Any]]:
    """Every kept job log: job id, attempts, bytes, last change, and when it is pruned."""
    root = state_root / DIR
    rows: list[dict[str, Any]] = []
    if root.is_dir():
        for folder in root.iterdir():
            if not folder.is_dir():
                continue
            try:
                size, newest, attempts = _size(folder)
            except FileNotFoundError:  # pruned while we looked
                continue
            rows.append({"job": folder.name, "attempts": attempts, "bytes": size,
                         "updated_at": logs.iso(newest) if newest else None,
                         "expires_at": logs.iso(newest + retention) if newest else None,
                         "updated_ts": newest})
    rows.sort(key=lambda r: float(r["updated_ts"]), reverse=True)
    return rows


def prune(state_root: Path, retention: float, now: float | None = None) -> list[str]:
    """Remove the job logs unchanged for ``retention`` seconds; returns their job ids."""
    now = time.time() if now is None else now
    removed = []
    for row in index(state_root, retention):
        if row["updated_ts"] + retention <= now:
            shutil.rmtree(job_dir(state_root, row["job"]), ignore_errors=True)
            removed.append(row["job"])
    return removed


async def prune_forever(state_root: Path, retention: float, stop: asyncio.Event) -> None:
    """The daemon's task: prune at start, then every so often (never more than hourly)."""
    every = min(max(retention / 4, 1.0), 3600.0)
    while not stop.is_set():
        removed = await asyncio.to_thread(prune, state_root, retention)
        if removed:
            log.info("removed the logs of %d job(s) older than %s: %s", len(removed),
                     _span(retention), ", ".join(removed[:10]))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"
