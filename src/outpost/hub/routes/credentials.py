"""Credentials an extension's manifest asks for (``credentials: ["backup"]``), issued to the
machine that signs the request and to no other.

``POST /v1/agent/credentials/backup`` rotates the signing machine's backup token (the old
one stops opening the repository at once) and answers it with where the repository is and
the CA that vouches for the hub. The agent asks before each handler or operation of such an
extension and hands the answer to the command on standard input only (docs/backup.md, "The
backup extension").
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from outpost.protocol.models import View

from .. import backupstore
from ..openapi import ok
from .agents import SIGNED
from .deps import HubDep, Machine

router = APIRouter()


class BackupCredential(View):
    token: str = Field(description="The machine's backup token (obk_...); it replaces the "
                       "one issued before.")
    url: str = Field(description="The machine's repository on the hub "
                     "(https://HUB/v1/backup/<machine id>/).")
    hub: str = Field(description="The hub's base URL, as the agent reached it.")
    machine_id: str
    ca_pem: str = Field(description="The hub's CA certificate (PEM), the only one to trust.")


def _hub_url(request: Request) -> str:
    return f"{request.url.scheme}://{request.url.netloc}"


@router.post("/v1/agent/credentials/backup", response_model=None,
             **{**SIGNED, "responses": SIGNED["responses"] | ok(BackupCredential)})
async def backup_credential(signed: Machine, hub: HubDep, request: Request) -> dict[str, Any]:
    """A new backup token for the signing machine (its own repository only)."""
    row = signed.machine
    issued = await backupstore.issue_token(hub.engine, row.account_id, row.id)
    base = _hub_url(request)
    return {"token": issued["token"], "url": f"{base}/v1/backup/{row.id}/", "hub": base,
            "machine_id": row.id, "ca_pem": hub.ca_pem}
