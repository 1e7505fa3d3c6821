"""The agent's side of the extensions' wire, without pydantic (extensions.py has the models).

An agent with extensions reads its goals (``ExtensionGoals``), the manifest of each package
it unpacks, the status file each handler and operation writes (``HandlerStatusFile``) and the
``ext_op`` work items (``ExtOpPayload``, work.py), and writes ``ExtensionStatusReport``s.
Building pydantic's validators for those models cost an agent with two Ready extensions
about 13 MB of resident memory, a third of its 40 MB budget (bench/README.md, "Extensions on
the agent"), so the agent reads and writes them here as plain dataclasses, in the style of
readers.py and modreaders.py. The models stay the wire's definition: the hub validates a
manifest at publish with them, serves the goals and takes the reports with them, and
documents them.

A package's manifest is checked on the agent with the same rules as at publish (names,
versions, paths inside the package, bounds, the required handlers), so a bad package is
refused before anything is unpacked. The readers convert nothing, where the models convert
what pydantic's lax mode converts (a number written as a string in a status file): what a
reader refuses is therefore validated again with its model (``read_lax``), imported only
then, and read back from the model's dump. So the agent accepts exactly what the hub's model
accepts, and a refusal says what it always said (``<file> is not a status file: code: ...``),
while well-formed input never loads pydantic.

tests/unit/test_extreaders.py holds each dataclass to its model: the same fields with the
same defaults, what the hub's models dump reads back equal, what the agent writes validates
with the hub's models, and a manifest is refused by both or by neither.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from .pkgrules import EXTENSION_MANIFEST, NAME_RE, check_version, inside_package
from .readers import (
    Limits,
    INT32_MAX,
    INT64_MAX,
    REQUIRED,
    Check,
    ReadError,
    _Bad,
    boolean,
    dict_of,
    integer,
    list_of,
    number,
    obj,
    one_of,
    read,
    text,
)

T = TypeVar("T")

MANIFEST_NAME = EXTENSION_MANIFEST
SCHEMA_VERSION = 1

# The handler commands, in the order an update runs them (disable old, update, uninstall
# old, install new, enable new).
HANDLERS = ("install", "enable", "disable", "update", "uninstall")
HandlerName = Literal["install", "enable", "disable", "update", "uninstall"]
DEFAULT_HANDLER_TIMEOUT = 300.0

State = Literal["NotInstalled", "Installing", "Transitioning", "Ready", "NotReady", "Failed"]
STATES: tuple[State, ...] = ("NotInstalled", "Installing", "Transitioning", "Ready",
                             "NotReady", "Failed")
# The steps an agent takes for an extension: the handler commands, and its own.
Step = Literal["download", "verify", "unpack", "install", "enable", "disable", "update",
               "uninstall", "rollback"]
# What a handler writes to its status file.
HandlerStatus = Literal["transitioning", "success", "warning", "error"]
HANDLER_STATUSES = ("transitioning", "success", "warning", "error")
CREDENTIALS = ("backup",)


def wire(value: Any) -> Any:
    """A dataclass as the JSON the wire carries (its fields, nested ones too)."""
    return dataclasses.asdict(value)


def seconds(gt: float, le: float) -> Check:
    """A finite number of seconds over ``gt`` and at most ``le``."""
    def check(value: Any) -> float:
        found = float(number()(value))
        if not gt < found <= le:
            raise _Bad(f"{found:g} is not within ({gt:g}, {le:g}]")
        return found
    return check


def ruled(base: Check, rule: Callable[[Any], Any]) -> Check:
    """``base``, then ``rule`` (a pkgrules check raising ValueError) on what it read."""
    def check(value: Any) -> Any:
        found = base(value)
        try:
            rule(found)
        except ReadError:
            raise
        except ValueError as exc:
            raise _Bad(str(exc)) from None
        return found
    return check


def _run(value: Any) -> str:
    found = text(1024)(value)
    if not found:
        raise _Bad("at least 1 character")
    return str(found)


def _args(value: Any) -> list[str]:
    found: list[str] = list_of(text())(value)
    if len(found) > 256:
        raise _Bad("at most 256 items")
    return found


def _name(value: str) -> None:
    if not NAME_RE.match(value):
        raise ValueError(f"'{value}' is not an extension name: use 1 to 64 lowercase "
                         "letters, digits, '.', '_' or '-', starting with a letter or digit")


def _handlers(value: Any) -> dict[str, Command]:
    found: dict[str, Command] = dict_of(Command.read)(value)
    unknown = [h for h in found if h not in HANDLERS]
    if unknown:
        raise _Bad(f"'{unknown[0]}' is not a handler: use {', '.join(HANDLERS)}")
    missing = [h for h in ("enable", "disable") if h not in found]
    if missing:
        raise _Bad(f"the handler(s) {', '.join(missing)} are required")
    return found


def _operations(value: Any) -> dict[str, Operation]:
    found: dict[str, Operation] = dict_of(Operation.read)(value)
    if len(found) > 64:
        raise _Bad("at most 64 operations")
    for name in found:
        if not NAME_RE.match(name):
            raise _Bad(f"'{name}' is not an operation name: use lowercase letters, digits, "
                       "'.', '_' or '-'")
    return found


# --- a package's outpost-extension.json ------------------------------------------------
@dataclass
class Command:
    """``extensions.Command``: a program inside the package, run with its arguments."""

    run: str
    args: list[str] = field(default_factory=list)
    timeout_seconds: float = DEFAULT_HANDLER_TIMEOUT

    @classmethod
    def read(cls, data: Any) -> Command:
        return read(cls, "command", data, {
            "run": (ruled(_run, inside_package), REQUIRED), "args": (_args, list),
            "timeout_seconds": (seconds(0, 86400), DEFAULT_HANDLER_TIMEOUT)})


@dataclass
class Operation(Command):
    """``extensions.Operation``: an operation asked of the extension on a machine."""

    start_timeout_seconds: float = 600
    expected_seconds: float = 3600
    pressure: bool = True

    @classmethod
    def read(cls, data: Any) -> Operation:
        return read(cls, "operation", data, {
            "run": (ruled(_run, inside_package), REQUIRED), "args": (_args, list),
            "timeout_seconds": (seconds(0, 86400), DEFAULT_HANDLER_TIMEOUT),
            "start_timeout_seconds": (seconds(0, 86400), 600),
            "expected_seconds": (seconds(0, 7 * 86400), 3600),
            "pressure": (boolean, True)})


@dataclass
class Manifest:
    """``extensions.Manifest``, with the same rules (pkgrules.py and the bounds)."""

    name: str
    version: str
    handlers: dict[str, Command]
    schema_version: int = SCHEMA_VERSION
    description: str = ""
    min_agent_version: str = "0.0.0"
    operations: dict[str, Operation] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    credentials: list[str] = field(default_factory=list)
    settings_schema: dict[str, Any] | None = None
    protected_settings_schema: dict[str, Any] | None = None

    @classmethod
    def read(cls, data: Any) -> Manifest:
        return read(cls, "manifest", data, {
            "schema_version": (integer(1, SCHEMA_VERSION), SCHEMA_VERSION),
            "name": (ruled(text(), _name), REQUIRED),
            "version": (ruled(text(), check_version), REQUIRED),
            "description": (text(4096), ""),
            "min_agent_version": (ruled(text(64), check_version), "0.0.0"),
            "handlers": (_handlers, REQUIRED), "operations": (_operations, dict),
            "limits": (Limits.read, Limits),
            "credentials": (list_of(one_of(*CREDENTIALS)), list),
            "settings_schema": (obj, None), "protected_settings_schema": (obj, None)})


# --- what the hub sends ----------------------------------------------------------------
@dataclass
class ExtensionGoal:
    """``extensions.ExtensionGoal``: one extension the machine should have."""

    name: str
    version: str
    sha256: str
    size: int
    seq: int
    enabled: bool = True
    settings: dict[str, Any] = field(default_factory=dict)
    protected: str | None = None
    run_as: str | None = None
    retry: int = 0

    @classmethod
    def read(cls, data: Any) -> ExtensionGoal:
        return read(cls, "goal", data, {
            "name": (text(), REQUIRED), "version": (text(), REQUIRED),
            "sha256": (text(), REQUIRED), "size": (integer(0, INT64_MAX), REQUIRED),
            "seq": (integer(0, INT64_MAX), REQUIRED), "enabled": (boolean, True),
            "settings": (obj, dict), "protected": (text(), None), "run_as": (text(64), None),
            "retry": (integer(0, INT64_MAX), 0)})


@dataclass
class ExtensionGoals:
    """``GET /v1/agent/extensions``."""

    etag: str
    goals: list[ExtensionGoal] = field(default_factory=list)

    @classmethod
    def read(cls, data: Any) -> ExtensionGoals:
        return read(cls, "goals", data, {
            "etag": (text(), REQUIRED), "goals": (list_of(ExtensionGoal.read), list)})


@dataclass
class ExtOpPayload:
    """``work.ExtOpPayload``: an operation asked of an installed extension."""

    op_id: str
    extension: str
    operation: str
    version: str | None = None
    attempt: int = 1
    params: dict[str, Any] = field(default_factory=dict)
    deadline: float | None = None

    @classmethod
    def read(cls, data: Any) -> ExtOpPayload:
        return read(cls, "operation", data, {
            "op_id": (text(), REQUIRED), "extension": (text(64), REQUIRED),
            "operation": (text(64), REQUIRED), "version": (text(64), None),
            "attempt": (integer(1, INT32_MAX), 1), "params": (obj, dict),
            "deadline": (number(), None)})


# --- what a handler or an operation writes ---------------------------------------------
@dataclass
class HandlerStatusFile:
    """``extensions.HandlerStatusFile``: ``$OUTPOST_EXT_STATUS_DIR/<seq>.status``."""

    status: HandlerStatus
    code: int = 0
    message: str = ""
    result: dict[str, Any] | None = None
    transient: bool = False

    @classmethod
    def read(cls, data: Any) -> HandlerStatusFile:
        return read(cls, "status file", data, {
            "status": (one_of(*HANDLER_STATUSES), REQUIRED),
            "code": (integer(-INT32_MAX, INT32_MAX), 0), "message": (text(4000), ""),
            "result": (obj, None), "transient": (boolean, False)})


# --- what the agent writes -------------------------------------------------------------
@dataclass
class ExtensionStatus:
    """``extensions.ExtensionStatus``: what the agent reports of one extension."""

    name: str
    state: State
    changed_at: float
    version: str | None = None
    target_version: str | None = None
    step: Step | None = None
    message: str = ""
    code: int | None = None
    seq: int = 0
    failed_versions: list[str] = field(default_factory=list)
    last_ready_version: str | None = None


@dataclass
class ExtensionStatusReport:
    """``POST /v1/agent/extensions/status``."""

    extensions: list[ExtensionStatus] = field(default_factory=list)


def read_lax(reader: Callable[[Any], T], model: str, data: Any) -> T:
    """``reader(data)``; what it refuses is validated with the model ``model`` of
    extensions.py or work.py (pydantic imported then only) and read from its dump, so that
    what the model converts (``"3"`` for 3) is accepted as it always was. Raises pydantic's
    ValidationError (a ValueError, naming the field) when the model refuses it too."""
    try:
        return reader(data)
    except ReadError:
        from . import extensions, work

        found = getattr(extensions, model, None) or getattr(work, model)
        return reader(found.model_validate(data).model_dump(mode="json"))

