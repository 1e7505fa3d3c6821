"""Jobs: a runbook version run on one machine of a group, with its attempts and output.

States and transitions (docs/jobs.md)::

    Queued -> Activating (claimed under a lease) -> Running -> Completed | Failed
    Activating/Running -- failed activation (lease expired, agent lost the job, sandbox
        killed by a signal the agent did not send) --> Queued, or Suspended on the third
    stop:    Queued/Suspended -> Stopped;  on a machine -> Stopping -> Stopped
    suspend: Queued -> Suspended;  on a machine -> Suspending -> Suspended (paused there)
    resume:  paused on a machine -> Resuming -> Running;  not on a machine -> Queued

Output records are kept once per (job, sequence), so an agent that sends a batch again after
a lost answer duplicates nothing. Each attempt numbers its records from
``(attempt - 1) << 32``, so the records of every attempt of a job sort in one sequence.

The code is split by what it does: ``submission`` (start, start_many, prepare, insert),
``claims`` (claim under a lease), ``reports`` (an agent's reports of its attempts),
``leases`` (renewal and the reaper), ``commands`` (operator stop/suspend/resume) and
``views`` (reading); ``states`` holds what they share. Other modules use this package's
names only (``jobs.start``), never a submodule's.
"""

from __future__ import annotations

from .states import (ACTIVATE_FAILED, FINAL, FULL_ID, HELD, LEASE_BEATS, LEASE_MIN,
                     MAX_ACTIVATIONS, MAX_TIMEOUT, SEQ_SHIFT, STATES, STREAMS, VIEW_KEYS,
                     ended_listeners)
from .submission import insert, prepare, start, start_many
from .claims import claim, lease_seconds
from .reports import RECORDS_AT_ONCE, paused, report, report_many
from .leases import NOT_RECEIVED, NOT_RECEIVED_MAX, REAP_GAP, Reaper, renew
from .commands import PREFIX_MIN, control, resolve
from .views import get, listing, records, stream_name

__all__ = [
    "ACTIVATE_FAILED",
    "FINAL",
    "FULL_ID",
    "HELD",
    "LEASE_BEATS",
    "LEASE_MIN",
    "MAX_ACTIVATIONS",
    "MAX_TIMEOUT",
    "NOT_RECEIVED",
    "NOT_RECEIVED_MAX",
    "PREFIX_MIN",
    "REAP_GAP",
    "RECORDS_AT_ONCE",
    "Reaper",
    "SEQ_SHIFT",
    "STATES",
    "STREAMS",
    "VIEW_KEYS",
    "claim",
    "control",
    "ended_listeners",
    "get",
    "insert",
    "lease_seconds",
    "listing",
    "paused",
    "prepare",
    "records",
    "renew",
    "report",
    "report_many",
    "resolve",
    "start",
    "start_many",
    "stream_name",
]
