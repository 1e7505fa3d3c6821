"""One module's inbox on disk: what survives a kill -9 or a restart of the agent.

``<state>/messages/inbox/<module>/`` holds segment files (segments.py: ``u32 length, u32
crc32, JSON``), one record per message routed to one of the module's inputs, written with
one ``write`` before the sender's ack: ``seq`` (the inbox's own, increasing), ``input``,
``priority``, ``expires_at``, the ``message`` frame's ``header`` and the ``body`` (base64).
The file ``taken`` logs what left the inbox for good, as runs of seqs (``{"taken": [[a,
b], ...]}``, same record format), one write per ``took`` frame. On start the live records
(neither taken nor expired) are handed back, in seq order, for the agent to queue again by
priority then arrival.

Takes come out of arrival order (priorities, and a module's takes against another input's
backlog), so a segment is deleted only once no record in it is live; until then a few
live records could pin much dead data. A segment other than the one being written whose
live records fall to an eighth of it or less has them copied to the open segment (same
seq, marked ``moved``; a copy cut short by a kill is read twice and counted once) and is
deleted: the files hold at most about eight times the live messages, plus the open
segment. The ``taken`` log is rewritten (a temporary file and a rename) from what the
segments still hold, once it has doubled since it was last written so.

Expired messages are not logged: their ``expires_at`` says so when the inbox is read again.
"""

from __future__ import annotations

import base64
import bisect
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .segments import Segment, Segments, encode, frame, records

log = logging.getLogger("outpost.agent.messages")

TAKEN = "taken"
RELOCATE_AT = 8  # a closed segment with at most 1/8 of its records live is copied on
TAKEN_LOG_MIN = 16 << 10  # the taken log is not rewritten below this size


@dataclass
class Stored:
    """A live message read back from disk."""

    seq: int
    input: str
    priority: int
    expires_at: float
    header: bytes  # the message frame's header, as JSON
    body: bytes


@dataclass
class _Held:
    """What the store knows of one segment: the seqs appended to it in order (a run,
    ``low`` to ``high``), those copied into it (``moved``), and which are live."""

    segment: Segment
    low: int = 0
    high: int = -1
    moved: set[int] = field(default_factory=set)
    live: set[int] = field(default_factory=set)

    @property
    def count(self) -> int:
        return max(0, self.high - self.low + 1) + len(self.moved)

    def seqs(self) -> list[int]:
        return sorted(set(range(self.low, self.high + 1)) | self.moved)


class InboxStore:
    def __init__(self, directory: Path, segment_bytes: int) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.files = Segments(directory)
        self.next_seq = 1
        self._held: dict[int, _Held] = {}  # by segment name
        self._where: dict[int, int] = {}  # live seq -> segment name
        self._taken_fd: int | None = None
        self._taken_size = 0
        self._taken_compacted = 0
        self._taken_dirty = False

    @property
    def live(self) -> int:
        return len(self._where)

    @property
    def size(self) -> int:
        return self.files.size + self._taken_size

    # --- start ------------------------------------------------------------------------------
    def load(self, now: float | None = None) -> tuple[list[Stored], int]:
        """The live messages, in seq order, and how many expired ones were dropped."""
        now = time.time() if now is None else now
        taken = _read_taken(self.directory / TAKEN)
        seen: set[int] = set()
        found: list[Stored] = []
        expired = 0
        for segment, record in self.files.load():
            held = self._held.get(segment.first)
            if held is None:
                held = self._held[segment.first] = _Held(segment)
            seq = int(record["seq"])
            self.next_seq = max(self.next_seq, seq + 1)
            if record.get("moved"):
                held.moved.add(seq)
            elif held.high < held.low:
                held.low = held.high = seq
            else:
                held.high = seq
            if seq in seen:
                continue  # a copy made just before a kill: the first is the one
            seen.add(seq)
            if _within(seq, taken):
                continue
            if record["expires_at"] <= now:
                expired += 1
                continue
            held.live.add(seq)
            self._where[seq] = segment.first
            found.append(Stored(seq, record["input"], int(record["priority"]),
                                float(record["expires_at"]),
                                json.dumps(record["header"], separators=(",", ":")).encode(),
                                base64.b64decode(record["body"])))
        for held in list(self._held.values()):
            if not held.live:
                self._drop(held)
        self._rewrite_taken()
        found.sort(key=lambda s: s.seq)
        return found, expired

    # --- the ack path -----------------------------------------------------------------------
    def append(self, input_name: str, priority: int, expires_at: float,
               header: bytes, body: bytes) -> int:
        """Write one message (one write; ``header`` the frame's, JSON already, put in the
        record as it is rather than encoded again): its seq. OSError when the disk
        refuses it."""
        seq = self.next_seq
        data = frame(b'{"seq":%d,"input":%s,"priority":%d,"expires_at":%s,"header":%s,'
                     b'"body":"%s"}' % (seq, json.dumps(input_name).encode(), priority,
                                        repr(float(expires_at)).encode(), header,
                                        base64.b64encode(body)))
        before = self.files.tail
        segment = self.files.append(data, self.files.next_name(), self.segment_bytes)
        held = self._held.get(segment.first)
        if held is None:
            held = self._held[segment.first] = _Held(segment, seq, seq)
        elif held.high < held.low:
            held.low = held.high = seq
        else:
            held.high = seq
        held.live.add(seq)
        self._where[seq] = segment.first
        self.next_seq = seq + 1
        if before is not None and before is not segment:
            self._settle(before.first)  # closed now: it may go, or be copied on
        return seq

    def take(self, seqs: list[int]) -> None:
        """The module took these (or a refusal undid their append): logged, never again."""
        if not seqs:
            return
        self._open_taken()
        assert self._taken_fd is not None
        data = encode({"taken": _runs(seqs)})
        os.write(self._taken_fd, data)
        self._taken_size += len(data)
        self._taken_dirty = True
        self.forget(seqs)
        if self._taken_size > max(TAKEN_LOG_MIN, 2 * self._taken_compacted):
            self._rewrite_taken()

    def forget(self, seqs: list[int]) -> None:
        """These left the inbox (expired: their record says so when read again)."""
        touched = set()
        for seq in seqs:
            name = self._where.pop(seq, None)
            if name is not None:
                self._held[name].live.discard(seq)
                touched.add(name)
        for name in touched:
            self._settle(name)

    def _settle(self, name: int) -> None:
        held = self._held.get(name)
        if held is None or held.segment is self.files.tail:
            return
        if not held.live:
            self._drop(held)
        elif len(held.live) * RELOCATE_AT <= held.count:
            self._relocate(held)

    def _relocate(self, held: _Held) -> None:
        """Copy a mostly dead segment's live records to the open one; delete it."""
        data = b"".join(encode(dict(record, moved=True))
                        for _, record in records(held.segment.path)
                        if record["seq"] in held.live)
        before = self.files.tail
        target = self.files.append(data, self.files.next_name(), self.segment_bytes)
        moved_into = self._held.get(target.first)
        if moved_into is None:
            moved_into = self._held[target.first] = _Held(target)
        moved_into.moved |= held.live
        moved_into.live |= held.live
        for seq in held.live:
            self._where[seq] = target.first
        held.live = set()
        self._drop(held)
        if before is not None and before is not target:
            self._settle(before.first)

    def _drop(self, held: _Held) -> None:
        self._held.pop(held.segment.first, None)
        if held.segment in self.files.segments:
            self.files.remove(held.segment)

    # --- the taken log ----------------------------------------------------------------------
    def _open_taken(self) -> None:
        if self._taken_fd is None:
            path = self.directory / TAKEN
            self._taken_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._taken_size = os.fstat(self._taken_fd).st_size

    def _rewrite_taken(self) -> None:
        """The log anew: the seqs still on disk that are not live (taken, or expired)."""
        dead = [seq for held in self._held.values() for seq in held.seqs()
                if seq not in self._where]
        data = encode({"taken": _runs(dead)}) if dead else b""
        path, tmp = self.directory / TAKEN, self.directory / f"{TAKEN}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if self._taken_fd is not None:
            os.close(self._taken_fd)
            self._taken_fd = None
        self._taken_size = self._taken_compacted = len(data)
        self._taken_dirty = False

    # --- durability ---------------------------------------------------------------------------
    def sync(self) -> None:
        self.files.sync()
        if self._taken_fd is not None and self._taken_dirty:
            os.fsync(self._taken_fd)
            self._taken_dirty = False

    def to_sync(self) -> list[int]:
        """Duplicates of the descriptors with writes not yet synced, for a thread to fsync
        and close (``sync`` is the same, done here)."""
        fds = [fd for fd in [self.files.to_sync()] if fd is not None]
        if self._taken_fd is not None and self._taken_dirty:
            self._taken_dirty = False
            fds.append(os.dup(self._taken_fd))
        return fds

    def close(self) -> None:
        self.sync()
        self.files.close()
        if self._taken_fd is not None:
            os.close(self._taken_fd)
            self._taken_fd = None


def _runs(seqs: list[int]) -> list[list[int]]:
    """Sorted seqs as runs: [3, 4, 5, 9] -> [[3, 5], [9, 9]]."""
    out: list[list[int]] = []
    for seq in sorted(seqs):
        if out and seq == out[-1][1] + 1:
            out[-1][1] = seq
        elif not out or seq > out[-1][1]:
            out.append([seq, seq])
    return out


def _read_taken(path: Path) -> list[tuple[int, int]]:
    """The taken log's runs, merged and sorted (a torn record at its end ignored)."""
    if not path.exists():
        return []
    runs = sorted((int(a), int(b)) for _, record in records(path)
                  for a, b in record.get("taken", []))
    merged: list[tuple[int, int]] = []
    for a, b in runs:
        if merged and a <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _within(seq: int, runs: list[tuple[int, int]]) -> bool:
    index = bisect.bisect_right(runs, (seq, sys.maxsize)) - 1
    return index >= 0 and runs[index][0] <= seq <= runs[index][1]
