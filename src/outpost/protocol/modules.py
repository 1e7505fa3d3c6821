"""Edge modules: the deployment manifest, the module package, what the agent reports, and the
messages modules send upstream. Shared by the hub (deployments, packages, upstream
messages), the agent (the supervisor and the local message hub) and the CLI.

A **deployment** names modules (each a published package or a program already on the
machine) and the message routes between them (``routes.py``). The hub keeps deployments per
account, each aimed at a group or one machine with a priority; the highest priority that
targets a machine is the one it runs (``DeploymentDoc``). The agent learns of a change from
``HeartbeatAck.deployment_etag``, fetches ``GET /v1/agent/deployment``, makes its modules
match, and reports a ``ModulesReport`` (``POST /v1/agent/modules/report``).

``load_manifest(text)`` reads YAML or JSON and refuses a manifest with an ``OutpostError``
(``deployment_invalid``) naming the field, its line and column, and for a route the column
inside it; ``manifest_schema()`` is the JSON Schema ``outpost deployment schema`` prints and
the hub serves at ``GET /v1/deployments/schema``.

A **module package** is a gzip-compressed tar archive with ``outpost-module.json`` (a
``ModulePackageManifest``) at its root, read and unpacked by ``extpackage`` with the same
checks as an extension's.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from . import routes as routes_lang
from .routes import RouteProblem
from .base import Wire
from .errors import OutpostError
from .extensions import Limits
from .pkgrules import MODULE_MANIFEST, NAME_RE, check_version, inside_package
from .readers import INT32_MAX

MODULE_MANIFEST_NAME = MODULE_MANIFEST
SCHEMA_VERSION = 1
MANIFEST_MAX_BYTES = 1024 * 1024
MAX_MODULES = 64
MAX_ROUTES = 256

RestartPolicy = Literal["always", "on-failure", "on-unhealthy", "never"]
DesiredStatus = Literal["running", "stopped"]
# What the agent reports of a module. ``backoff``: waiting to start again (``next_try_at``);
# ``unhealthy``: running, but its probe failed ``failures`` times in a row; ``failed``: it
# reached ``max_restarts`` (or cannot start: a missing package, a taken port) and stays so
# until the next deployment or ``outpost agent restart MODULE``.
ModuleState = Literal["starting", "running", "backoff", "unhealthy", "stopped", "failed"]
MODULE_STATES: tuple[ModuleState, ...] = ("starting", "running", "backoff", "unhealthy",
                                          "stopped", "failed")


def _name(value: str, what: str) -> str:
    if not NAME_RE.match(value):
        raise ValueError(f"'{value}' is not a {what} name: use 1 to 64 lowercase letters, "
                         "digits, '.', '_' or '-', starting with a letter or digit")
    return value


class ModuleCommand(Wire):
    """The program a module package runs: a path inside the package, and its arguments."""

    run: str = Field(min_length=1, max_length=1024)
    args: list[str] = Field(default_factory=list, max_length=256)

    @field_validator("run")
    @classmethod
    def _inside(cls, value: str) -> str:
        return inside_package(value)


class ModulePackageManifest(Wire):
    """``outpost-module.json`` at a module package's root."""

    schema_version: int = Field(default=SCHEMA_VERSION, ge=1, le=SCHEMA_VERSION)
    name: str
    version: str
    description: str = Field(default="", max_length=4096)
    run: ModuleCommand

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _name(value, "module package")

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        return check_version(value)


class PackageRef(Wire):
    name: str
    version: str | None = Field(default=None, description="Omitted: the newest published "
                                "version when the deployment is created (it is pinned then).")
    sha256: str | None = Field(default=None, description="Set by the hub when it pins the "
                               "version; the agent checks the download against it.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _name(value, "module package")


class Backoff(Wire):
    """How a module that ends is started again: the wait doubles from ``base_seconds`` up to
    ``cap_seconds``; ``reset_after_seconds`` of running clears the count; after
    ``max_restarts`` restarts in a row it is ``failed``."""

    base_seconds: float = Field(default=10.0, ge=0.05, le=86400)
    cap_seconds: float = Field(default=300.0, ge=0.05, le=86400)
    reset_after_seconds: float = Field(default=600.0, ge=0.1, le=7 * 86400)
    max_restarts: int = Field(default=20, ge=0, le=INT32_MAX)


class HealthProbe(Wire):
    """A command (its exit status) or an HTTP GET on loopback (a 2xx or 3xx answer)."""

    command: list[str] | None = Field(default=None, min_length=1, max_length=256)
    http: str | None = Field(default=None, max_length=2048, description=(
        "http://127.0.0.1:PORT/PATH (or localhost, or [::1])"))
    interval_seconds: float = Field(default=10.0, ge=0.1, le=86400)
    timeout_seconds: float = Field(default=5.0, ge=0.1, le=3600)
    failures: int = Field(default=3, ge=1, le=1000,
                          description="Failures in a row that make the module unhealthy.")
    start_period_seconds: float = Field(default=0.0, ge=0, le=86400, description=(
        "Failures in this time after a start do not count."))

    @field_validator("http")
    @classmethod
    def _loopback(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = urlsplit(value)
        host = parts.hostname or ""
        if parts.scheme != "http" or not (host == "localhost" or _loopback(host)):
            raise ValueError(f"'{value}' is not an http:// address on loopback: use "
                             "http://127.0.0.1:PORT/PATH")
        return value

    @model_validator(mode="after")
    def _one(self) -> HealthProbe:
        if (self.command is None) == (self.http is None):
            raise ValueError("give exactly one of 'command' and 'http'")
        return self


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ModuleSpec(Wire):
    package: PackageRef | None = Field(default=None, description=(
        "A published module package ('outpost module publish').") )
    command: list[str] | None = Field(default=None, min_length=1, max_length=256, description=(
        "A program already on the machine and its arguments (an absolute path first)."))
    args: list[str] = Field(default_factory=list, max_length=256, description=(
        "Arguments after the package's own (or the command's)."))
    env: dict[str, str] = Field(default_factory=dict, max_length=256)
    status: DesiredStatus = "running"
    restart_policy: RestartPolicy = "always"
    order: int = Field(default=0, ge=0, le=1000, description=(
        "Start-up order: lower first; a module starts once every module of a lower order "
        "is running (or healthy, when it has a probe)."))
    health: HealthProbe | None = None
    limits: Limits = Field(default_factory=Limits)
    dns: list[str] = Field(default_factory=list, max_length=3, description=(
        "DNS servers for this module (IP addresses), instead of the machine's."))
    ports: list[int] = Field(default_factory=list, max_length=64, description=(
        "TCP ports the module binds: checked free before each start (ED-5)."))
    backoff: Backoff = Field(default_factory=Backoff)
    run_as: str | None = Field(default=None, max_length=32, description=(
        "The user the module runs as; by default the agent's unprivileged module user."))
    stop_timeout_seconds: float = Field(default=10.0, gt=0, le=3600, description=(
        "How long a stop waits after SIGTERM before SIGKILL."))

    @field_validator("dns")
    @classmethod
    def _dns(cls, value: list[str]) -> list[str]:
        for server in value:
            try:
                ipaddress.ip_address(server)
            except ValueError:
                raise ValueError(f"'{server}' is not an IP address") from None
        return value

    @field_validator("ports")
    @classmethod
    def _ports(cls, value: list[int]) -> list[int]:
        for port in value:
            if not 0 < port < 65536:
                raise ValueError(f"{port} is not a TCP port (1-65535)")
        return value

    @field_validator("command")
    @classmethod
    def _absolute(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value[0].startswith("/"):
            raise ValueError(f"'{value[0]}' is not an absolute path: give the program's "
                             "full path, as /usr/bin/python3")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$", key):
                raise ValueError(f"'{key}' is not an environment variable name")
            if key.startswith("OUTPOST_"):
                raise ValueError(f"'{key}': names starting with OUTPOST_ are the agent's")
        return value

    @model_validator(mode="after")
    def _one(self) -> ModuleSpec:
        if (self.package is None) == (self.command is None):
            raise ValueError("give exactly one of 'package' and 'command'")
        return self


class RouteSpec(Wire):
    route: str = Field(max_length=routes_lang.MAX_ROUTE_CHARS, description=(
        "FROM /messages/... [WHERE condition] INTO $upstream | "
        'BrokeredEndpoint("/modules/M/inputs/I")'))
    priority: int = Field(default=0, ge=0, le=9, description="0 is the highest.")
    ttl_seconds: int | None = Field(default=None, ge=1, le=30 * 86400, description=(
        "How long a message waits to be delivered before it is dropped (and counted); "
        "default: the store's."))


class MessageHubSettings(Wire):
    ttl_seconds: int = Field(default=7200, ge=1, le=30 * 86400, description=(
        "How long a message may wait for its destination (the hub, or a module's input)."))
    store_max_mb: int = Field(default=256, ge=1, le=1024 * 1024, description=(
        "Bytes on disk for messages waiting to go upstream; when full, new ones are refused "
        "to the sender (never dropped silently)."))
    max_message_kb: int = Field(default=256, ge=1, le=16 * 1024)
    constrained: bool = Field(default=False, description=(
        "Small buffers and batches for devices short of memory (ED-8)."))


class DeploymentManifest(Wire):
    schema_version: int = Field(default=SCHEMA_VERSION, ge=1, le=SCHEMA_VERSION)
    modules: dict[str, ModuleSpec] = Field(default_factory=dict, max_length=MAX_MODULES)
    routes: dict[str, RouteSpec] = Field(default_factory=dict, max_length=MAX_ROUTES)
    message_hub: MessageHubSettings = Field(default_factory=MessageHubSettings)

    @field_validator("modules")
    @classmethod
    def _module_names(cls, value: dict[str, ModuleSpec]) -> dict[str, ModuleSpec]:
        for name in value:
            _name(name, "module")
        return value

    @field_validator("routes", mode="before")
    @classmethod
    def _short_routes(cls, value: Any) -> Any:
        # routes: {name: "FROM ..."} is short for {name: {route: "FROM ..."}}.
        if isinstance(value, dict):
            return {k: {"route": v} if isinstance(v, str) else v for k, v in value.items()}
        return value


def compile_routes(manifest: DeploymentManifest) -> dict[str, routes_lang.Route]:
    """Every route parsed, and checked against the modules: RouteProblem otherwise."""
    return routes_lang.compile_all({name: spec.route for name, spec in manifest.routes.items()},
                                   manifest.modules)


# --- reading a manifest with positions ------------------------------------------------------
Position = tuple[int, int]  # 1-based line and column


def _positions(node: yaml.Node, path: tuple[Any, ...], out: dict[tuple[Any, ...], Position]
               ) -> None:
    out[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            name = key.value
            out[(*path, name, "__key__")] = (key.start_mark.line + 1,
                                             key.start_mark.column + 1)
            _positions(value, (*path, name), out)
    elif isinstance(node, yaml.SequenceNode):
        for index, value in enumerate(node.value):
            _positions(value, (*path, index), out)


def _invalid(problem: str, field: str, position: Position | None, **details: Any
             ) -> OutpostError:
    where = f" (line {position[0]}, column {position[1]})" if position else ""
    return OutpostError("deployment_invalid",
                        f"The deployment manifest is not valid: {field}{where}: {problem}.",
                        field=field, line=position[0] if position else None,
                        column=position[1] if position else None, problem=problem,
                        **details)


def _where(positions: dict[tuple[Any, ...], Position], loc: tuple[Any, ...]
           ) -> Position | None:
    """The position of ``loc``, or of its nearest parent the file has."""
    for end in range(len(loc), -1, -1):
        key = tuple(str(p) if not isinstance(p, int) else p for p in loc[:end])
        if key in positions:
            return positions[key]
    return None


def _tab(text: str) -> OutpostError | None:
    for number, line in enumerate(text.splitlines(), 1):
        indent = line[:len(line) - len(line.lstrip(" \t"))]
        if "\t" in indent:
            return _invalid("a tab in the indentation; YAML is indented with spaces",
                            "(the file)", (number, indent.index("\t") + 1))
    return None


def parse_document(text: str) -> tuple[Any, dict[tuple[Any, ...], Position]]:
    """The YAML or JSON document in ``text`` and the position of each of its values."""
    if len(text.encode()) > MANIFEST_MAX_BYTES:
        raise _invalid(f"the file is larger than {MANIFEST_MAX_BYTES // 1024} KiB",
                       "(the file)", None)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        if text.lstrip().startswith("{"):
            try:
                return json.loads(text), {}
            except json.JSONDecodeError as json_exc:
                raise _invalid(f"it is not YAML or JSON ({json_exc.msg})", "(the file)",
                               (json_exc.lineno, json_exc.colno)) from None
        tab = _tab(text)
        if tab is not None:
            raise tab from None
        mark = getattr(exc, "problem_mark", None)
        position = (mark.line + 1, mark.column + 1) if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise _invalid(f"it is not YAML or JSON ({problem})", "(the file)", position) from None
    positions: dict[tuple[Any, ...], Position] = {}
    if node is not None:
        _positions(node, (), positions)
    return data, positions


def load_manifest(text: str) -> tuple[DeploymentManifest, dict[str, routes_lang.Route]]:
    """The manifest in ``text`` and its compiled routes, or ``deployment_invalid`` naming
    the field, line and column of the first problem (every problem in ``problems``)."""
    data, positions = parse_document(text)
    return validate_manifest(data, positions)


def validate_manifest(data: Any, positions: dict[tuple[Any, ...], Position] | None = None
                      ) -> tuple[DeploymentManifest, dict[str, routes_lang.Route]]:
    positions = positions or {}
    if not isinstance(data, dict):
        raise _invalid("the manifest is a mapping with 'modules' and 'routes'", "(the file)",
                       positions.get(()))
    # Names are checked here, not by the model, so that the refusal names the key's place.
    for section, valid, letters in (("modules", NAME_RE.match, "lowercase letters"),
                                    ("routes", routes_lang.valid_name, "letters")):
        names = data.get(section)
        for name in names if isinstance(names, dict) else ():
            if not isinstance(name, str) or not valid(name):
                raise _invalid(f"'{name}' is not a {section[:-1]} name: use 1 to 64 "
                               f"{letters}, digits, '.', '_' or '-', starting with a letter "
                               "or digit", f"{section}.{name}",
                               positions.get((section, str(name), "__key__")))
    try:
        manifest = DeploymentManifest.model_validate(data)
    except ValidationError as exc:
        problems: list[dict[str, Any]] = []
        located: list[tuple[str, str, Position | None]] = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            field = ".".join(str(p) for p in loc) or "(the manifest)"
            where = _where(positions, loc)
            message = error["msg"].removeprefix("Value error, ")
            located.append((message, field, where))
            problems.append({"field": field, "problem": message,
                             "line": where[0] if where else None,
                             "column": where[1] if where else None})
        message, field, where = located[0]
        raise _invalid(message, field, where, problems=problems) from None
    try:
        compiled = compile_routes(manifest)
    except RouteProblem as exc:
        where = positions.get(("routes", exc.name, "route")) or positions.get(
            ("routes", exc.name))
        field = f"routes.{exc.name}"
        if where is not None:
            raise _invalid(f"{exc} (column {exc.column} of the route)", field, where,
                           route_column=exc.column) from None
        raise _invalid(f"{exc} (column {exc.column} of the route)", field, None,
                       route_column=exc.column) from None
    return manifest, compiled


def manifest_schema() -> dict[str, Any]:
    schema = DeploymentManifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Outpost deployment manifest"
    return schema


# --- what the agent fetches and reports -----------------------------------------------------
class DeploymentDoc(Wire):
    """``GET /v1/agent/deployment``: the deployment this machine runs, or why there is none."""

    etag: str
    deployment: str | None = Field(default=None, description="Its name; None: no "
                                   "deployment targets this machine.")
    version: int = 0
    manifest: DeploymentManifest | None = None


class ModuleStatus(Wire):
    name: str
    state: ModuleState
    desired: DesiredStatus = "running"
    pid: int | None = None
    exit_code: int | None = None
    restart_count: int = 0
    last_start_at: float | None = None
    last_exit_at: float | None = None
    next_try_at: float | None = None
    healthy: bool | None = Field(default=None, description="The last probe's result; None "
                                 "without a probe or before its first.")
    version: str | None = Field(default=None, description="The package version running.")
    reason: str | None = Field(default=None, description="Why it is failed, backoff or "
                               "unhealthy, with the code where there is one.")
    code: str | None = None


class MessageCounters(Wire):
    """The local message hub's counters since the agent started."""

    received: int = 0
    delivered: int = 0
    upstream_sent: int = 0
    upstream_queued: int = 0
    upstream_queued_bytes: int = 0
    expired: int = 0
    refused: int = 0
    filtered: int = Field(default=0, description=(
        "Sends that routes read but whose conditions all said no: acknowledged, delivered "
        "nowhere."))
    rejected_identity: int = 0


class ModulesReport(Wire):
    """``POST /v1/agent/modules/report``: the machine's modules as they are now."""

    deployment: str | None = None
    version: int = 0
    etag: str = ""
    reported_at: float
    modules: list[ModuleStatus] = Field(default_factory=list, max_length=MAX_MODULES)
    messages: MessageCounters = Field(default_factory=MessageCounters)
    error: str | None = Field(default=None, description=(
        "Why the deployment could not be applied as a whole (with its code)."))


# --- messages upstream ----------------------------------------------------------------------
class UpstreamMessage(Wire):
    """One message a module sent that a route took ``INTO $upstream``."""

    seq: int = Field(ge=0, description="The agent's sequence number: the hub keeps one "
                     "message per (machine, seq), so a batch sent again is not doubled.")
    module: str
    output: str
    properties: dict[str, Any] = Field(default_factory=dict)
    content_type: str | None = None
    message_id: str | None = None
    correlation_id: str | None = None
    body: str = Field(description="The body, base64.")
    created_at: float
    route: str = ""


class UpstreamBatch(Wire):
    """``POST /v1/agent/messages``: messages in the order the agent took them."""

    messages: list[UpstreamMessage] = Field(max_length=1000)
    dropped_expired: int = Field(default=0, ge=0, description=(
        "Messages dropped since the last batch because their time-to-live passed."))


class UpstreamAck(Wire):
    accepted_through: int = Field(description="The highest seq the hub now holds.")
