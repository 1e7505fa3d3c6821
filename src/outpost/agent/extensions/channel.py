"""The reconciler's one seam to the hub: fetch the goals, fetch a package, report states.

``HubChannel`` is what the reconciler needs; ``HttpChannel`` is it over the agent's signed
HTTPS client (``GET /v1/agent/extensions``, ``GET /v1/agent/extensions/NAME/VERSION/package``,
``POST /v1/agent/extensions/status``, ``POST /v1/agent/credentials/KIND``). Unit tests
give the reconciler a fake of this seam. The goals are read, and the reports written, without
pydantic (protocol/extreaders.py).
"""

from __future__ import annotations

from typing import Any, Protocol
from urllib.parse import quote

from outpost.protocol.extreaders import ExtensionGoals, ExtensionStatusReport, wire

from ..transport import HubClient

PACKAGE_TIMEOUT = 120.0  # seconds for a package (up to 64 MiB) to arrive


class HubChannel(Protocol):
    async def fetch_goals(self) -> ExtensionGoals: ...

    async def fetch_package(self, name: str, version: str) -> bytes: ...

    async def report(self, report: ExtensionStatusReport) -> None: ...

    async def fetch_credentials(self, kind: str) -> dict[str, Any]: ...


class HttpChannel:
    def __init__(self, client: HubClient) -> None:
        self.client = client

    async def fetch_goals(self) -> ExtensionGoals:
        answer = await self.client.request("GET", "/v1/agent/extensions")
        return ExtensionGoals.read(answer)  # ReadError naming the field: a hub of another kind

    async def fetch_package(self, name: str, version: str) -> bytes:
        path = f"/v1/agent/extensions/{quote(name, safe='')}/{quote(version, safe='')}/package"
        data, _headers = await self.client.fetch_bytes(path, timeout=PACKAGE_TIMEOUT)
        return data  # checked against the goal's digest before anything is unpacked

    async def report(self, report: ExtensionStatusReport) -> None:
        await self.client.request("POST", "/v1/agent/extensions/status",
                                  wire(report))

    async def fetch_credentials(self, kind: str) -> dict[str, Any]:
        """This machine's credentials of ``kind`` (a manifest's ``credentials``), issued
        afresh; kept in memory only."""
        answer = await self.client.request("POST", f"/v1/agent/credentials/{quote(kind, safe='')}",
                                           {})
        if not isinstance(answer, dict):
            raise ValueError(f"the hub answered the {kind} credentials with {type(answer)}")
        return answer
