"""Each job's own log, kept on the machine after the job ends (ED-1, EX-9).

``STATE/joblogs/`` (made once, 0700) holds one file per attempt: ``JOB.N.jsonl`` is attempt
N's spool, moved there (a rename: nothing is copied) once the hub has it all: its meta line
(the agent's, not shown), its output records and its end. No file or directory is made for
a job's log: making an inode costs up to a millisecond of kernel time where ext4's inode
tables near the directory are crowded, which bounded how many jobs a second the agent could
run (docs/architecture.md, "The agent's side").

The agent's own log lines about a job (started, control requests, delivery trouble) are
lines of the job's files too, ``{"agent": {...}}`` holding the record as the agent's log
has it. Each goes to the job's current file: the spool of its running attempt
(``STATE/spool/JOB.N.jsonl``, written through the runner's own file object and only before
the end line, which stays the spool's last line; ``runner.Spool.read`` never uploads them),
else its newest kept file. A line about a job with neither (its attempt ended and is not
delivered yet, or nothing of the job is on this machine) is held in memory, the last
``PENDING_LINES`` of ``PENDING_JOBS`` jobs, and written out when the job's next spool or kept
file appears; a line is never the reason for a new file.

A job's files are removed once none of them has changed for ``job_log_retention`` (7 days by
default); a spool not delivered yet is never removed. ``records`` reads the spools too, so a
running job's log can be followed. An older agent kept a directory per job,
``joblogs/JOB/`` holding ``agent.jsonl`` (its lines about the job) and ``N.jsonl``: those are
still read, listed and pruned.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from . import logs

log = logging.getLogger("outpost.agent.joblogs")

DIR = "joblogs"
SPOOL_DIR = "spool"  # runner.Spool's directory in the state directory
AGENT_FILE = "agent.jsonl"  # an older agent's, in joblogs/JOB/
AGENT_LINE = b'{"agent"'
PENDING_LINES = 50  # held in memory for a job that has no file to take them
PENDING_JOBS = 200
KEPT_JOBS = 200  # the jobs whose kept file is remembered for their later lines
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_LEVEL = {"Error": "ERROR", "Warning": "WARNING", "Debug": "DEBUG"}

Key = tuple[str, str]  # (state directory, job id)


def safe_id(job_id: str) -> bool:
    """A job id that is one harmless file name part: no separator, no leading dot, no '..'."""
    return bool(_SAFE_ID.fullmatch(job_id)) and ".." not in job_id


def parse_name(name: str) -> tuple[str, int] | None:
    """(job, attempt) of a spool or kept file's name ``JOB.N.jsonl``, else None. The attempt
    is what follows the last dot of the stem, as job ids may hold dots."""
    if not name.endswith(".jsonl"):
        return None
    job_id, _, attempt = name[:-len(".jsonl")].rpartition(".")
    if not (attempt.isascii() and attempt.isdigit()) or not safe_id(job_id):
        return None
    return job_id, int(attempt)


def _append(path: Path, lines: Iterable[bytes]) -> bool:
    """Append whole lines in one write; False when the file is not there (never made) or
    the disk refuses them."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        os.write(fd, b"".join(lines))
    except OSError:  # a full disk: held in memory instead, as a line with no file is
        return False
    finally:
        os.close(fd)
    return True


class _Current:
    """Where this process writes the agent's lines about each job (see the module's doc)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.live: dict[Key, tuple[Path, Callable[[bytes], bool]]] = {}
        self.kept: OrderedDict[Key, Path] = OrderedDict()
        self.pending: OrderedDict[Key, deque[bytes]] = OrderedDict()

    def write(self, key: Key, line: bytes) -> None:
        with self.lock:
            live = self.live.get(key)
            if live is not None and live[1](line):
                return
            kept = self.kept.get(key)
            if kept is not None:
                if _append(kept, [line]):
                    return
                del self.kept[key]  # pruned
            held = self.pending.get(key)
            if held is None:
                held = self.pending[key] = deque(maxlen=PENDING_LINES)
                if len(self.pending) > PENDING_JOBS:
                    self.pending.popitem(last=False)
            held.append(line)

    def attach(self, key: Key, path: Path, write: Callable[[bytes], bool]) -> None:
        with self.lock:
            self.live[key] = (path, write)
            held = self.pending.pop(key, None)
            if held:
                write(b"".join(held))

    def detach(self, key: Key, path: Path) -> None:
        with self.lock:
            live = self.live.get(key)
            if live is not None and live[0] == path:
                del self.live[key]

    def kept_at(self, key: Key, path: Path) -> None:
        with self.lock:
            self.kept[key] = path
            self.kept.move_to_end(key)
            if len(self.kept) > KEPT_JOBS:
                self.kept.popitem(last=False)
            held = self.pending.pop(key, None)
            if held:
                _append(path, held)


_current = _Current()


def _key_of(spool_path: Path) -> tuple[Key, str, str]:
    """(key, job id, attempt) of ``STATE/spool/JOB.N.jsonl``."""
    job_id, _, attempt = spool_path.stem.rpartition(".")
    return (str(spool_path.parent.parent), job_id), job_id, attempt


def attach(spool_path: Path, write: Callable[[bytes], bool]) -> None:
    """A running attempt's spool takes the agent's lines about its job, through ``write``
    (which returns False once the spool is closed), until ``detach``."""
    key, _, _ = _key_of(spool_path)
    _current.attach(key, spool_path, write)


def detach(spool_path: Path) -> None:
    """The attempt's end is next in its spool, and must stay its last line: no more agent
    lines go there."""
    key, _, _ = _key_of(spool_path)
    _current.detach(key, spool_path)


def keep(spool_path: Path) -> None:
    """Keep a delivered attempt's spool ``STATE/spool/JOB.N.jsonl`` as the job's log,
    ``STATE/joblogs/JOB.N.jsonl``; the agent's lines about the job held since its end go
    there too."""
    key, job_id, attempt = _key_of(spool_path)
    if not safe_id(job_id) or not (attempt.isascii() and attempt.isdigit()):
        return
    root = spool_path.parent.parent / DIR
    target = root / f"{job_id}.{attempt}.jsonl"
    try:
        try:
            os.replace(spool_path, target)
        except FileNotFoundError:
            if root.is_dir():
                raise  # the spool itself is gone
            root.mkdir(mode=0o700, exist_ok=True)  # once, for every job
            os.replace(spool_path, target)
        _current.kept_at(key, target)
    except OSError as exc:  # the job log is a convenience: never fail a delivery for it
        log.warning("job %s: could not keep the log of attempt %s: %s", job_id, attempt, exc)


class JobLineHandler(logging.Handler):
    """Writes the agent's log lines about a job to that job's current file (module doc)."""

    def __init__(self, state_root: Path) -> None:
        super().__init__()
        self.root = str(state_root)

    def emit(self, record: logging.LogRecord) -> None:
        job_id = logs.job_of(record)
        if not job_id or not safe_id(job_id):
            return
        try:
            line = json.dumps({"agent": logs.as_dict(record)}, ensure_ascii=False,
                              default=str)
            _current.write((self.root, job_id), line.encode() + b"\n")
        except Exception:  # a log handler must never raise into the code that logs
            self.handleError(record)


# --- reading --------------------------------------------------------------------------------
def _read(path: Path, job_id: str, attempt: int
          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the agent's lines, the output records and end) in one attempt's file."""
    agent: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    try:
        with path.open("rb") as fh:
            data = fh.read()
            mtime = os.fstat(fh.fileno()).st_mtime
    except FileNotFoundError:  # moved (delivered) or removed while we looked
        return agent, records
    last_ts: float | None = None
    for raw in data.split(b"\n"):
        try:
            item = json.loads(raw)
        except ValueError:
            continue  # empty, or a line torn by a crash
        if not isinstance(item, dict) or "meta" in item or "raw" in item:
            continue  # the meta and progress lines are the agent's (runner.Spool), not output
        if "agent" in item:
            line = item["agent"]
            if isinstance(line, dict):
                agent.append({**line, "ts": logs._timestamp(line.get("time"))})
            continue
        if "end" in item:
            end = item["end"] or {}
            # The end line's time; an older agent's has none, and nothing followed it.
            ended_at = float(item.get("at") or mtime)
            records.append({"time": logs.iso(ended_at), "ts": ended_at, "job": job_id,
                            "attempt": attempt, "stream": "End", "level": "INFO",
                            "logger": "job", "message": _end_text(end), "end": end})
            continue
        last_ts = float(item.get("at") or last_ts or mtime)
        stream = str(item.get("stream", "Output"))
        record = {"time": logs.iso(last_ts), "ts": last_ts, "job": job_id,
                  "attempt": attempt, "seq": item.get("seq"), "stream": stream,
                  "level": _LEVEL.get(stream, "INFO"), "logger": "job",
                  "message": str(item.get("text", ""))}
        if item.get("continues"):  # a piece of a longer line, not its last (runner.Lines)
            record["continues"] = True
        records.append(record)
    return agent, records


def _end_text(end: dict[str, Any]) -> str:
    cause = end.get("cause") or "exit"
    return f"attempt ended ({cause}): {end.get('reason') or ''}".rstrip(": ")


def _attempt_files(folder: Path, job_id: str) -> list[tuple[int, Path]]:
    """The job's ``JOB.N.jsonl`` files in ``folder``."""
    found = []
    for path in folder.glob(f"{job_id}.*.jsonl"):  # safe ids hold no glob character
        parsed = parse_name(path.name)
        if parsed is not None and parsed[0] == job_id:
            found.append((parsed[1], path))
    return found


def records(state_root: Path, job_id: str) -> list[dict[str, Any]] | None:
    """The job's log: the agent's lines about it and each attempt's output, in time order;
    None when this machine keeps nothing about the job."""
    if not safe_id(job_id):
        return None
    root = state_root / DIR
    folder = root / job_id  # an older agent's directory for the job
    old = folder.is_dir()
    sources: list[tuple[int, Path]] = []
    if old:
        sources += [(int(p.stem), p) for p in folder.glob("*.jsonl")
                    if p.stem.isascii() and p.stem.isdigit()]
    if root.is_dir():
        sources += _attempt_files(root, job_id)
    spool = state_root / SPOOL_DIR
    if spool.is_dir():  # attempts not delivered yet (running, or the hub was away)
        sources += _attempt_files(spool, job_id)
    if not sources and not old:
        return None
    found: list[dict[str, Any]] = []
    if old and (folder / AGENT_FILE).exists():
        found += logs.read([folder / AGENT_FILE], lambda r: True)[0]
    output: list[dict[str, Any]] = []
    for attempt, path in sorted(sources, key=lambda s: s[0]):
        agent, records_ = _read(path, job_id, attempt)
        found += agent
        output += records_
    found += output
    # Stable: records of equal time keep this order (the agent's lines, then output before
    # its end).
    found.sort(key=lambda r: float(r.get("ts") or 0.0))
    return found


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except FileNotFoundError:
        return []


def _size(folder: Path) -> tuple[int, float, list[int]]:
    """An older agent's job directory: bytes, newest change, attempts."""
    size, newest, attempts = 0, 0.0, []
    for entry in _entries(folder):
        with contextlib.suppress(FileNotFoundError):
            st = entry.stat(follow_symlinks=False)
            size += st.st_size
            newest = max(newest, st.st_mtime)
            stem, dot, suffix = entry.name.rpartition(".")
            if dot and suffix == "jsonl" and stem.isascii() and stem.isdigit():
                attempts.append(int(stem))
    return size, newest, attempts


def _scan(state_root: Path) -> dict[str, dict[str, Any]]:
    """Every job with a file here: its kept files (and an older agent's directory), its
    attempts kept, its bytes and newest change, spools included. One scandir a directory."""
    jobs: dict[str, dict[str, Any]] = {}

    def job(job_id: str) -> dict[str, Any]:
        return jobs.setdefault(job_id, {"kept": [], "folder": None, "attempts": [],
                                        "bytes": 0, "newest": 0.0})

    for entry in _entries(state_root / DIR):
        try:
            if entry.is_dir(follow_symlinks=False):
                if safe_id(entry.name):
                    size, newest, attempts = _size(Path(entry.path))
                    row = job(entry.name)
                    row["folder"] = Path(entry.path)
                    row["attempts"] += attempts
                    row["bytes"] += size
                    row["newest"] = max(row["newest"], newest)
                continue
            parsed = parse_name(entry.name)
            if parsed is None:
                continue
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # pruned while we looked
            continue
        row = job(parsed[0])
        row["kept"].append(Path(entry.path))
        row["attempts"].append(parsed[1])
        row["bytes"] += st.st_size
        row["newest"] = max(row["newest"], st.st_mtime)
    for entry in _entries(state_root / SPOOL_DIR):  # a running job's lines are in its spool
        parsed = parse_name(entry.name)
        if parsed is None:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # delivered while we looked
            continue
        row = job(parsed[0])
        row["bytes"] += st.st_size
        row["newest"] = max(row["newest"], st.st_mtime)
    return jobs


def index(state_root: Path, retention: float) -> list[dict[str, Any]]:
    """Every job with a log here: job id, attempts kept, bytes (a spool not yet delivered
    included), last change, and when it is pruned."""
    rows: list[dict[str, Any]] = []
    for job_id, found in _scan(state_root).items():
        newest = found["newest"]
        rows.append({"job": job_id, "attempts": sorted(set(found["attempts"])),
                     "bytes": found["bytes"],
                     "updated_at": logs.iso(newest) if newest else None,
                     "expires_at": logs.iso(newest + retention) if newest else None,
                     "updated_ts": newest})
    rows.sort(key=lambda r: float(r["updated_ts"]), reverse=True)
    return rows


def prune(state_root: Path, retention: float, now: float | None = None) -> list[str]:
    """Remove the job logs unchanged for ``retention`` seconds; returns their job ids. A
    spool is never removed here: it goes once delivered."""
    now = time.time() if now is None else now
    removed = []
    jobs = sorted(_scan(state_root).items(), key=lambda item: item[1]["newest"],
                  reverse=True)
    for job_id, found in jobs:
        if found["newest"] + retention > now or not (found["kept"] or found["folder"]):
            continue
        for path in found["kept"]:
            path.unlink(missing_ok=True)
        if found["folder"] is not None:
            shutil.rmtree(found["folder"], ignore_errors=True)
        removed.append(job_id)
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
