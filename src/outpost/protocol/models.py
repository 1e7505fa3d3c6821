"""Wire models exchanged by the hub and the agent."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

# Ranges at the edge: a number the database cannot hold (an INTEGER column is 32 bits on
# PostgreSQL, 64 on SQLite) or JSON cannot carry (NaN, Infinity) is refused as bad input
# with the field named, never left to fail in the database or in the answer.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
LABELS_MAX = 64
LABEL_KEY_MAX = 64
LABEL_VALUE_MAX = 256
# The agent cuts a longer output line into records of 1 MiB (agent/runner.py LINE_MAX).
RECORD_TEXT_MAX = 1024 * 1024


class Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class MachineFacts(Wire):
    hostname: str = Field(default="", max_length=1024)
    os: str = Field(default="", max_length=256)
    os_release: str = Field(default="", max_length=1024)
    arch: str = Field(default="", max_length=256)
    agent_version: str = Field(default="", max_length=64)
    cpu_count: int = Field(default=0, ge=0, le=INT32_MAX)
    memory_bytes: int = Field(default=0, ge=0, le=INT64_MAX)


LabelKey = Annotated[str, StringConstraints(min_length=1, max_length=LABEL_KEY_MAX)]
LabelValue = Annotated[str, StringConstraints(max_length=LABEL_VALUE_MAX)]


class RegisterRequest(Wire):
    name: str = Field(max_length=4096, description="1 to 64 characters (E1005 otherwise)")
    group: str = Field(min_length=1, max_length=64)
    labels: dict[LabelKey, LabelValue] = Field(
        default_factory=dict, max_length=LABELS_MAX,
        description=f"At most {LABELS_MAX}: names of 1 to {LABEL_KEY_MAX} characters, "
                    f"values of at most {LABEL_VALUE_MAX}.")
    public_key: str = Field(max_length=256, description="Ed25519 public key, raw 32 bytes, "
                                                        "base64")
    facts: MachineFacts = Field(default_factory=MachineFacts)
    force: bool = False


class RegisterResponse(Wire):
    machine_id: str
    account_id: str
    name: str
    group: str
    hub_time: datetime
    heartbeat_interval: float


class HeldJob(Wire):
    id: str = Field(max_length=128)
    attempt: int = Field(ge=1, le=INT32_MAX)


class Heartbeat(Wire):
    agent_version: str = Field(max_length=64)
    uptime_seconds: float = 0
    load1: float = 0
    cpu_percent: float = 0
    memory_percent: float = 0
    memory_used_bytes: int = Field(default=0, ge=-INT64_MAX, le=INT64_MAX)
    disk_free_bytes: int = Field(default=0, ge=-INT64_MAX, le=INT64_MAX)
    disk_percent: float = 0
    heartbeat_interval: float = Field(default=30, gt=0, le=86400,
                                      description="Seconds, more than 0 and at most a day.")
    running_jobs: int = Field(default=0, ge=0, le=INT32_MAX)
    not_taking_work: str | None = Field(default=None, max_length=2000)
    jobs: list[HeldJob] = Field(default_factory=list, max_length=1024,
                                description="The jobs the agent runs; their leases renew.")


class HeartbeatAck(Wire):
    hub_time: datetime
    min_agent_version: str
    machine_id: str


class WorkItem(Wire):
    id: str
    kind: str
    payload: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime


class PollResult(Wire):
    items: list[WorkItem] = Field(default_factory=list)


class OutputRecord(Wire):
    """One output record of a job attempt, as the agent reports it."""

    seq: int = Field(ge=0, le=INT64_MAX)
    stream: str = Field(max_length=16)
    text: str = Field(max_length=RECORD_TEXT_MAX)
    at: float = Field(ge=0, description="When it was written, seconds since the epoch.")
    continues: bool = Field(False, description="True on each piece of an output line longer "
                            "than a record but its last: join the pieces to get the line.")



BATCH_MAX = 1000


class JobBatch(Wire):
    """``POST /v1/jobs/batch``: jobs queued all or none.

    Each entry is what ``POST /v1/jobs`` takes; the hub checks it with that route's own
    model, so an error names its entry (``jobs[INDEX]: ...``).
    """

    jobs: list[dict[str, Any]] = Field(
        min_length=1, max_length=BATCH_MAX,
        description=f"1 to {BATCH_MAX} job starts, each as POST /v1/jobs takes it "
                    "(runbook, group, params, version, timeout).")


class ErrorBody(Wire):
    code: str
    reason: str
    message: str
    fix: str
    details: dict[str, Any] = Field(default_factory=dict)
