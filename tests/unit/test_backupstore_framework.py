"""Fast tier: the backup store's protocol in an app built without the edge's lean table
(``create_app(lean_routes=False)``, as bench/agent_requests.py builds one): the framework's
router serves the same handler, with the same answers."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.inproc import FAST, running_hub

pytestmark = FAST


@pytest.mark.parametrize("lean", [True, False])
async def test_the_protocol_answers_alike_with_and_without_the_lean_table(
        tmp_path: Path, anyio_backend: str, lean: bool) -> None:
    async with running_hub(tmp_path, lean_routes=lean) as hub:
        machine = await hub.machine("m1")
        issued = await hub.ok("POST", "/v1/machines/m1/backup-token", json={})
        base = f"/v1/backup/{machine.id}"
        headers = {"Authorization": f"Bearer {issued['token']}"}
        http = hub.http
        assert (await http.post(f"{base}/?create=true", headers=headers)).status_code == 200
        blob = os.urandom(2 * 1024 * 1024 + 1)
        name = hashlib.sha256(blob).hexdigest()
        assert (await http.post(f"{base}/data/{name}", content=blob,
                                headers=headers)).status_code == 200
        part = await http.get(f"{base}/data/{name}",
                              headers={**headers, "Range": "bytes=10-1500000"})
        assert part.status_code == 206 and part.content == blob[10:1500001]
        assert (await http.get(f"{base}/data/{name}", headers=headers)).content == blob
        head = await http.head(f"{base}/data/", headers=headers)
        assert head.status_code == 200
        assert (await http.get(f"{base}/data/", headers=headers)).json() == [name]
        refused = await http.get(f"{base}/data/", headers={"Authorization": "Bearer obk_x"})
        assert refused.status_code == 401 and refused.json()["code"] == "E9060"
        wrong = await http.get(f"{base}/data/{name[:-1]}g", headers=headers)
        assert wrong.status_code == 400 and wrong.json()["code"] == "E9062"
        missing = await http.get(f"{base}/keys/{'0' * 64}", headers=headers)
        assert missing.status_code == 404 and missing.json()["code"] == "E9065"
        assert (await http.delete(f"{base}/data/{name}", headers=headers)).status_code == 200
