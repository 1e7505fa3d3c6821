"""Bad input never gets a bare 500 or a traceback, over a live hub's HTTPS connection.

Text the databases cannot hold (NUL, lone surrogates) is refused with a catalog code and the
connection survives, on both databases; one hub a database serves the module, since no test
here leaves anything stored. The generated requests run against the hub's app in the fast
tier (tests/unit/test_api_bad_input.py).
"""

from __future__ import annotations

from typing import Any

from outpost.protocol.errors import CATALOG
from tests.support import Hub


def _assert_clean(response: Any) -> None:
    assert response.status_code < 500, (response.status_code, response.text)
    body = response.json()
    assert body["code"] in CATALOG, body
    assert body["message"] and body["fix"], body


def test_nul_characters_are_bad_input_not_a_crash(module_hub: Hub) -> None:
    """PostgreSQL cannot store NUL in text: the hub refuses it on both databases."""
    hub = module_hub
    with hub.client(hub.admin_token) as client:
        for path, body in (("/v1/runbooks", {"name": "n", "type": "sh", "content": "a\x00b"}),
                           ("/v1/accounts", {"name": "a\x00b"})):
            response = client.post(path, json=body)
            assert response.status_code == 422, response.text
            assert response.json()["code"] == "E3003"
            assert "NUL" in response.json()["message"]
        assert client.get("/v1/machines/a%00b").status_code == 422


def test_lone_surrogates_are_bad_input_not_a_crash(module_hub: Hub) -> None:
    """JSON can escape half of a UTF-16 pair ("\\ud800"); that is no Unicode text."""
    hub = module_hub
    with hub.client(hub.admin_token) as client:
        assert client.post("/v1/runbooks", json={"name": "p", "type": "sh", "content": "true",
                                                 "params": ["who"]}).status_code == 201
        for path, raw in (
                ("/v1/runbooks", b'{"name": "x", "type": "sh", "content": "a\\ud800b"}'),
                ("/v1/runbooks", b'{"name": "\\udfff", "type": "sh", "content": "a"}'),
                ("/v1/accounts", b'{"name": "\\ud800"}'),
                ("/v1/jobs", b'{"runbook": "p", "group": "web", "params": {"who": "\\ud800"}}'),
                ("/v1/assets/variables/v", b'{"value": "\\ud800"}')):
            method = "PUT" if path.startswith("/v1/assets") else "POST"
            response = client.request(method, path, content=raw,
                                      headers={"Content-Type": "application/json"})
            _assert_clean(response)
            assert response.status_code == 422, (path, response.text)
        assert client.get("/healthz").status_code == 200  # the connection survived
        assert client.get("/v1/jobs").json() == []  # nothing half-stored
