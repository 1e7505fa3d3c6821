"""The states of a job and the numbers that govern them, shared by the other job modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from outpost.protocol.errors import ACTIVATE_FAILED_TEXT

STATES = ("New", "Queued", "Activating", "Running", "Completed", "Failed", "Stopping",
          "Stopped", "Suspending", "Suspended", "Resuming")
FINAL = ("Completed", "Failed", "Stopped")
STREAMS = ("Output", "Error", "Warning", "Verbose", "Progress", "Debug")
# A job is held by a machine in these states; its lease is renewed by the machine's heartbeat.
HELD = ("Activating", "Running", "Stopping", "Suspending", "Suspended", "Resuming")
# A lease lasts this many heartbeat intervals (the machine turns Unresponsive at the same
# point), and never less than LEASE_MIN seconds.
LEASE_BEATS = 3
LEASE_MIN = 5.0
MAX_ACTIVATIONS = 3
ACTIVATE_FAILED = ACTIVATE_FAILED_TEXT  # HW-1, exactly as the seed shows it
SEQ_SHIFT = 32
MAX_TIMEOUT = 7 * 86400.0
FULL_ID = 36  # random_id(): a UUID

# Told of every job that reaches a final state: (status, started_at or None, ended_at). The
# hub's metrics listen (metrics.py); a listener must be quick and must not raise.
ended_listeners: list[Callable[[str, float | None, float], None]] = []


def _tell_ended(status: str, started_at: float | None, ended_at: float) -> None:
    for listener in ended_listeners:
        listener(status, started_at, ended_at)


VIEW_KEYS = ("id", "runbook_name", "runbook_version", "group_name", "params", "status",
             "timeout_seconds", "created_at", "started_at", "ended_at", "machine_id",
             "activations", "attempt", "exit_code", "signal", "reason", "parent_id")


def _view(row: Any) -> dict[str, Any]:
    return {k: row._mapping[k] for k in VIEW_KEYS}
