"""Fast tier: the shipped backup extension's package (deterministic, valid, published at the
hub's start) and the credentials route that hands a machine its own backup token."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

from outpost.extensions import backup
from outpost.protocol import extpackage
from outpost.protocol.errors import entry
from tests.inproc import FAST, InprocHub

pytestmark = FAST
GZIP = {"Content-Type": "application/gzip"}
ROUTE = "/v1/agent/credentials/backup"


def test_the_package_builds_deterministically_and_is_valid() -> None:
    first, second = backup.build(), backup.build()
    assert hashlib.sha256(first).digest() == hashlib.sha256(second).digest()
    package = extpackage.read(first)
    manifest = package.manifest
    assert (manifest.name, manifest.version) == ("backup", backup.version())
    assert manifest.credentials == ["backup"]
    assert set(manifest.handlers) == {"install", "enable", "disable", "update", "uninstall"}
    assert set(manifest.operations) == {"snapshot", "restore", "forget"}
    assert package.executables == {"bin/backup"}
    # Sorted members, fixed times and owners, no name or time in the gzip header.
    with tarfile.open(fileobj=io.BytesIO(first), mode="r:gz") as archive:
        members = archive.getmembers()
    assert [m.name for m in members] == ["bin", "bin/backup", "outpost-extension.json"]
    assert {(m.mtime, m.uid, m.gid, m.uname) for m in members} == {(backup.MTIME, 0, 0, "")}
    assert first[4:8] == b"\0\0\0\0"
    wrapper = package_file(first, "bin/backup").decode()
    assert wrapper.startswith("#!/bin/sh\n")
    assert 'exec "$OUTPOST_AGENT_PYTHON" -m outpost.extensions.backup.main' in wrapper


def package_file(data: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        handle = archive.extractfile(name)
        assert handle is not None
        return handle.read()


async def test_the_hub_publishes_it_at_its_start(fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    data = backup.build()
    shown = await hub.ok("GET", "/v1/extensions/backup")
    [version] = shown["versions"]
    assert (version["version"], version["sha256"], version["size"]) == (
        backup.version(), hashlib.sha256(data).hexdigest(), len(data))
    # Publishing the same bytes again (what a restarted hub does) changes nothing: 200.
    again = await hub.api("POST", "/v1/extensions", content=data, headers=GZIP)
    assert again.status_code == 200, again.text
    assert again.json()["published_at"] == version["published_at"]
    # The manifest's schemas take the settings 'outpost backup enable' sets.
    machine = await hub.machine("m1")
    answer = await hub.api("PUT", f"/v1/extensions/backup/targets/machine/{machine.name}",
                           json={"settings": {"paths": ["/srv"], "exclude": ["*.tmp"]},
                                 "protected_settings": {"repository_password": "x" * 32},
                                 "run_as": "root"})
    assert answer.status_code == 200, answer.text
    refused = await hub.api("PUT", f"/v1/extensions/backup/targets/machine/{machine.name}",
                            json={"settings": {"exclude": ["*.tmp"]}})
    assert refused.status_code == 422 and "paths" in refused.text, refused.text


async def test_a_machine_gets_only_its_own_backup_token(fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    m1, m2 = await hub.machine("m1"), await hub.machine("m2")
    first = await m1.ok("POST", ROUTE, {})
    assert first["token"].startswith("obk_") and first["machine_id"] == m1.id
    assert first["url"] == f"{first['hub']}/v1/backup/{m1.id}/"
    assert first["ca_pem"] == hub.hub.ca_pem and "BEGIN CERTIFICATE" in first["ca_pem"]

    async def opens(machine_id: str, token: str) -> int:
        answer = await hub.http.request("HEAD", f"/v1/backup/{machine_id}/config",
                                        headers={"Authorization": f"Bearer {token}"})
        return answer.status_code

    assert await opens(m1.id, first["token"]) == 404  # opened; no repository yet
    assert await opens(m2.id, first["token"]) == 403  # another machine's: refused
    # Asking again rotates: the first token stops working at once.
    second = await m1.ok("POST", ROUTE, {})
    assert second["token"] != first["token"]
    assert await opens(m1.id, first["token"]) == 401
    assert await opens(m1.id, second["token"]) == 404
    # m2's own token opens m2's repository only; m1's still works.
    theirs = await m2.ok("POST", ROUTE, {})
    assert theirs["machine_id"] == m2.id
    assert await opens(m2.id, theirs["token"]) == 404
    assert await opens(m1.id, theirs["token"]) == 403
    assert await opens(m1.id, second["token"]) == 404
    # Unsigned, or signed by nobody the hub knows: refused before anything is issued.
    unsigned = await hub.http.post(ROUTE, json={})
    assert unsigned.status_code == 401, unsigned.text
    operator = await hub.api("POST", ROUTE, json={})
    assert operator.status_code == 401, operator.text


async def test_another_accounts_machine_is_refused(fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    mine = await hub.machine("m1")
    account = await hub.ok("POST", "/v1/accounts", json={"name": "tenant-b"})
    theirs = await hub.machine("b1", account=account)
    issued = await theirs.ok("POST", ROUTE, {})
    assert issued["machine_id"] == theirs.id
    # Their token on my machine's repository: 403; my repository stays closed to them.
    refused = await hub.http.request("GET", f"/v1/backup/{mine.id}/keys/",
                                     headers={"Authorization": f"Bearer {issued['token']}"})
    assert refused.status_code == 403 and refused.json()["code"] == "E9061"
    # Their operator cannot issue my machine's token either.
    foreign = await hub.api("POST", "/v1/machines/m1/backup-token", token=account["token"],
                            json={})
    assert foreign.status_code == 404


def test_the_codes_are_in_the_catalog() -> None:
    for code in ("E9100", "E9101", "E9102", "E9103", "E9104"):
        assert entry(code).code == code
    assert "restic" in entry("backup_restic_missing").fixes[0]
    assert json.loads(json.dumps(entry("E9104").scenario)) == "EX-11"
