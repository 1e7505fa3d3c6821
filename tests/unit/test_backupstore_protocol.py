"""Fast tier: restic's REST protocol as the backup store answers it (hub/routes/restic.py),
the hub in this process, on SQLite and PostgreSQL where the backup tokens matter. The real
restic through the real bridge: tests/integration/test_backup_store.py."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
from typing import Any

import pytest
from sqlalchemy import text

from tests.inproc import FAST, InprocHub

pytestmark = FAST

V2 = "application/vnd.x.restic.rest.v2"


class Repo:
    def __init__(self, hub: InprocHub, machine_id: str, token: str) -> None:
        self.hub = hub
        self.base = f"/v1/backup/{machine_id}"
        self.headers = {"Authorization": f"Bearer {token}"}

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        headers = {**self.headers, **kw.pop("headers", {})}
        return await self.hub.http.request(method, self.base + path, headers=headers, **kw)


async def _repo(hub: InprocHub, name: str = "m1", **body: Any) -> Repo:
    machine = await hub.machine(name)
    issued = await hub.ok("POST", f"/v1/machines/{name}/backup-token", json=body)
    assert issued["machine_id"] == machine.id
    assert issued["repository"] == f"/v1/backup/{machine.id}/"
    return Repo(hub, machine.id, issued["token"])


async def test_files_round_trip_with_ranges_and_listings(fast_hub_any: InprocHub) -> None:
    repo = await _repo(fast_hub_any)
    assert (await repo.call("POST", "/?create=true")).status_code == 200
    assert (await repo.call("HEAD", "/config")).status_code == 404
    assert (await repo.call("POST", "/config", content=b"config-bytes")).status_code == 200
    again = await repo.call("POST", "/config", content=b"other")
    assert again.status_code == 409 and again.json()["code"] == "E9066"
    assert (await repo.call("GET", "/config")).content == b"config-bytes"

    blob = os.urandom(3 * 1024 * 1024 + 17)
    name = hashlib.sha256(blob).hexdigest()
    assert (await repo.call("POST", f"/data/{name}", content=blob)).status_code == 200
    # The same name again carries the same bytes (its hash): answered as done.
    assert (await repo.call("POST", f"/data/{name}", content=blob)).status_code == 200
    head = await repo.call("HEAD", f"/data/{name}")
    assert head.status_code == 200 and head.headers["content-length"] == str(len(blob))
    part = await repo.call("GET", f"/data/{name}", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == blob[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(blob)}"
    tail = await repo.call("GET", f"/data/{name}", headers={"Range": "bytes=3145000-"})
    assert tail.content == blob[3145000:]
    past = await repo.call("GET", f"/data/{name}", headers={"Range": f"bytes={len(blob)}-"})
    assert past.status_code == 416 and past.json()["code"] == "E9067"
    assert (await repo.call("GET", f"/data/{name}")).content == blob

    v2 = await repo.call("GET", "/data/", headers={"Accept": V2})
    assert v2.headers["content-type"] == V2
    assert v2.json() == [{"name": name, "size": len(blob)}]
    assert (await repo.call("GET", "/data/")).json() == [name]
    assert (await repo.call("GET", "/keys/", headers={"Accept": V2})).json() == []

    assert (await repo.call("DELETE", f"/data/{name}")).status_code == 200
    gone = await repo.call("GET", f"/data/{name}")
    assert gone.status_code == 404 and gone.json()["code"] == "E9065"

async def test_content_must_match_its_name(fast_hub_any: InprocHub) -> None:
    repo = await _repo(fast_hub_any)
    await repo.call("POST", "/?create=true")
    wrong = await repo.call("POST", "/data/" + "ab" * 32, content=b"not that")
    assert wrong.status_code == 400 and wrong.json()["code"] == "E9063"
    assert hashlib.sha256(b"not that").hexdigest() in wrong.json()["message"]
    assert (await repo.call("GET", "/data/", headers={"Accept": V2})).json() == []
    root = fast_hub_any.hub.paths.root / "backup"
    assert [p.name for p in root.rglob("*") if p.is_file()] == []  # no temporary left

@pytest.mark.parametrize("path", ["/unknown/" + "a" * 64, "/data/" + "A" * 64,
                                  "/data/abc", "/keys/..%2f..%2fconfig", "/data/x/y",
                                  "/snapshots/" + "a" * 63 + "g"])
async def test_paths_outside_the_layout_are_refused(fast_hub: InprocHub, path: str) -> None:
    repo = await _repo(fast_hub)
    answer = await repo.call("GET", path)
    assert answer.status_code in (400, 404, 405), answer.text
    assert answer.json()["code"] in ("E9062", "E3002", "E3012")
    assert not (fast_hub.hub.paths.root / "config").exists()

async def test_tokens_open_their_own_machine_only(fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    mine = await _repo(hub, "m1")
    other = await _repo(hub, "m2")
    await mine.call("POST", "/?create=true")
    # m2's token on m1's repository.
    crossed = Repo(hub, mine.base.rsplit("/", 1)[1], other.headers["Authorization"][7:])
    refused = await crossed.call("GET", "/keys/")
    assert refused.status_code == 403 and refused.json()["code"] == "E9061"
    body = await crossed.call("POST", "/data/" + "a" * 64, content=b"x" * 1000)
    assert body.status_code == 403
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer obk_unknown"},
                    {"Authorization": f"Bearer {hub.admin_token}"}):
        answer = await hub.http.get(mine.base + "/keys/", headers=headers)
        assert answer.status_code == 401 and answer.json()["code"] == "E9060"
    # Another account's operator cannot issue a token for this account's machine.
    account = await hub.ok("POST", "/v1/accounts", json={"name": "other"})
    foreign = await hub.api("POST", "/v1/machines/m1/backup-token", token=account["token"],
                            json={})
    assert foreign.status_code == 404
    # The hub keeps the token's hash only.
    async with hub.hub.engine.connect() as conn:
        stored = [row[0] for row in await conn.execute(
            text("SELECT token_hash FROM backup_credentials"))]
    token = mine.headers["Authorization"][7:]
    assert hashlib.sha256(token.encode()).hexdigest() in stored
    assert all(token not in value for value in stored)

async def test_the_quota_bounds_the_repository(fast_hub: InprocHub) -> None:
    repo = await _repo(fast_hub, quota_bytes=2_000_000)
    await repo.call("POST", "/?create=true")
    first = os.urandom(1_500_000)
    name = hashlib.sha256(first).hexdigest()
    assert (await repo.call("POST", f"/data/{name}", content=first)).status_code == 200
    second = os.urandom(600_000)
    over = await repo.call("POST", f"/data/{hashlib.sha256(second).hexdigest()}",
                           content=second)
    assert over.status_code == 413 and over.json()["code"] == "E9064"
    assert "2000000" in over.json()["message"]
    # Deleting frees the room.
    assert (await repo.call("DELETE", f"/data/{name}")).status_code == 200
    fits = await repo.call("POST", f"/data/{hashlib.sha256(second).hexdigest()}",
                           content=second)
    assert fits.status_code == 200


async def test_another_accounts_repository_is_refused(fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    mine = await _repo(hub, "m1")
    # A second account with a machine of its own, registered with that account's key.
    account = await hub.ok("POST", "/v1/accounts", json={"name": "tenant-b"})
    original = hub.init
    hub.init = dataclasses.replace(original, account_id=account["id"],
                                   primary_key=account["primary_key"])
    try:
        theirs = await hub.machine("b1")
    finally:
        hub.init = original
    issued = await hub.api("POST", "/v1/machines/b1/backup-token", token=account["token"],
                           json={})
    assert issued.status_code == 201, issued.text
    # Account B's token on account A's repository, and A's token on B's: 403 both ways.
    for machine_id, token in ((mine.base.rsplit("/", 1)[1], issued.json()["token"]),
                              (theirs.id, mine.headers["Authorization"][7:])):
        refused = await Repo(hub, machine_id, token).call("POST", "/?create=true")
        assert refused.status_code == 403 and refused.json()["code"] == "E9061"
    # B's repository is its own directory under B's account.
    assert (await Repo(hub, theirs.id, issued.json()["token"]).call(
        "POST", "/?create=true")).status_code == 200
    assert (hub.hub.paths.root / "backup" / account["id"] / theirs.id / "keys").is_dir()


def _basic(user: str, password: str) -> dict[str, str]:
    pair = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {pair}"}


async def test_http_basic_carries_the_token_with_the_machine_id(fast_hub_any: InprocHub
                                                               ) -> None:
    """restic's own REST backend sends RESTIC_REST_USERNAME and RESTIC_REST_PASSWORD as HTTP
    Basic: the user name must be the path's machine id, the password the token; the same
    checks and codes as a Bearer token."""
    hub = fast_hub_any
    mine, other = await _repo(hub, "m1"), await _repo(hub, "m2")
    mine_id, other_id = mine.base.rsplit("/", 1)[1], other.base.rsplit("/", 1)[1]
    token, other_token = mine.headers["Authorization"][7:], other.headers["Authorization"][7:]
    basic = Repo(hub, mine_id, token)
    basic.headers = _basic(mine_id, token)
    assert (await basic.call("POST", "/?create=true")).status_code == 200
    blob = os.urandom(70_000)
    name = hashlib.sha256(blob).hexdigest()
    assert (await basic.call("POST", f"/data/{name}", content=blob)).status_code == 200
    assert (await mine.call("GET", f"/data/{name}")).content == blob  # the same repository
    assert (await basic.call("GET", "/data/")).json() == [name]

    def refused(answer: Any, status: int, code: str) -> str:
        assert answer.status_code == status and answer.json()["code"] == code, answer.text
        message: str = answer.json()["message"]
        assert "obk_" not in answer.text
        return message

    # Another machine's id as user name, with this machine's own token: 403, saying so.
    message = refused(await hub.http.get(mine.base + "/keys/", headers=_basic(other_id, token)),
                      403, "E9061")
    assert f"the user name '{other_id}' is not the machine id {mine_id}" in message
    # The user name of the path, with another machine's token: 403 as for Bearer.
    refused(await hub.http.get(mine.base + "/keys/", headers=_basic(mine_id, other_token)),
            403, "E9061")
    # A wrong or missing token, an operator's token, a header that is not Basic's form: 401.
    for headers in (_basic(mine_id, "obk_" + "x" * 43), _basic(mine_id, ""),
                    _basic(mine_id, hub.admin_token), {"Authorization": "Basic !!notbase64"},
                    {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()},
                    {"Authorization": "Digest abc"}):
        refused(await hub.http.get(mine.base + "/keys/", headers=headers), 401, "E9060")
    # Writes with a wrong credential keep nothing.
    written = await hub.http.post(mine.base + "/data/" + "c" * 64, content=b"x" * 1000,
                                  headers=_basic(other_id, other_token))
    refused(written, 403, "E9061")
    assert (await mine.call("GET", "/data/")).json() == [name]
