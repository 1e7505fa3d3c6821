"""An extension's own log: what its commands print, one file per extension under the
agent's log directory (``<state>/logs/extensions/<name>.log``), bounded in size.

Each line is ``TIME HANDLER: TEXT``. When the file passes its size it is moved to
``<name>.log.1`` (the one before is dropped), so an extension that prints without end holds
at most twice the bound. The literal values of its protected settings are replaced by
``[redacted]`` before a line is written: they reach the command on stdin, and a command
that echoes its input must not put them on disk.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

MAX_BYTES = 1024 * 1024
REDACTED = "[redacted]"
MIN_SECRET = 4  # shorter values would redact ordinary words


def log_dir(state_root: Path) -> Path:
    return state_root / "logs" / "extensions"


def secret_values(value: Any) -> list[str]:
    """Every string (and number) in a protected settings object, longest first."""
    found: list[str] = []
    if isinstance(value, dict):
        for item in value.values():
            found += secret_values(item)
    elif isinstance(value, list):
        for item in value:
            found += secret_values(item)
    elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
        text = str(value)
        if len(text) >= MIN_SECRET:
            found.append(text)
    return sorted(set(found), key=len, reverse=True)


class ExtensionLog:
    def __init__(self, path: Path, max_bytes: int = MAX_BYTES,
                 secrets: list[str] | None = None) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.secrets = secrets or []

    def write(self, handler: str, text: str) -> None:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        line = f"{stamp} {handler}: {text}\n".encode("utf-8", "replace")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                if self.path.stat().st_size + len(line) > self.max_bytes:
                    os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "ab") as fh:
                fh.write(line)
        except OSError:
            pass  # a full disk must not fail the extension's command; the agent logs why

    def tail(self, lines: int = 20) -> list[str]:
        try:
            return self.path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return []
