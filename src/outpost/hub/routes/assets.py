"""Assets: the operator's API, and the API a running job calls with its token."""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Any

from fastapi import APIRouter, Response
from pydantic import Field

from outpost.protocol import models as m
from outpost.protocol.errors import OutpostError
from outpost.protocol.models import Wire

from .. import assets
from ..openapi import ok
from .deps import HubDep, Job, Op

log = logging.getLogger("outpost.hub.assets")
router = APIRouter()


class VariableSet(Wire):
    value: str
    secret: bool = Field(default=False, description="Never shown by list or show.")
    description: str = Field(default="", max_length=1000)


class CredentialSet(Wire):
    username: str = Field(min_length=1)
    secret: str
    description: str = Field(default="", max_length=1000)


class CertificateImport(Wire):
    data: str = Field(description="The PEM or PFX (PKCS#12) file, base64.")
    password: str | None = Field(default=None, description="The PFX or private key password.")
    description: str = Field(default="", max_length=1000)


# --- operators --------------------------------------------------------------------------
@router.get("/v1/assets", tags=["assets"], response_model=None,
            responses=ok(list[m.AssetView]))
async def asset_list(principal: Op, hub: HubDep) -> list[dict[str, Any]]:
    """Every asset of the account: kind, name, thumbprint; never a value."""
    return await assets.listing(hub.engine, principal.account_id)


@router.put("/v1/assets/variables/{name}", tags=["assets"], response_model=None,
            responses=ok(m.AssetSaved))
async def variable_set(principal: Op, hub: HubDep, name: str,
                       body: VariableSet) -> dict[str, Any]:
    return await assets.set_variable(hub.engine, hub.vault, principal.account_id, name,
                                     body.value, secret=body.secret,
                                     description=body.description)


@router.put("/v1/assets/credentials/{name}", tags=["assets"], response_model=None,
            responses=ok(m.AssetSaved))
async def credential_set(principal: Op, hub: HubDep, name: str,
                         body: CredentialSet) -> dict[str, Any]:
    return await assets.set_credential(hub.engine, hub.vault, principal.account_id, name,
                                       body.username, body.secret,
                                       description=body.description)


@router.put("/v1/assets/certificates/{name}", tags=["assets"], response_model=None,
            responses=ok(m.AssetSaved))
async def certificate_import(principal: Op, hub: HubDep, name: str,
                             body: CertificateImport) -> dict[str, Any]:
    """Import a PEM or PFX file; the answer shows its SHA-1 thumbprint."""
    try:
        data = base64.b64decode(body.data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise OutpostError("invalid_request", "The certificate data is not valid base64.",
                           fix="Send the file's bytes base64-encoded in 'data'.") from exc
    return await assets.import_certificate(hub.engine, hub.vault, principal.account_id,
                                           name, data, body.password,
                                           description=body.description)


def _kind_routes(plural: str) -> None:
    kind = plural.removesuffix("s")

    async def show(principal: Op, hub: HubDep, name: str) -> dict[str, Any]:
        return await assets.show(hub.engine, principal.account_id, kind, name, vault=hub.vault)

    async def remove(principal: Op, hub: HubDep, name: str) -> dict[str, Any]:
        return await assets.remove(hub.engine, principal.account_id, kind, name)

    router.add_api_route(f"/v1/assets/{plural}/{{name}}", show, methods=["GET"],
                         tags=["assets"], response_model=None, responses=ok(m.AssetShown),
                         name=f"{kind}_show", summary=f"One {kind}'s metadata",
                         description="A plain variable's value and a credential's user "
                                     "name; never a secret.")
    router.add_api_route(f"/v1/assets/{plural}/{{name}}", remove, methods=["DELETE"],
                         tags=["assets"], name=f"{kind}_remove", summary=f"Remove a {kind}",
                         response_model=None, responses=ok(m.AssetRemoved))


for _plural in ("variables", "credentials", "certificates"):
    _kind_routes(_plural)


# Any spelling of the kind (variable, Variables): kept out of the schema, which lists
# each kind's own path with all its methods (an undeclared method answers 405 there).
@router.get("/v1/assets/{kind}/{name}", tags=["assets"], include_in_schema=False)
async def asset_show(principal: Op, hub: HubDep, kind: str, name: str) -> dict[str, Any]:
    """One asset's metadata; a plain variable's value and a credential's user name."""
    return await assets.show(hub.engine, principal.account_id, assets.kind_of(kind), name,
                             vault=hub.vault)


@router.delete("/v1/assets/{kind}/{name}", tags=["assets"], include_in_schema=False)
async def asset_remove(principal: Op, hub: HubDep, kind: str, name: str) -> dict[str, Any]:
    return await assets.remove(hub.engine, principal.account_id, assets.kind_of(kind), name)


# --- running jobs (bearer: the job token) -----------------------------------------------
@router.get("/v1/job/identity", tags=["job identity"], response_model=None,
            responses=ok(m.JobIdentityView))
async def job_whoami(ident: Job) -> dict[str, Any]:
    """The job the token speaks for."""
    return {"job_id": ident.job_id, "account_id": ident.account_id,
            "runbook": ident.runbook, "machine_id": ident.machine_id,
            "attempt": ident.attempt}


@router.get("/v1/job/assets/{kind}/{name}", tags=["job identity"], response_model=None,
            responses=ok(m.AssetValue))
async def job_asset(ident: Job, hub: HubDep, kind: str, name: str, response: Response
                    ) -> dict[str, Any]:
    """An asset of the job's account, with its value."""
    try:
        found = await assets.fetch(hub.engine, hub.vault, ident.account_id,
                                   assets.kind_of(kind), name)
    except OutpostError as exc:
        log.warning("job %s asked for %s '%s': %s", ident.job_id, kind, name, exc.message)
        raise
    response.headers["Cache-Control"] = "no-store"
    log.info("job %s read %s '%s'", ident.job_id, found["kind"], found["name"])
    return found
