"""Signal dispositions: a daemon owns its own, a printing command keeps the defaults.

A printing command (``job list``, ``explain``) keeps SIGPIPE's default action, so
``outpost job list | head -1`` ends quietly when ``head`` stops reading. A daemon (``hub
run``, ``agent run``, ``up``) and a command that runs until stopped (``agent logs -f``)
must not: with SIGPIPE's default action, a TLS client that hangs up before the hub has
written its answer ends the hub (exit 141, nothing in its log). They ignore SIGPIPE, so a
write to a closed connection is an error the server handles, and they set SIGINT and
SIGTERM themselves: started in the background by a script, they inherit SIGINT ignored and
Ctrl-C or ``kill -INT`` would not stop them.

Imports nothing but the standard library: the agent daemon's lean entry point uses it.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

# The exit status of a command whose reader went away, as if SIGPIPE had ended it.
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


class ReaderGone(Exception):
    """Standard output's reader went away (SIGPIPE ignored). Not an OSError: click would
    turn a BrokenPipeError into exit 1, "failed"."""


def printing() -> None:
    """SIGPIPE's default action: a command whose reader went away ends quietly."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def daemon(*, term_interrupts: bool = False) -> None:
    """SIGPIPE ignored, SIGINT raising KeyboardInterrupt, and SIGTERM its default action
    (the server's loop installs its own handlers when it starts) or, with
    ``term_interrupts``, raising KeyboardInterrupt as SIGINT does."""
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt if term_interrupts else signal.SIG_DFL)


def reader_gone() -> int:
    """After a write to a closed pipe (SIGPIPE ignored): point stdout at /dev/null, so the
    interpreter's last flush at exit does not fail again, and return the exit status."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE
