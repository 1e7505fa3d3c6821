"""The agent's side of the edge modules' wire, without pydantic (modules.py has the models).

An agent that runs modules reads a ``DeploymentDoc`` now and then, writes a
``ModulesReport`` every few seconds and sends ``UpstreamBatch``es. Building pydantic's
validators for those models cost an agent running ten modules about 13 MB of resident
memory, a third of its 40 MB budget, so the agent reads and writes them here as plain
dataclasses, in the style of readers.py. The models stay the wire's definition (the hub
validates a manifest with them, serves them and documents them); the agent trusts that the
hub checked the manifest, so a reader checks only the types it relies on. A field it cannot
read still gives ``ReadError`` naming the field (``manifest.modules.m.backoff.base_seconds:
a finite number was expected``), which the agent reports as ``deployment_fetch_failed``: a
hub of another version, never a traceback.

tests/unit/test_modreaders.py holds each dataclass to its model: the same fields with the
same defaults, a document the model dumps reads back equal, and what the agent writes
validates with the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .readers import (
    Limits,
    REQUIRED,
    ReadError,
    boolean,
    dict_of,
    integer,
    list_of,
    number,
    one_of,
    read,
    text,
)

MODULE_MANIFEST_NAME = "outpost-module.json"  # modules.MODULE_MANIFEST_NAME
RESTART_POLICIES = ("always", "on-failure", "on-unhealthy", "never")
DESIRED = ("running", "stopped")


def wire(value: Any) -> Any:
    """A dataclass as the JSON the wire carries (its fields, nested ones too)."""
    return dataclasses.asdict(value)


# --- the deployment --------------------------------------------------------------------
@dataclass
class PackageRef:
    name: str
    version: str | None = None
    sha256: str | None = None

    @classmethod
    def read(cls, data: Any) -> PackageRef:
        return read(cls, "package", data, {
            "name": (text(), REQUIRED), "version": (text(), None), "sha256": (text(), None)})


@dataclass
class Backoff:
    base_seconds: float = 10.0
    cap_seconds: float = 300.0
    reset_after_seconds: float = 600.0
    max_restarts: int = 20

    @classmethod
    def read(cls, data: Any) -> Backoff:
        return read(cls, "backoff", data, {
            "base_seconds": (number(0), 10.0), "cap_seconds": (number(0), 300.0),
            "reset_after_seconds": (number(0), 600.0), "max_restarts": (integer(0), 20)})


@dataclass
class HealthProbe:
    command: list[str] | None = None
    http: str | None = None
    interval_seconds: float = 10.0
    timeout_seconds: float = 5.0
    failures: int = 3
    start_period_seconds: float = 0.0

    @classmethod
    def read(cls, data: Any) -> HealthProbe:
        return read(cls, "health", data, {
            "command": (list_of(text()), None), "http": (text(), None),
            "interval_seconds": (number(0), 10.0), "timeout_seconds": (number(0), 5.0),
            "failures": (integer(1), 3), "start_period_seconds": (number(0), 0.0)})


@dataclass
class ModuleSpec:
    package: PackageRef | None = None
    command: list[str] | None = None
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    status: str = "running"
    restart_policy: str = "always"
    order: int = 0
    health: HealthProbe | None = None
    limits: Limits = field(default_factory=Limits)
    dns: list[str] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    backoff: Backoff = field(default_factory=Backoff)
    run_as: str | None = None
    stop_timeout_seconds: float = 10.0

    @classmethod
    def read(cls, data: Any) -> ModuleSpec:
        spec = read(cls, "module", data, {
            "package": (PackageRef.read, None), "command": (list_of(text()), None),
            "args": (list_of(text()), list), "env": (dict_of(text()), dict),
            "status": (one_of(*DESIRED), "running"),
            "restart_policy": (one_of(*RESTART_POLICIES), "always"),
            "order": (integer(0), 0), "health": (HealthProbe.read, None),
            "limits": (Limits.read, Limits), "dns": (list_of(text()), list),
            "ports": (list_of(integer(1, 65535)), list), "backoff": (Backoff.read, Backoff),
            "run_as": (text(), None), "stop_timeout_seconds": (number(0), 10.0)})
        if (spec.package is None) == (spec.command is None):
            raise ReadError("module", ["give exactly one of 'package' and 'command'"])
        return spec


@dataclass
class RouteSpec:
    route: str
    priority: int = 0
    ttl_seconds: int | None = None

    @classmethod
    def read(cls, data: Any) -> RouteSpec:
        if isinstance(data, str):  # the manifest's short form: {name: "FROM ..."}
            data = {"route": data}
        return read(cls, "route", data, {
            "route": (text(), REQUIRED), "priority": (integer(0), 0),
            "ttl_seconds": (integer(1), None)})


@dataclass
class MessageHubSettings:
    ttl_seconds: int = 7200
    store_max_mb: int = 256
    max_message_kb: int = 256
    constrained: bool = False

    @classmethod
    def read(cls, data: Any) -> MessageHubSettings:
        return read(cls, "message_hub", data, {
            "ttl_seconds": (integer(1), 7200), "store_max_mb": (integer(1), 256),
            "max_message_kb": (integer(1), 256), "constrained": (boolean, False)})


@dataclass
class DeploymentManifest:
    schema_version: int = 1
    modules: dict[str, ModuleSpec] = field(default_factory=dict)
    routes: dict[str, RouteSpec] = field(default_factory=dict)
    message_hub: MessageHubSettings = field(default_factory=MessageHubSettings)

    @classmethod
    def read(cls, data: Any) -> DeploymentManifest:
        return read(cls, "manifest", data, {
            "schema_version": (integer(1), 1), "modules": (dict_of(ModuleSpec.read), dict),
            "routes": (dict_of(RouteSpec.read), dict),
            "message_hub": (MessageHubSettings.read, MessageHubSettings)})

    def route_texts(self) -> dict[str, str]:
        return {name: spec.route for name, spec in self.routes.items()}


@dataclass
class DeploymentDoc:
    """``GET /v1/agent/deployment``: the deployment this machine runs, or None."""

    etag: str
    deployment: str | None = None
    version: int = 0
    manifest: DeploymentManifest | None = None

    @classmethod
    def read(cls, data: Any) -> DeploymentDoc:
        return read(cls, "deployment", data, {
            "etag": (text(), REQUIRED), "deployment": (text(), None),
            "version": (integer(0), 0), "manifest": (DeploymentManifest.read, None)})


# --- a module package's outpost-module.json --------------------------------------------
@dataclass
class ModuleCommand:
    run: str
    args: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, data: Any) -> ModuleCommand:
        return read(cls, "run", data, {"run": (text(), REQUIRED),
                                       "args": (list_of(text()), list)})


@dataclass
class ModulePackageManifest:
    """The manifest of a package the agent unpacked (extpackage checked it then)."""

    name: str
    version: str
    run: ModuleCommand
    schema_version: int = 1
    description: str = ""

    @classmethod
    def read(cls, data: Any) -> ModulePackageManifest:
        return read(cls, "module package", data, {
            "schema_version": (integer(1), 1), "name": (text(), REQUIRED),
            "version": (text(), REQUIRED), "description": (text(), ""),
            "run": (ModuleCommand.read, REQUIRED)})


# --- what the agent writes -------------------------------------------------------------
@dataclass
class ModuleStatus:
    name: str
    state: str
    desired: str = "running"
    pid: int | None = None
    exit_code: int | None = None
    restart_count: int = 0
    last_start_at: float | None = None
    last_exit_at: float | None = None
    next_try_at: float | None = None
    healthy: bool | None = None
    version: str | None = None
    reason: str | None = None
    code: str | None = None


@dataclass
class MessageCounters:
    """The local message hub's counters since the agent started."""

    received: int = 0
    delivered: int = 0
    upstream_sent: int = 0
    upstream_queued: int = 0
    upstream_queued_bytes: int = 0
    expired: int = 0
    refused: int = 0
    filtered: int = 0
    rejected_identity: int = 0


@dataclass
class ModulesReport:
    """``POST /v1/agent/modules/report``."""

    reported_at: float
    deployment: str | None = None
    version: int = 0
    etag: str = ""
    modules: list[ModuleStatus] = field(default_factory=list)
    messages: MessageCounters = field(default_factory=MessageCounters)
    error: str | None = None


@dataclass
class UpstreamMessage:
    seq: int
    module: str
    output: str
    body: str
    created_at: float
    properties: dict[str, Any] = field(default_factory=dict)
    content_type: str | None = None
    message_id: str | None = None
    correlation_id: str | None = None
    route: str = ""


@dataclass
class UpstreamBatch:
    """``POST /v1/agent/messages``."""

    messages: list[UpstreamMessage]
    dropped_expired: int = 0


@dataclass
class UpstreamAck:
    accepted_through: int

    @classmethod
    def read(cls, data: Any) -> UpstreamAck:
        return read(cls, "upstream acknowledgement", data, {
            "accepted_through": (integer(), REQUIRED)})

