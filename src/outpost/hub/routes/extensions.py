"""Extensions: the operator's API (packages, goals, per-machine states, retry) and the
agent's (its goals, the packages they name, its status reports)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import Field

from outpost.protocol.errors import OutpostError
from outpost.protocol.extensions import (
    PACKAGE_MAX_BYTES, ExtensionGoals, ExtensionStatusReport, PackageInfo,
)
from outpost.protocol.models import View, Wire

from .. import extension_states, machines
from ..openapi import ok
from .agents import SIGNED
from .deps import HubDep, Machine, Op, agent_body, errors

router = APIRouter()
TAGS: list[str | Any] = ["extensions"]
Kind = Literal["group", "machine"]
# What a publish may be sent as: the archive's own type, or bytes of no declared type.
PACKAGE_TYPES = ("application/gzip", "application/x-gzip", "application/octet-stream")


class GoalChange(Wire):
    """The fields to change; a field left out keeps its value (a new goal: the default)."""

    version: str | None = Field(default=None, max_length=64, description="A published "
                                "version; null: the newest, now and as new ones appear.")
    settings: dict[str, Any] | None = Field(default=None, description="Public settings, "
                                            "checked against the manifest's settings_schema.")
    protected_settings: dict[str, Any] | None = Field(
        default=None, description="Protected settings, checked against "
        "protected_settings_schema; sealed at rest, never shown again, and sent to each "
        "machine sealed to its own key. null removes them.")
    enabled: bool | None = Field(default=None, description="Default true.")
    run_as: str | None = Field(default=None, max_length=64, description="The user the "
                               "handlers run as; null: the agent's extension user.")


class ExtensionSummary(View):
    name: str
    newest: str
    versions: list[str]
    published_at: float
    description: str


class ExtensionVersion(View):
    version: str
    sha256: str
    size: int
    min_agent_version: str
    operations: list[str]
    description: str
    published_at: float


class GoalView(View):
    name: str
    target_kind: str
    target: str
    version: str | None = Field(description="As set; null: the newest version.")
    resolved_version: str | None
    settings: dict[str, Any]
    protected: bool = Field(description="Whether protected settings are set (never shown).")
    enabled: bool
    run_as: str | None
    seq: int
    updated_at: float


class GoalSaved(GoalView):
    created: bool


class ExtensionShown(View):
    name: str
    newest: str
    versions: list[ExtensionVersion]
    goals: list[GoalView]


class GoalRemoved(View):
    name: str
    target_kind: str
    target: str
    removed: bool


class MachineExtension(View):
    """One machine and one extension: what is wanted there and what its agent reported."""

    machine: str
    machine_id: str
    group: str
    name: str
    goal: str | None = Field(description="Whose goal applies: machine, group, or null "
                             "(none: the agent uninstalls what it reported).")
    desired_version: str | None
    enabled: bool | None
    seq: int | None
    retry: int
    state: str | None = Field(description="As last reported; null: nothing reported yet.")
    version: str | None
    target_version: str | None
    step: str | None
    message: str
    code: int | None
    changed_at: float | None
    reported_seq: int | None
    failed_versions: list[str]
    last_ready_version: str | None
    reported_at: float | None


class RetryDone(View):
    name: str
    machine: str
    machine_id: str
    retry: int


async def package_body(request: Request, kind: str) -> bytes:
    """A published package's bytes (extension or module): sent as its own bytes, at most
    PACKAGE_MAX_BYTES (the edge refuses a larger body first; a direct caller here)."""
    sent = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if sent not in PACKAGE_TYPES:
        raise OutpostError("invalid_request", f"The body's Content-Type is '{sent or 'none'}'; "
                           "a package is sent as its own bytes.",
                           fix=f"Send the .tar.gz file as the body with 'Content-Type: "
                               f"application/gzip' ('outpost {kind} publish FILE' does).")
    body = await request.body()
    if len(body) > PACKAGE_MAX_BYTES:
        raise OutpostError("ext_package_too_large", f"The {kind} package is larger than "
                           f"{PACKAGE_MAX_BYTES} bytes.", limit=PACKAGE_MAX_BYTES,
                           size=len(body))
    return body


# --- operators --------------------------------------------------------------------------
@router.post("/v1/extensions", tags=TAGS, status_code=201, response_model=None,
             responses=ok(PackageInfo, 201, "Published.") | ok(
                 PackageInfo, 200, "That version was already published with the same "
                 "bytes; nothing changed."),
             # Declared as octet-stream, which every client and fuzzer can send; the hub
             # takes application/gzip too (PACKAGE_TYPES).
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/octet-stream": {"schema": {"type": "string",
                                                         "format": "binary"}}}}})
async def extension_publish(principal: Op, hub: HubDep, request: Request,
                            response: Response) -> dict[str, Any]:
    """Publish an extension package: the .tar.gz file as the body (Content-Type
    application/gzip), at most 64 MiB. A version is immutable."""
    body = await package_body(request, "extension")
    info, created = await hub.extensions.publish(principal.account_id, body)
    if not created:
        response.status_code = 200
    return info


@router.get("/v1/extensions", tags=TAGS, response_model=None,
            responses=ok(list[ExtensionSummary]))
async def extension_list(principal: Op, hub: HubDep) -> list[dict[str, Any]]:
    """The account's extensions: each one's versions and the newest."""
    return await hub.extensions.listing(principal.account_id)


@router.get("/v1/extensions/{name}", tags=TAGS, response_model=None,
            responses=ok(ExtensionShown))
async def extension_show(principal: Op, hub: HubDep, name: str) -> dict[str, Any]:
    """One extension: its versions (digest, size, minimum agent, operations) and goals."""
    return await hub.extensions.show(principal.account_id, name)


@router.put("/v1/extensions/{name}/targets/{kind}/{target}", tags=TAGS,
            response_model=None, responses=ok(GoalSaved))
async def extension_set(principal: Op, hub: HubDep, name: str, kind: Kind, target: str,
                        body: GoalChange) -> dict[str, Any]:
    """Create or change the goal of extension NAME for a group or a machine (a machine's
    own goal overrides its group's). Each change gives the goal a new seq."""
    return await hub.extensions.set_goal(principal.account_id, name, kind, target,
                                         body.model_dump(exclude_unset=True))


@router.delete("/v1/extensions/{name}/targets/{kind}/{target}", tags=TAGS,
               response_model=None, responses=ok(GoalRemoved))
async def extension_remove(principal: Op, hub: HubDep, name: str, kind: Kind,
                           target: str) -> dict[str, Any]:
    """Remove the goal: the machines it applied to uninstall the extension (or follow
    their group's goal)."""
    return await hub.extensions.remove_goal(principal.account_id, name, kind, target)


@router.get("/v1/extensions/{name}/machines", tags=TAGS, response_model=None,
            responses=ok(list[MachineExtension]))
async def extension_machines(principal: Op, hub: HubDep, name: str) -> list[dict[str, Any]]:
    """Each machine that should have the extension or reported it: wanted and reported."""
    return await extension_states.by_extension(hub.engine, principal.account_id, name)


@router.get("/v1/machines/{machine}/extensions", tags=TAGS, response_model=None,
            responses=ok(list[MachineExtension]))
async def machine_extensions(principal: Op, hub: HubDep, machine: str) -> list[dict[str, Any]]:
    """Each extension one machine should have or reported."""
    row = await machines.find(hub.engine, principal.account_id, machine)
    return await extension_states.by_machine(hub.engine, principal.account_id, row)


@router.post("/v1/machines/{machine}/extensions/{name}/retry", tags=TAGS,
             response_model=None, responses=ok(RetryDone))
async def extension_retry(principal: Op, hub: HubDep, machine: str,
                          name: str) -> dict[str, Any]:
    """Let the machine try again a version that failed there."""
    row = await machines.find(hub.engine, principal.account_id, machine)
    return await hub.extensions.retry(principal.account_id, row, name)


# --- agents (signed with the machine's key) ------------------------------------------------
_PACKAGE_ANSWER: dict[int | str, Any] = {200: {
    "content": {"application/gzip": {}},
    "description": "The package's bytes; X-Outpost-Sha256 is their SHA-256."}}


def _signed(responses: dict[int | str, Any]) -> dict[str, Any]:
    return {**SIGNED, "responses": SIGNED["responses"] | responses}


@router.get("/v1/agent/extensions", response_model=None, **_signed(ok(ExtensionGoals)))
async def agent_goals(signed: Machine, hub: HubDep) -> dict[str, Any]:
    """This machine's goals, protected settings sealed to its key; the etag is the one
    its heartbeat answers carry."""
    goals = await hub.extensions.goals_for(signed.machine)
    return goals.model_dump()


@router.get("/v1/agent/extensions/{name}/{version}/package", response_class=Response,
            **_signed(_PACKAGE_ANSWER | errors(404)))
async def agent_package(signed: Machine, hub: HubDep, name: str, version: str) -> Response:
    """A package one of this machine's goals names."""
    data, sha256 = await hub.extensions.package_for(signed.machine, name, version)
    return Response(data, media_type="application/gzip",
                    headers={"X-Outpost-Sha256": sha256, "Cache-Control": "no-store"})


@router.post("/v1/agent/extensions/status", **SIGNED, status_code=204,
             response_class=Response)
async def agent_status(hub: HubDep, sent: Annotated[
        tuple[Any, ExtensionStatusReport],
        Depends(agent_body(ExtensionStatusReport))]) -> Response:
    """The agent's news of its extensions (the newest ``changed_at`` of each wins)."""
    row, body = sent
    await extension_states.record(hub.engine, row.id, body.extensions)
    return Response(status_code=204)

