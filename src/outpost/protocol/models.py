"""Wire models exchanged by the hub and the agent."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class MachineFacts(Wire):
    hostname: str = ""
    os: str = ""
    os_release: str = ""
    arch: str = ""
    agent_version: str = ""
    cpu_count: int = 0
    memory_bytes: int = 0


class RegisterRequest(Wire):
    name: str
    group: str = Field(min_length=1, max_length=64)
    labels: dict[str, str] = Field(default_factory=dict)
    public_key: str = Field(description="Ed25519 public key, raw 32 bytes, base64")
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
    id: str
    attempt: int


class Heartbeat(Wire):
    agent_version: str
    uptime_seconds: float = 0
    load1: float = 0
    cpu_percent: float = 0
    memory_percent: float = 0
    memory_used_bytes: int = 0
    disk_free_bytes: int = 0
    disk_percent: float = 0
    heartbeat_interval: float = 30
    running_jobs: int = 0
    not_taking_work: str | None = None
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


BATCH_MAX = 1000


class JobBatch(BaseModel):
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
