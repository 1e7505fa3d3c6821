"""Extensions: the package format, the desired state the hub hands an agent, and what the
agent reports back. Shared by the hub (publish, goals) and the agent (download, reconcile).

A package is a gzip-compressed tar archive holding ``outpost-extension.json`` (the
``Manifest``) at its root and the files its handlers run. Its identity is its SHA-256: the
hub records it at publish, the agent checks it before unpacking. ``packages.read`` (in
``outpost.protocol.extpackage``) validates an archive completely, in memory, before anything
is written, so a bad package is refused whole, naming the field or the file.

The agent learns its goals through ``HeartbeatAck.extensions_etag``: when it differs from
the etag of the goals it holds, it fetches ``GET /v1/agent/extensions`` (an
``ExtensionGoals``), reconciles, and reports each extension's ``ExtensionStatus`` with
``POST /v1/agent/extensions/status``. The agent reads and writes these without pydantic,
with the dataclasses of ``outpost.protocol.extreaders`` (held to these models by
tests/unit/test_extreaders.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from .base import Wire
from .extreaders import DEFAULT_HANDLER_TIMEOUT as DEFAULT_HANDLER_TIMEOUT
from .extreaders import HANDLERS as HANDLERS
from .extreaders import MANIFEST_NAME as MANIFEST_NAME
from .extreaders import SCHEMA_VERSION as SCHEMA_VERSION
from .extreaders import STATES as STATES
from .extreaders import HandlerName as HandlerName
from .extreaders import HandlerStatus as HandlerStatus
from .extreaders import State as State
from .extreaders import Step as Step
from .pkgrules import EXTENSION_MANIFEST as EXTENSION_MANIFEST
from .pkgrules import NAME_RE as NAME_RE
from .pkgrules import PACKAGE_MAX_BYTES as PACKAGE_MAX_BYTES
from .pkgrules import PACKAGE_MAX_MEMBERS as PACKAGE_MAX_MEMBERS
from .pkgrules import UNPACKED_MAX_BYTES as UNPACKED_MAX_BYTES
from .pkgrules import VERSION_RE as VERSION_RE
from .pkgrules import check_version as check_version
from .pkgrules import inside_package as inside_package
from .readers import INT32_MAX, INT64_MAX

# The constants and literal types above are defined with the agent's readers of these models
# (extreaders.py, without pydantic), and taken from here by the hub.


class Command(Wire):
    """A program inside the package, run with its arguments."""

    run: str = Field(min_length=1, max_length=1024,
                     description="A path inside the package, relative to its root "
                                 "(for example 'bin/enable').")
    args: list[str] = Field(default_factory=list, max_length=256)
    timeout_seconds: float = Field(default=DEFAULT_HANDLER_TIMEOUT, gt=0, le=86400)

    @field_validator("run")
    @classmethod
    def _inside(cls, value: str) -> str:
        return inside_package(value)


class Operation(Command):
    """An operation asked of the extension on a machine (for backup: snapshot, restore)."""

    start_timeout_seconds: float = Field(
        default=600, gt=0, le=86400,
        description="How long an asked operation may wait for the agent to start it "
                    "(151076 after it).")
    expected_seconds: float = Field(
        default=3600, gt=0, le=7 * 86400,
        description="How long it is expected to run; a new operation that finds it still "
                    "running past this fails with 150066.")
    pressure: bool = Field(
        default=True, description="Wait while the machine's CPU or memory is over the "
                                  "agent's pressure thresholds before starting.")


class Limits(Wire):
    """The extension's cgroup: None is the agent's default."""

    memory_mb: int | None = Field(default=None, ge=1, le=INT32_MAX)
    cpus: float | None = Field(default=None, gt=0, le=1024)
    processes: int | None = Field(default=None, ge=1, le=INT32_MAX)


class Manifest(Wire):
    schema_version: int = Field(default=SCHEMA_VERSION, ge=1, le=SCHEMA_VERSION)
    name: str = Field(description="Lowercase letters, digits, '.', '_' and '-'; 1 to 64.")
    version: str = Field(description="Numbers separated by dots, as 1.2.3.")
    description: str = Field(default="", max_length=4096)
    min_agent_version: str = Field(default="0.0.0", max_length=64)
    handlers: dict[HandlerName, Command] = Field(
        description="install, enable, disable, update, uninstall; enable and disable are "
                    "required, a missing other one does nothing.")
    operations: dict[str, Operation] = Field(default_factory=dict, max_length=64)
    limits: Limits = Field(default_factory=Limits)
    credentials: list[Literal["backup"]] = Field(
        default_factory=list, description="Credentials the agent fetches for this machine "
        "before each handler or operation and hands it on standard input (never on disk): "
        "'backup', the machine's own repository on the hub's backup store.")
    settings_schema: dict[str, Any] | None = Field(
        default=None, description="A JSON Schema the public settings must satisfy.")
    protected_settings_schema: dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError(f"'{value}' is not an extension name: use 1 to 64 lowercase "
                             "letters, digits, '.', '_' or '-', starting with a letter or "
                             "digit")
        return value

    @field_validator("version", "min_agent_version")
    @classmethod
    def _version(cls, value: str) -> str:
        return check_version(value)

    @field_validator("handlers")
    @classmethod
    def _required(cls, value: dict[str, Command]) -> dict[str, Command]:
        missing = [h for h in ("enable", "disable") if h not in value]
        if missing:
            raise ValueError(f"the handler(s) {', '.join(missing)} are required")
        return value

    @field_validator("operations")
    @classmethod
    def _operation_names(cls, value: dict[str, Operation]) -> dict[str, Operation]:
        for name in value:
            if not NAME_RE.match(name):
                raise ValueError(f"'{name}' is not an operation name: use lowercase "
                                 "letters, digits, '.', '_' or '-'")
        return value


class PackageInfo(Wire):
    """A published package, as the hub lists it."""

    name: str
    version: str
    sha256: str
    size: int = Field(ge=0, le=INT64_MAX)
    published_at: float
    manifest: Manifest


class ExtensionGoal(Wire):
    """One extension a machine should have, as the hub resolved it for that machine."""

    name: str
    version: str
    sha256: str
    size: int = Field(ge=0, le=INT64_MAX)
    enabled: bool = True
    seq: int = Field(ge=0, le=INT64_MAX, description="The settings' sequence number: it "
                     "grows with every change of the goal.")
    settings: dict[str, Any] = Field(default_factory=dict)
    protected: str | None = Field(default=None, description="The protected settings, a JSON "
                                  "object sealed to the machine's key (base64 of a NaCl "
                                  "sealed box to the Curve25519 form of its Ed25519 key).")
    run_as: str | None = Field(default=None, max_length=64, description="The user its "
                               "handlers run as when the operator asked for one "
                               "('extension set --run-as'); None is the agent's own "
                               "unprivileged extension user.")
    retry: int = Field(default=0, ge=0, le=INT64_MAX, description="Grows with each "
                       "'extension retry': a version that failed is tried again once it "
                       "changed.")


class ExtensionGoals(Wire):
    etag: str
    goals: list[ExtensionGoal] = Field(default_factory=list)


class ExtensionStatus(Wire):
    """What the agent reports of one extension."""

    name: str = Field(max_length=64)
    version: str | None = Field(default=None, max_length=64,
                                description="The version installed now, if any.")
    target_version: str | None = Field(default=None, max_length=64)
    state: State
    step: Step | None = Field(default=None, description="The step running now, or the one "
                              "that failed.")
    message: str = Field(default="", max_length=4000)
    code: int | None = Field(default=None, ge=-INT32_MAX, le=INT32_MAX,
                             description="The handler's own code from its status file.")
    changed_at: float = Field(ge=0)
    seq: int = Field(default=0, ge=0, le=INT64_MAX)
    failed_versions: list[str] = Field(default_factory=list, max_length=64,
                                       description="Versions not tried again until retried.")
    last_ready_version: str | None = Field(default=None, max_length=64)


class ExtensionStatusReport(Wire):
    extensions: list[ExtensionStatus] = Field(default_factory=list, max_length=256)


class HandlerStatusFile(Wire):
    """What a handler writes to ``$OUTPOST_EXT_STATUS_DIR/<seq>.status`` (JSON)."""

    status: HandlerStatus
    code: int = Field(default=0, ge=-INT32_MAX, le=INT32_MAX)
    message: str = Field(default="", max_length=4000)
    result: dict[str, Any] | None = Field(
        default=None, description="What an operation returned (for a snapshot: its id, "
        "size, files); shown with the operation on the hub.")
    transient: bool = Field(
        default=False, description="For an operation's error: it may pass (a repository "
        "locked, a network down); the hub tries the operation again with backoff.")
