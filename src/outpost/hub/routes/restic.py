"""The backup store's API: restic's REST backend protocol under ``/v1/backup/{machine_id}/``
(each machine's repository, opened by its backup token), and the operator's route that
issues that token.

The protocol's routes stay out of ``/openapi.json``: they carry restic's binary files and
answer as restic expects (docs/backup.md), not the JSON API the schema describes. Their
refusals are still the hub's error bodies with catalog codes (E9060-E9069); restic itself
looks only at the status.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import Field
from starlette.requests import ClientDisconnect

from outpost.protocol.models import View, Wire

from .. import backupstore
from ..backupstore import Credential, Repository
from ..openapi import ok
from .deps import HubDep, Op, errors

router = APIRouter()

PREFIX = "/v1/backup/{machine_id}"
V1 = "application/vnd.x.restic.rest.v1"
V2 = "application/vnd.x.restic.rest.v2"
BINARY = "application/octet-stream"


class BackupTokenRequest(Wire):
    quota_bytes: int | None = Field(default=None, ge=0, description=(
        "The bytes this machine's repository may hold (0: unlimited); left out, the hub's "
        "backup_quota_bytes applies."))


class BackupTokenIssued(View):
    machine: str
    machine_id: str
    token: str = Field(description="The backup token (obk_...); shown this once (the hub "
                       "keeps only its SHA-256). It replaces the machine's previous one.")
    repository: str = Field(description="The repository's path on the hub, for restic's "
                            "REST protocol (through outpost-restic-bridge).")
    quota_bytes: int | None
    created_at: float


@router.post("/v1/machines/{name}/backup-token", tags=["backup"], status_code=201,
             response_model=None, responses=ok(BackupTokenIssued, 201))
async def backup_token(principal: Op, hub: HubDep, name: str,
                       body: BackupTokenRequest | None = None) -> dict[str, Any]:
    """Issue (or rotate) the backup token of one machine of the caller's account: it opens
    that machine's restic repository on the hub and nothing else."""
    quota = body.quota_bytes if body is not None else None
    return await backupstore.issue_token(hub.engine, principal.account_id, name, quota)


# --- restic's REST protocol ---------------------------------------------------------------
async def _opened(request: Request, hub: HubDep, machine_id: str
                  ) -> tuple[Repository, Credential]:
    credential = await backupstore.authorize(
        hub.engine, request.headers.get("authorization"), machine_id)
    return hub.backups.repository(credential), credential


def _quota(hub: HubDep, credential: Credential) -> int:
    if credential.quota_bytes is not None:
        return credential.quota_bytes
    return hub.config.backup_quota_bytes


_PROTOCOL: dict[str, Any] = {"include_in_schema": False, "responses": errors(400, 401, 403)}


@router.post(PREFIX + "/", **_PROTOCOL)
async def repository_create(request: Request, hub: HubDep, machine_id: str,
                            create: bool = False) -> Response:
    """``POST {path}?create=true``: the repository's directories (kept when they exist)."""
    repository, credential = await _opened(request, hub, machine_id)
    credential.check_write("POST", "")
    if not create:
        raise backupstore.invalid_path(f"/v1/backup/{machine_id}/ without ?create=true")
    repository.create()
    return Response(status_code=200)


@router.get(PREFIX + "/{kind}/", **_PROTOCOL)
async def file_list(request: Request, hub: HubDep, machine_id: str, kind: str) -> Response:
    """The files of one type: names (protocol v1) or names and sizes (v2)."""
    repository, _ = await _opened(request, hub, machine_id)
    backupstore.check_type(kind)
    found = await asyncio.to_thread(repository.listing, kind)  # a data/ listing reads 256 dirs
    if V2 in request.headers.get("accept", ""):
        return Response(json.dumps(found), media_type=V2)
    return Response(json.dumps([f["name"] for f in found]), media_type=V1)


@router.api_route(PREFIX + "/config", methods=["HEAD", "GET", "POST", "DELETE"], **_PROTOCOL)
async def config_file(request: Request, hub: HubDep, machine_id: str) -> Response:
    return await _file(request, hub, machine_id, "config", "")


@router.api_route(PREFIX + "/{kind}/{name}", methods=["HEAD", "GET", "POST", "DELETE"],
                  **_PROTOCOL)
async def repository_file(request: Request, hub: HubDep, machine_id: str, kind: str,
                          name: str) -> Response:
    return await _file(request, hub, machine_id, kind, name)


async def _file(request: Request, hub: HubDep, machine_id: str, kind: str,
                name: str) -> Response:
    repository, credential = await _opened(request, hub, machine_id)
    if kind != "config":
        backupstore.check_name(kind, name)
    method = request.method
    credential.check_write(method, kind)
    if method == "POST":
        declared_text = request.headers.get("content-length", "")
        declared = int(declared_text) if declared_text.isdigit() else None
        try:
            await repository.save(kind, name, request.stream(), declared,
                                  _quota(hub, credential))
        except ClientDisconnect:
            return Response(status_code=400)  # nobody left to answer; nothing was kept
        return Response(status_code=200)
    if method == "DELETE":
        repository.delete(kind, name)
        return Response(status_code=200)
    if method == "HEAD":
        return Response(status_code=200, media_type=BINARY,
                        headers={"Content-Length": str(repository.size(kind, name))})
    reading = await repository.read(kind, name, request.headers.get("range", ""))
    headers = {"Content-Length": str(reading.length), "Accept-Ranges": "bytes"}
    if reading.ranged:
        end = reading.start + reading.length - 1
        headers["Content-Range"] = f"bytes {reading.start}-{end}/{reading.size}"
    status = 206 if reading.ranged else 200
    if reading.fh is None:
        return Response(reading.data or b"", status_code=status, media_type=BINARY,
                        headers=headers)
    body: AsyncIterator[bytes] = repository.pieces(reading.fh, reading.start, reading.length)
    return StreamingResponse(body, status_code=status, media_type=BINARY, headers=headers)
