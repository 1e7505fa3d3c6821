"""Reading a module's log for ``outpost agent logs MODULE``: no daemon needed, nothing of the
supervisor imported (the CLI reads the files the module writes).

The module writes ``<state>/logs/modules/NAME.log`` itself; the supervisor copies it to
``NAME.log.1`` and empties it past its bound, and writes a line
``--- TIME outpost: starting ...`` before each start, which ``--since`` counts from.
"""

from __future__ import annotations

import calendar
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

MARK = "--- "


NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def path(state_root: Path, module: str) -> Path | None:
    """The module's log file; None for a name no module can have."""
    if not NAME.fullmatch(module) or ".." in module:
        return None
    return state_root / "logs" / "modules" / f"{module}.log"


def _marked(line: str) -> float | None:
    if not line.startswith(MARK) or " outpost: " not in line:
        return None
    stamp = line[len(MARK):].split(" ", 1)[0]
    try:
        return float(calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


def read(file: Path, since: float | None = None) -> list[str] | None:
    """The lines of the rotated file and the current one, oldest first; with ``since``,
    from the last start at or before it (None: no such module log)."""
    found: list[str] = []
    exists = False
    for part in (file.with_name(file.name + ".1"), file):
        try:
            found += part.read_text(errors="replace").splitlines()
            exists = True
        except FileNotFoundError:
            continue
    if not exists:
        return None
    if since is None:
        return found
    start = 0
    for index, line in enumerate(found):
        at = _marked(line)
        if at is not None and at <= since:
            start = index
    return found[start:]


def follow(file: Path, interval: float) -> Iterator[str]:
    """New lines as they are written; from the start again when the file was emptied
    (rotated). Counts from the file's end now, not at the first ``next``."""
    return _follow(file, interval, file.stat().st_size if file.exists() else 0)


def _follow(file: Path, interval: float, position: int) -> Iterator[str]:
    pending = b""
    while True:
        time.sleep(interval)
        try:
            size = os.stat(file).st_size
        except FileNotFoundError:
            continue
        if size < position:
            position, pending = 0, b""
        if size == position:
            continue
        with open(file, "rb") as fh:
            fh.seek(position)
            data = fh.read(size - position)
        position += len(data)
        pending += data
        *complete, pending = pending.split(b"\n")
        for raw in complete:
            yield raw.decode("utf-8", "replace")
