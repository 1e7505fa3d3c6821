"""Wire models exchanged by the hub and the agent."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from .base import ErrorBody as ErrorBody
from .base import Wire as Wire
from .params import BATCH_MAX
from .readers import INT32_MAX as INT32_MAX
from .readers import INT64_MAX as INT64_MAX

# Ranges at the edge: a number the database cannot hold (an INTEGER column is 32 bits on
# PostgreSQL, 64 on SQLite) or JSON cannot carry (NaN, Infinity) is refused as bad input
# with the field named, never left to fail in the database or in the answer. INT32_MAX and
# INT64_MAX are defined with the agent's readers (readers.py), which check them too.
LABELS_MAX = 64
LABEL_KEY_MAX = 64
LABEL_VALUE_MAX = 256
# The agent cuts a longer output line into records of 1 MiB (agent/runner.py LINE_MAX).
RECORD_TEXT_MAX = 1024 * 1024


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
    hub_time: float = Field(description="Seconds since the epoch.")
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
    run: str | None = Field(default=None, max_length=32, description=(
        "This run of the agent (an id it makes at start): a heartbeat of the run that told "
        "the hub it was stopping does not end that stop, whenever it arrives."))


class StopNotice(Wire):
    """The body of ``POST /v1/agent/stopping``."""

    run: str | None = Field(default=None, max_length=32, description=(
        "The run of the agent that is stopping (as its heartbeats name it)."))


class HeartbeatAck(Wire):
    """The hub's answer to a heartbeat."""

    hub_time: float | None = None
    min_agent_version: str = ""
    machine_id: str = ""
    abandon: list[str] = Field(default_factory=list, description="Jobs whose attempt on this "
                               "machine the hub gave up (their lease expired): the agent "
                               "ends them.")
    extensions_etag: str = Field(default="", description="The etag of the extensions this "
                                 "machine should have; when it differs from the agent's, "
                                 "the agent fetches GET /v1/agent/extensions.")
    deployment_etag: str = Field(default="", description="The etag of the deployment this "
                                 "machine should run; when it differs from the agent's, the "
                                 "agent fetches GET /v1/agent/deployment.")


class PollRequest(Wire):
    """The body of ``POST /v1/agent/poll`` (optional: an empty body is a poll alone)."""

    heartbeat: Heartbeat | None = Field(default=None, description="A heartbeat carried by the "
                                        "poll: recorded when the poll arrives, as "
                                        "``POST /v1/agent/heartbeat`` would record it, and "
                                        "acknowledged in the poll's answer.")


class OutputRecord(Wire):
    """One output record of a job attempt, as the agent reports it."""

    seq: int = Field(ge=0, le=INT64_MAX)
    stream: str = Field(max_length=16)
    text: str = Field(max_length=RECORD_TEXT_MAX)
    at: float = Field(ge=0, description="When it was written, seconds since the epoch.")
    continues: bool = Field(False, description="True on each piece of an output line longer "
                            "than a record but its last: join the pieces to get the line.")




class JobBatch(Wire):
    """``POST /v1/jobs/batch``: jobs queued all or none.

    Each entry is what ``POST /v1/jobs`` takes; the hub checks it with that route's own
    model, so an error names its entry (``jobs[INDEX]: ...``).
    """

    jobs: list[dict[str, Any]] = Field(
        min_length=1, max_length=BATCH_MAX,
        description=f"1 to {BATCH_MAX} job starts, each as POST /v1/jobs takes it "
                    "(runbook, group, params, version, timeout).")


# --- What the operator API answers ---------------------------------------------------------
# Declared in /openapi.json (each route's ``responses``); the routes return plain dicts, so a
# field added to a view reaches clients at once, and tests/integration/test_openapi.py checks
# real answers against these models (no field missing, none undeclared). Times are seconds
# since the epoch.


class View(BaseModel):
    """An answer of the API: it may gain fields (clients ignore those they do not know)."""

    model_config = ConfigDict(extra="allow")


class Health(View):
    status: str
    version: str
    hub_time: float
    min_agent_version: str
    scheduler: Literal["leader", "standby"] = Field(
        description="Whether this replica runs the scheduler (one replica at a time).")
    notifications: Literal["in-process", "listening", "reconnecting"] = Field(
        description="How this replica hears of other replicas' changes: in-process on "
        "SQLite; PostgreSQL LISTEN, or reconnecting to it.")


class Whoami(View):
    account_id: str
    admin: bool


class AccountView(View):
    id: str
    name: str
    created_at: float


class AccountKeys(View):
    id: str
    name: str
    primary_key: str = Field(description="Base64, 32 bytes: what agents register with.")
    secondary_key: str


class AccountCreated(AccountKeys):
    token: str = Field(description="The account's first API token; shown this once.")


class MachineView(View):
    id: str
    name: str
    group: str
    labels: dict[str, str]
    agent_version: str
    status: str = Field(description="Pending, Healthy, Stopped, Unresponsive, Disconnected, "
                                    "...")
    last_heartbeat_at: float | None
    stopped_at: float | None = Field(None, description="When the agent said it was stopping "
                                     "(a graceful stop); null once it heartbeats again.")
    registered_at: float
    heartbeat_interval: float
    facts: dict[str, Any]
    not_taking_work: str | None
    deployment: dict[str, Any] | None = Field(None, description=(
        "GET /v1/machines/{name} only: the deployment it should run, what its agent fetched "
        "and reported, and when none runs, why (reason: code, reason, message)."))


class MachineHeartbeat(View):
    name: str
    status: str
    last_heartbeat_at: float | None
    stopped_at: float | None = None
    seconds_ago: float | None
    heartbeat: dict[str, Any] | None


class TokenView(View):
    id: str
    name: str
    admin: bool
    created_at: float


class TokenCreated(TokenView):
    token: str = Field(description="The token itself; shown this once (the hub keeps only "
                       "its SHA-256).")


class TokenRevoked(TokenView):
    revoked: bool


class MachineRemoved(View):
    name: str
    removed: bool


class PingResult(View):
    machine: str
    round_trip_ms: float
    agent_received_at: float | None


class RunbookView(View):
    name: str
    version: int
    type: str
    description: str
    params: list[Any] = Field(description="The parameters the runbook declares.")
    sha256: str
    log_verbose: bool
    log_progress: bool
    created_at: float


class RunbookListed(RunbookView):
    versions: int


class RunbookVersion(RunbookView):
    content: str


class RunbookPublished(RunbookVersion):
    unchanged: bool = Field(default=False, description="The same as the latest version: "
                                                       "nothing was stored.")


class RunbookRemoved(View):
    name: str
    removed: bool
    versions: int


class AttemptView(View):
    number: int
    machine_id: str
    machine: str | None = Field(description="The machine's name; null once it is removed.")
    started_at: float
    ended_at: float | None
    exit_code: int | None
    signal: int | None
    reason: str | None
    run_as: str | None


class JobView(View):
    id: str
    runbook_name: str
    runbook_version: int
    group_name: str
    params: dict[str, Any]
    status: str = Field(description="New, Queued, Activating, Running, Completed, Failed, "
                                    "Stopping, Stopped, Suspending, Suspended or Resuming")
    timeout_seconds: float | None
    created_at: float
    started_at: float | None
    ended_at: float | None
    machine_id: str | None
    activations: int
    attempt: int
    exit_code: int | None
    signal: int | None
    reason: str | None
    parent_id: str | None = Field(default=None, description="On a child of a job on every "
                                  "machine of a group: that parent job's id.")


class JobDetail(JobView):
    attempts: list[AttemptView]
    waiting_for: str | None = Field(default=None, description="Why a queued job may wait "
                                                              "long (only when it may).")
    fanout: FanoutView | None = Field(default=None, description="A job on every machine "
                                      "of a group: its rate control and one child job per "
                                      "machine (only on such a parent job).")


class JobStarted(JobDetail):
    warnings: list[str] = Field(default_factory=list, description="Hints such as a group "
                                                                  "no machine has joined.")


class JobBatchResult(View):
    jobs: list[JobDetail]
    warnings: list[str] = Field(default_factory=list)


class FanoutChild(View):
    """One machine's child job of a job on every machine of a group."""

    machine_id: str
    machine: str | None = Field(description="The machine's name; null once it is removed.")
    machine_status: str | None = Field(description="The machine's status now (Healthy, "
                                       "Unresponsive, ...); null once it is removed.")
    job_id: str
    status: str
    exit_code: int | None
    signal: int | None
    started_at: float | None
    ended_at: float | None
    reason: str | None


class FanoutView(View):
    """The rate control and the per-machine breakdown of a job on every machine of a
    group (``job start --all``)."""

    children: int = Field(description="One child job per machine of the group at "
                                      "submission (Stopped machines left out).")
    concurrency_given: str = Field(description="--max-concurrency as given: N, P% or "
                                               "'all'.")
    max_concurrency: int = Field(description="Children on machines at once at most.")
    errors_given: str | None = Field(description="--max-errors as given (N or P%); null: "
                                                 "no limit.")
    max_errors: int | None = Field(description="Failed children that may pass; dispatching "
                                               "stops at the next one. Null: no limit.")
    halted: str | None = Field(description="Why no further child is started (the error "
                                           "threshold passed, the job was stopped).")
    counts: dict[str, int] = Field(description="Children by status.")
    breakdown: list[FanoutChild] = Field(description="One line per machine, in dispatch "
                                                     "order.")


class FanoutStarted(JobDetail):
    warnings: list[str] = Field(default_factory=list, description="Machines left out or "
                                                                  "not started, and why.")


for _model in (JobDetail, JobStarted, JobBatchResult):
    _model.model_rebuild()


class RecordView(View):
    seq: int
    stream: str
    text: str
    at: float
    continues: bool = Field(False, description="This piece of a line longer than a record "
                            "goes on in the next record of its stream (join them).")


class GroupView(View):
    name: str
    run_as: str | None
    memory_mb: int | None
    cpus: float | None
    max_processes: int | None


class GroupListed(GroupView):
    machines: int


class AssetView(View):
    kind: str
    name: str
    secret: bool
    description: str
    thumbprint: str | None
    subject: str | None
    not_after: float | None
    has_private_key: bool
    created_at: float
    updated_at: float


class AssetShown(AssetView):
    value: str | None = Field(default=None, description="A plain variable's value (null for "
                                                        "a secret one).")
    username: str | None = Field(default=None, description="A credential's user name.")


class AssetSaved(AssetShown):
    replaced: bool


class AssetRemoved(View):
    kind: str
    name: str
    removed: bool


class JobIdentityView(View):
    job_id: str
    account_id: str
    runbook: str
    machine_id: str | None
    attempt: int


class AssetValue(View):
    """An asset with its value, for the job: a variable's ``value``, a credential's
    ``username`` and ``secret``, a certificate's ``certificate`` and ``private_key`` PEM."""

    kind: str
    name: str
    value: str | None = None
    username: str | None = None
    secret: str | None = None
    thumbprint: str | None = None
    subject: str | None = None
    not_after: float | None = None
    certificate: str | None = None
    private_key: str | None = None


class ScheduleRun(View):
    due_at: float
    due: str | None
    fired_at: float | None
    job_id: str | None
    job_status: str | None
    missed: bool
    error: str | None
    operations: int | None = Field(description="An extension operation's run: the "
                                   "operations asked, one per machine.")
    skipped: int | None = Field(description="An extension operation's run: the machines "
                                "of the target the extension is not set for.")
    operation_states: dict[str, int] | None = Field(description="An extension operation's "
                                                    "run: its operations by state.")


class ScheduledOperation(View):
    id: str
    machine: str | None
    status: str
    code: str | None
    message: str
    not_before: float | None = Field(description="When it may start: the run's due time "
                                     "plus the machine's offset within the spread.")
    offset_seconds: float | None
    started_at: float | None
    ended_at: float | None


class ScheduleView(View):
    id: str
    name: str
    kind: str = Field(description="runbook (a job on one machine of the group) or extension "
                      "(an operation on every machine of the target).")
    runbook_name: str | None
    extension: str | None
    operation: str | None
    target_kind: str = Field(description="group or machine")
    target: str | None
    group_name: str | None
    machine_name: str | None
    params: dict[str, Any]
    cron: str
    timezone: str
    spread_seconds: float
    offset_seconds: float
    enabled: bool
    next_run_at: float | None
    next_run: str | None
    last_run_at: float | None
    last_run: str | None
    created_at: float


class ScheduleDetail(ScheduleView):
    runs: list[ScheduleRun]
    latest_operations: list[ScheduledOperation] | None = Field(
        default=None, description="An extension operation's schedule: the operations of "
        "its newest run, one per machine, by start time.")


class Removed(View):
    name: str
    removed: bool


class WebhookView(View):
    name: str
    runbook_name: str
    group_name: str
    params: dict[str, Any]
    expires_at: float | None
    expired: bool
    created_at: float
    last_used_at: float | None
    last_job_id: str | None


class WebhookCreated(WebhookView):
    url: str = Field(description="The secret address; shown this once.")


class WebhookCalled(View):
    job_id: str
    status: str


# --- agent -> hub messages
REPORTS_MAX = 256  # attempts' reports in one POST /v1/agent/reports


class JobAttempt(Wire):
    attempt: int = Field(ge=1, le=INT32_MAX)


class JobEnd(Wire):
    exit_code: int | None = Field(default=None, ge=-INT32_MAX - 1, le=INT32_MAX)
    signal: int | None = Field(default=None, ge=0, le=INT32_MAX)
    reason: str = Field(default="", max_length=2000)
    cause: Literal["exit", "timeout", "stopped", "killed", "lost"] = "exit"
    run_as: str | None = Field(default=None, max_length=200, description=(
        "Who the runbook ran as, said by the agent ('outpost-job3', 'root (group web asks "
        "for root)')."))


class JobReport(JobAttempt):
    started: bool = Field(default=False, description="The runbook's process started (or "
                                                      "went on after a pause).")
    records: list[dict[str, Any]] = Field(default_factory=list, max_length=10000)
    end: JobEnd | None = None


class JobReportItem(JobReport):
    job_id: str = Field(min_length=1, max_length=128)


class JobReports(Wire):
    reports: list[JobReportItem] = Field(min_length=1, max_length=REPORTS_MAX)
    claim: int = Field(default=0, ge=0, le=256, description=(
        "How many jobs the agent runs at once (0 while it takes none). When a report ends "
        "an attempt, the answer carries the jobs claimed for the slots that freed up."))


class WorkDone(Wire):
    result: dict[str, Any] = Field(default_factory=dict)
