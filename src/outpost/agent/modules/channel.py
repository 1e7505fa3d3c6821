"""The supervisor's one seam to the hub: fetch the deployment, fetch a package, report.

``ModuleChannel`` is what the supervisor needs; ``HttpChannel`` is it over the agent's signed
HTTPS client (``GET /v1/agent/deployment``, ``GET /v1/agent/modules/NAME/VERSION/package``,
``POST /v1/agent/modules/report``). Unit tests give the supervisor a fake of this seam that
raises ``package_refused`` as this one does.
"""

from __future__ import annotations

from typing import Protocol
from urllib.parse import quote

from outpost.protocol.errors import HubRefused, OutpostError
from outpost.protocol.readers import ReadError
from outpost.protocol.modreaders import (
    DeploymentDoc,
    ModulesReport,
    UpstreamAck,
    UpstreamBatch,
    wire,
)

from ..transport import HubClient

PACKAGE_TIMEOUT = 120.0  # seconds for a package (up to 64 MiB) to arrive
SHA_HEADER = "x-outpost-sha256"


class ModuleChannel(Protocol):
    async def fetch_deployment(self) -> DeploymentDoc: ...

    async def fetch_package(self, name: str, version: str) -> tuple[bytes, str | None]:
        """The archive and the digest the hub says it has (None when it does not say)."""
        ...

    async def report(self, report: ModulesReport) -> None: ...

    async def send_messages(self, batch: UpstreamBatch) -> UpstreamAck: ...


def package_refused(module: str, name: str, version: str, status: int,
                    detail: str = "") -> OutpostError:
    """ED-6: a package download the hub refused, with the HTTP status, pointing at the
    package's name and version and at the account's right to it."""
    why = {403: "the machine's account may not read this package: check that it is "
                "published to this account and the credentials the deployment manifest "
                "gives for it",
           404: "no such package version is published: check the package name and "
                "version in the deployment manifest"}.get(status, "the hub refused it")
    said = f" ({detail})" if detail else ""
    return OutpostError(
        "module_package_refused",
        f"The package {name} {version}{f' of module {module}' if module else ''} could not "
        "be downloaded: the hub "
        f"returned {status}{said}; {why}.",
        module=module, name=name, version=version, status=status)


class HttpChannel:
    def __init__(self, client: HubClient) -> None:
        self.client = client

    async def fetch_deployment(self) -> DeploymentDoc:
        answer = await self.client.request("GET", "/v1/agent/deployment")
        try:
            return DeploymentDoc.read(answer)
        except ReadError as exc:  # the hub validated it: a hub of another version
            raise OutpostError("deployment_fetch_failed", "The agent could not fetch its "
                               f"deployment: the hub's answer does not fit this agent "
                               f"({exc}).", problem=str(exc)) from None

    async def fetch_package(self, name: str, version: str) -> tuple[bytes, str | None]:
        path = f"/v1/agent/modules/{quote(name, safe='')}/{quote(version, safe='')}/package"
        try:
            data, headers = await self.client.fetch_bytes(path, timeout=PACKAGE_TIMEOUT)
        except HubRefused as exc:
            if exc.status in (401, 403, 404):
                raise package_refused("", name, version, exc.status,
                                      exc.message[:200]) from None
            raise
        sha = {k.lower(): v for k, v in headers.items()}.get(SHA_HEADER)
        return data, sha  # checked against the manifest's digest before it is unpacked

    async def report(self, report: ModulesReport) -> None:
        await self.client.request("POST", "/v1/agent/modules/report",
                                  wire(report))

    async def send_messages(self, batch: UpstreamBatch) -> UpstreamAck:
        """``$upstream`` messages, in order (the message hub's uploader)."""
        answer = await self.client.request("POST", "/v1/agent/messages",
                                           wire(batch))
        # An answer that does not fit raises ReadError: the uploader tries again later.
        return UpstreamAck.read(answer)
