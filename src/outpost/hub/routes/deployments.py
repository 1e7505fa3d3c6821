"""Edge modules: the operator's API (module packages, deployments, rollout) and the agent's
(its deployment, the packages it names, its modules' report). docs/modules.md."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import Field, model_validator

from outpost.protocol import modules as mp
from outpost.protocol.models import View, Wire
from outpost.protocol.readers import INT32_MAX

from ..openapi import ok
from .agents import SIGNED
from .deps import HubDep, Machine, Op, agent_body, errors
from .extensions import package_body

router = APIRouter()
TAGS: list[str | Any] = ["deployments"]


class DeploymentCreate(Wire):
    """A deployment: its manifest as text, aimed at one group or one machine."""

    name: str = Field(min_length=1, max_length=64)
    manifest: str = Field(max_length=mp.MANIFEST_MAX_BYTES, description=(
        "The manifest, YAML or JSON text (GET /v1/deployments/schema is its schema)."))
    group: str | None = Field(default=None, min_length=1, max_length=64)
    machine: str | None = Field(default=None, min_length=1, max_length=64, description=(
        "A machine's name or id."))
    priority: int = Field(default=0, ge=0, le=INT32_MAX, description=(
        "The highest priority among the deployments that target a machine is the one it "
        "runs; between equal ones, the most recently updated."))

    @model_validator(mode="after")
    def _one(self) -> DeploymentCreate:
        if (self.group is None) == (self.machine is None):
            raise ValueError("give exactly one of 'group' and 'machine'")
        return self


class ModulePackageInfo(View):
    """A published module package."""

    name: str
    version: str
    sha256: str
    size: int
    published_at: float
    manifest: mp.ModulePackageManifest


class ModulePackageRow(View):
    name: str
    version: str
    sha256: str
    size: int
    published_at: float
    description: str
    run: str


class ModulePackageVersions(View):
    name: str
    newest: str
    versions: list[ModulePackageRow]


class DeploymentSaved(View):
    name: str
    target_kind: str
    target: str
    priority: int
    version: int
    created: bool
    created_at: float
    updated_at: float
    manifest: dict[str, Any] = Field(description="As validated, every package pinned.")


class DeploymentSummary(View):
    name: str
    target_kind: str
    target: str
    priority: int
    version: int
    modules: int
    machines: int = Field(description="Machines it targets.")
    applied: int = Field(description="Machines it targets that run it (no deployment of a "
                         "higher priority targets them).")
    updated_at: float


class TargetedMachine(View):
    machine: str
    machine_id: str
    group: str
    applied: bool
    winner: str | None = Field(description="The deployment the machine runs.")
    winner_priority: int | None


class DeploymentShown(View):
    name: str
    target_kind: str
    target: str
    priority: int
    version: int
    created_at: float
    updated_at: float
    source: str = Field(description="The manifest as it was sent.")
    manifest: dict[str, Any] = Field(description="As validated, every package pinned.")
    machines: list[TargetedMachine]


class RolloutModule(View):
    name: str | None
    state: str | None
    desired: str | None
    version: str | None
    pid: int | None = None
    exit_code: int | None
    restart_count: int | None
    last_start_at: float | None
    last_exit_at: float | None
    next_try_at: float | None
    healthy: bool | None
    reason: str | None
    code: str | None


class RolloutMachine(View):
    machine: str
    machine_id: str
    group: str
    applied: bool
    winner: str | None
    desired_version: int | None
    reported_deployment: str | None
    reported_version: int | None
    status: str = Field(description="pending (not reported at this version yet), applied "
                        "(every module as wanted), failing, or superseded (a deployment of "
                        "a higher priority runs there).")
    error: str | None
    fetched_at: float | None
    reported_at: float | None
    modules: list[RolloutModule]
    messages: dict[str, int] | None = Field(default=None, description=(
        "The machine's local message hub counters as its agent last reported them "
        "(MessageCounters), for this deployment."))


class Rollout(View):
    name: str
    version: int
    complete: bool
    machines: list[RolloutMachine]


class ManifestSchema(View):
    """The JSON Schema (draft 2020-12) of a deployment manifest."""

    schema_uri: str = Field(alias="$schema")
    title: str
    type: str
    properties: dict[str, Any]
    defs: dict[str, Any] = Field(alias="$defs")


class DeploymentDeleted(View):
    name: str
    deleted: bool


# --- operators --------------------------------------------------------------------------
@router.post("/v1/modules", tags=TAGS, status_code=201, response_model=None,
             responses=ok(ModulePackageInfo, 201, "Published.") | ok(
                 ModulePackageInfo, 200, "That version was already published with the same "
                 "bytes; nothing changed."),
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/octet-stream": {"schema": {"type": "string",
                                                         "format": "binary"}}}}})
async def module_publish(principal: Op, hub: HubDep, request: Request,
                         response: Response) -> dict[str, Any]:
    """Publish a module package: the .tar.gz file (outpost-module.json at its root) as the
    body (Content-Type application/gzip), at most 64 MiB. A version is immutable."""
    body = await package_body(request, "module")
    info, created = await hub.deployments.publish(principal.account_id, body)
    if not created:
        response.status_code = 200
    return info


@router.get("/v1/modules", tags=TAGS, response_model=None,
            responses=ok(list[ModulePackageRow]))
async def module_list(principal: Op, hub: HubDep) -> list[dict[str, Any]]:
    """Every published module package version of the account, newest first."""
    return await hub.deployments.packages(principal.account_id)


@router.get("/v1/modules/{name}", tags=TAGS, response_model=None,
            responses=ok(ModulePackageVersions))
async def module_versions(principal: Op, hub: HubDep, name: str) -> dict[str, Any]:
    """One module package's versions, the newest first."""
    return await hub.deployments.versions(principal.account_id, name)


@router.get("/v1/deployments/schema", tags=TAGS, response_model=None,
            responses=ok(ManifestSchema))
async def deployment_schema(principal: Op) -> dict[str, Any]:
    """The JSON Schema of a deployment manifest."""
    return mp.manifest_schema()


@router.post("/v1/deployments", tags=TAGS, response_model=None,
             responses=ok(DeploymentSaved) | errors(404, 422))
async def deployment_create(principal: Op, hub: HubDep,
                            body: DeploymentCreate) -> dict[str, Any]:
    """Create a deployment, or replace the one of that name (its version grows by one).
    A manifest with errors is refused naming each field, line and column (E9150); a package
    that is not published, naming it (E9153)."""
    kind, target = ("group", body.group) if body.group is not None else \
        ("machine", body.machine)
    assert target is not None
    return await hub.deployments.create(principal.account_id, body.name, body.manifest,
                                        kind, target, body.priority)


@router.get("/v1/deployments", tags=TAGS, response_model=None,
            responses=ok(list[DeploymentSummary]))
async def deployment_list(principal: Op, hub: HubDep) -> list[dict[str, Any]]:
    """The account's deployments, with how many machines each targets and runs it."""
    return await hub.deployments.listing(principal.account_id)


@router.get("/v1/deployments/{name}", tags=TAGS, response_model=None,
            responses=ok(DeploymentShown))
async def deployment_show(principal: Op, hub: HubDep, name: str) -> dict[str, Any]:
    """One deployment: its manifest, and per targeted machine whether it runs this one or
    which deployment of a higher priority wins."""
    return await hub.deployments.show(principal.account_id, name)


@router.get("/v1/deployments/{name}/rollout", tags=TAGS, response_model=None,
            responses=ok(Rollout))
async def deployment_rollout(principal: Op, hub: HubDep, name: str) -> dict[str, Any]:
    """Per targeted machine: the version it should run against the one its agent reported,
    and each module's state, exit code, restarts, last start and exit, and reason."""
    return await hub.deployments.rollout(principal.account_id, name)


@router.delete("/v1/deployments/{name}", tags=TAGS, response_model=None,
               responses=ok(DeploymentDeleted))
async def deployment_delete(principal: Op, hub: HubDep, name: str) -> dict[str, Any]:
    """Delete a deployment: its machines run the next one that targets them, or none."""
    return await hub.deployments.delete(principal.account_id, name)


# --- agents (signed with the machine's key) ------------------------------------------------
_PACKAGE_ANSWER: dict[int | str, Any] = {200: {
    "content": {"application/gzip": {}},
    "description": "The package's bytes; X-Outpost-Sha256 is their SHA-256."}}


def _signed(responses: dict[int | str, Any]) -> dict[str, Any]:
    return {**SIGNED, "responses": SIGNED["responses"] | responses}


@router.get("/v1/agent/deployment", response_model=None, **_signed(ok(mp.DeploymentDoc)))
async def agent_deployment(signed: Machine, hub: HubDep) -> dict[str, Any]:
    """The deployment this machine runs (none: ``deployment`` null); the etag is the one its
    heartbeat answers carry."""
    doc = await hub.deployments.doc_for(signed.machine)
    return doc.model_dump(mode="json")


@router.get("/v1/agent/modules/{name}/{version}/package", response_class=Response,
            **_signed(_PACKAGE_ANSWER | errors(403)))
async def agent_module_package(signed: Machine, hub: HubDep, name: str,
                               version: str) -> Response:
    """A package this machine's deployment names (E9156, 403, for any other)."""
    data, sha256 = await hub.deployments.package_for(signed.machine, name, version)
    return Response(data, media_type="application/gzip",
                    headers={"X-Outpost-Sha256": sha256, "Cache-Control": "no-store"})


@router.post("/v1/agent/modules/report", **SIGNED, status_code=204, response_class=Response)
async def agent_modules_report(hub: HubDep, sent: Annotated[
        tuple[Any, mp.ModulesReport], Depends(agent_body(mp.ModulesReport))]) -> Response:
    """The machine's modules as they are now (an older report than the one held is
    ignored)."""
    row, body = sent
    await hub.deployments.report(row, body)
    return Response(status_code=204)

