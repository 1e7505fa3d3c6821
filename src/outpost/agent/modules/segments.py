"""Append-only segment files of records: the upstream store's and the inboxes' on disk.

A directory holds numbered segment files (``NNNNNNNNNNNNNNNNNNNN.seg``, read in name
order); a record is ``u32 length, u32 crc32, JSON`` (big-endian). Each append is one
``write`` to the open (last) segment, so a record is in the kernel when ``append`` returns
and a kill -9 of the agent loses nothing appended. A kill in the middle of a write leaves a
torn record at the end of the last segment: reading stops at the first record whose length
or checksum does not hold, and ``load`` cuts it off. ``fsync`` is the owner's to call
(``sync``, at most once a second) and is done when a segment is closed.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("outpost.agent.messages")

RECORD = struct.Struct(">II")


def encode(record: dict[str, Any]) -> bytes:
    """One record as it is written: the prefix and the JSON."""
    return frame(json.dumps(record, separators=(",", ":")).encode())


def frame(data: bytes) -> bytes:
    """A record of JSON already encoded: the prefix and ``data``."""
    return RECORD.pack(len(data), zlib.crc32(data)) + data


def records(path: Path, start: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
    """(end offset, record) for each whole record from ``start``; stops at a torn one."""
    with open(path, "rb") as handle:
        handle.seek(start)
        offset = start
        while True:
            prefix = handle.read(RECORD.size)
            if len(prefix) < RECORD.size:
                return
            length, crc = RECORD.unpack(prefix)
            data = handle.read(length)
            if len(data) < length or zlib.crc32(data) != crc:
                return
            offset += RECORD.size + length
            try:
                yield offset, json.loads(data)
            except ValueError:
                return


@dataclass
class Segment:
    path: Path
    first: int  # the number in its name
    last: int  # the owner's: the upstream store's highest seq in it
    size: int


class Segments:
    """The segment files of one directory; appends go to the last one."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.segments: list[Segment] = []
        self._fd: int | None = None
        self._dirty = False

    def load(self) -> Iterator[tuple[Segment, dict[str, Any]]]:
        """(segment, record) for every whole record on disk, in order; a torn record at a
        segment's end is cut off. Every segment read is in ``segments``, even one with no
        whole record: the owner removes what it no longer needs."""
        for path in sorted(self.directory.glob("*.seg")):
            try:
                number = int(path.stem)
            except ValueError:
                continue
            segment = Segment(path, number, number - 1, 0)
            self.segments.append(segment)
            end = 0
            for offset, record in records(path):
                end = offset
                yield segment, record
            if end < path.stat().st_size:
                log.warning("cut a torn record off the end of %s (at byte %d)", path, end)
                os.truncate(path, end)
            segment.size = end

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segments)

    @property
    def tail(self) -> Segment | None:
        """The segment appends go to (None until one is opened after a load)."""
        return self.segments[-1] if self.segments and self._fd is not None else None

    def next_name(self) -> int:
        return self.segments[-1].first + 1 if self.segments else 1

    def append(self, data: bytes, name: int, segment_bytes: int) -> Segment:
        """Write ``data`` (whole records) with one write to the open segment, or to a new
        one named ``name`` when it would grow past ``segment_bytes``; the segment written.
        OSError when it could not be written whole (what was written is cut off again)."""
        tail = self.tail
        if tail is None or (tail.size and tail.size + len(data) > segment_bytes):
            tail = self._open(name)
        assert self._fd is not None
        try:
            written = os.write(self._fd, data)
        except OSError:
            os.ftruncate(self._fd, tail.size)
            raise
        if written < len(data):  # a full disk: the record must not stay torn mid-file
            os.ftruncate(self._fd, tail.size)
            raise OSError(28, os.strerror(28))
        tail.size += len(data)
        self._dirty = True
        return tail

    def _open(self, name: int) -> Segment:
        self._close_fd()
        path = self.directory / f"{name:020d}.seg"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        segment = Segment(path, name, name - 1, os.fstat(self._fd).st_size)
        self.segments.append(segment)
        return segment

    def remove(self, segment: Segment) -> None:
        """Delete a segment (closing it first when it is the open one)."""
        if self.tail is segment:
            assert self._fd is not None
            os.close(self._fd)
            self._fd, self._dirty = None, False
        self.segments.remove(segment)
        segment.path.unlink(missing_ok=True)

    def _close_fd(self) -> None:
        if self._fd is not None:
            if self._dirty:
                os.fsync(self._fd)
                self._dirty = False
            os.close(self._fd)
            self._fd = None

    def sync(self) -> None:
        if self._fd is not None and self._dirty:
            os.fsync(self._fd)
            self._dirty = False

    def to_sync(self) -> int | None:
        """A duplicate of the open segment's descriptor when it has writes not yet synced
        (the caller fsyncs and closes it, in another thread: the segment may be closed
        meanwhile), else None."""
        if self._fd is None or not self._dirty:
            return None
        self._dirty = False
        return os.dup(self._fd)

    def close(self) -> None:
        self._close_fd()
