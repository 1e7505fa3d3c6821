"""Fast tier: publishing extension packages (POST /v1/extensions) and reading them back."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import pytest

from outpost.protocol.extensions import PACKAGE_MAX_BYTES
from tests.extbuild import HANDLER, manifest, package
from tests.inproc import FAST, InprocHub

pytestmark = FAST
GZIP = {"Content-Type": "application/gzip"}


async def publish(hub: InprocHub, data: bytes, token: str | None = None) -> httpx.Response:
    return await hub.api("POST", "/v1/extensions", token=token, content=data, headers=GZIP)


async def test_a_package_is_published_once_per_version_and_listed(
        fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    data = package(manifest("hello", "1.0.0", min_agent_version="0.1.0",
                            operations={"snapshot": {"run": "bin/snapshot"}}))
    made = await publish(hub, data)
    assert made.status_code == 201, made.text
    info = made.json()
    assert (info["name"], info["version"], info["sha256"], info["size"]) == (
        "hello", "1.0.0", hashlib.sha256(data).hexdigest(), len(data))
    assert info["manifest"]["operations"]["snapshot"]["run"] == "bin/snapshot"
    again = await publish(hub, data)  # the same bytes again: nothing changes
    assert again.status_code == 200, again.text
    assert again.json()["published_at"] == info["published_at"]
    assert (await publish(hub, package(manifest("hello", "1.10.0")))).status_code == 201
    assert (await publish(hub, package(manifest("hello", "1.9.0")))).status_code == 201
    listed = await hub.ok("GET", "/v1/extensions")
    # The shipped backup and recovery extensions are published at the hub's start
    # (tests/*backup_ext*, tests/*recovery_ext*).
    assert [(e["name"], e["newest"], e["versions"]) for e in listed
            if e["name"] not in ("backup", "recovery")] == [
        ("hello", "1.10.0", ["1.0.0", "1.9.0", "1.10.0"])]
    shown = await hub.ok("GET", "/v1/extensions/hello")
    first = shown["versions"][0]
    assert (first["version"], first["sha256"], first["size"], first["min_agent_version"],
            first["operations"]) == ("1.0.0", info["sha256"], len(data), "0.1.0",
                                     ["snapshot"])
    assert shown["goals"] == []


def _handlers(run: str) -> dict[str, Any]:
    found = manifest()
    found["handlers"]["enable"] = {"run": run}
    return found


BAD: dict[str, tuple[bytes, str]] = {
    "not gzip": (b"PK\x03\x04 a zip file, say", "not a gzip-compressed tar archive"),
    "no manifest": (package(None, files={"bin/enable": (HANDLER, 0o755)}),
                    "outpost-extension.json is missing"),
    "manifest not json": (package(b"{name: hello", files={}), "is not JSON"),
    "a field wrong": (package(manifest(version="one")),
                      "outpost-extension.json: version: Value error, 'one' is not a version"),
    "a required handler missing": (
        package({**manifest(), "handlers": {"enable": {"run": "bin/enable"}}}),
        "outpost-extension.json: handlers"),
    "handler outside": (package(_handlers("../../etc/enable"), files={}),
                        "handlers.enable.run"),
    "handler missing": (package(manifest(), files={"bin/disable": (HANDLER, 0o755)}),
                        "handlers.install.run: 'bin/install' is not a file in the package"),
    "handler not executable": (
        package(manifest(), files={f"bin/{h}": (HANDLER, 0o755 if h != "enable" else 0o644)
                                   for h in ("install", "enable", "disable", "update",
                                             "uninstall")}),
        "handlers.enable.run: 'bin/enable' is not executable"),
    "a link member": (package(manifest(), links={"bin/evil": "/etc/passwd"}),
                      "the member 'bin/evil' is a link"),
    "a member outside": (package(manifest(), files={
        **{f"bin/{h}": (HANDLER, 0o755) for h in ("install", "enable", "disable", "update",
                                                   "uninstall")},
        "../outside": (b"x", 0o644)}), "the member '../outside' would unpack outside"),
    "a schema that is none": (package(manifest(settings_schema={"type": "nonsense"})),
                              "settings_schema: not a valid JSON Schema"),
}


@pytest.mark.parametrize("case", sorted(BAD))
async def test_a_bad_package_is_refused_naming_what_is_wrong(fast_hub: InprocHub,
                                                             case: str) -> None:
    data, named = BAD[case]
    refused = await publish(fast_hub, data)
    assert refused.status_code == 422, refused.text
    body = refused.json()
    assert body["code"] == "E9000", body
    assert named in body["message"], body["message"]
    assert [e["name"] for e in await fast_hub.ok("GET", "/v1/extensions")] == [
        "backup", "recovery"]


async def test_a_version_is_immutable(fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    first = package(manifest("hello", "1.0.0"))
    assert (await publish(hub, first)).status_code == 201
    other = package(manifest("hello", "1.0.0", description="changed"))
    refused = await publish(hub, other)
    assert refused.status_code == 409, refused.text
    assert refused.json()["code"] == "E9003"
    assert "1.0.0" in refused.json()["message"]
    shown = await hub.ok("GET", "/v1/extensions/hello")
    assert [v["sha256"] for v in shown["versions"]] == [hashlib.sha256(first).hexdigest()]


async def test_a_package_must_be_sent_as_bytes(fast_hub: InprocHub) -> None:
    refused = await fast_hub.api("POST", "/v1/extensions", json={"name": "hello"})
    assert refused.status_code == 422, refused.text
    assert refused.json()["code"] == "E3003"
    assert "application/gzip" in refused.json()["fix"]


async def test_a_package_over_the_limit_is_refused_before_it_is_read(
        fast_hub: InprocHub) -> None:
    refused = await publish(fast_hub, b"\0" * (PACKAGE_MAX_BYTES + 1))
    assert refused.status_code == 413, refused.text
    assert refused.json()["code"] == "E3011"
    assert str(PACKAGE_MAX_BYTES) in refused.json()["message"]


async def test_another_account_neither_sees_nor_collides(fast_hub: InprocHub) -> None:
    other = await fast_hub.ok("POST", "/v1/accounts", json={"name": "other"})
    data = package(manifest("hello", "1.0.0"))
    assert (await publish(fast_hub, data)).status_code == 201
    assert await fast_hub.ok("GET", "/v1/extensions", token=other["token"]) == []
    hidden = await fast_hub.api("GET", "/v1/extensions/hello", token=other["token"])
    assert hidden.status_code == 404 and hidden.json()["code"] == "E9004"
    # Its own 1.0.0 with other bytes is its own business.
    mine = await publish(fast_hub, package(manifest("hello", "1.0.0", description="x")),
                         token=other["token"])
    assert mine.status_code == 201, mine.text
