"""Fast tier: ``/openapi.json`` says who may call each operation (security schemes, not an
optional ``authorization`` header) and that every 4xx/5xx is the real error body. The schema
is the app's own, so it is read from the hub's app in this process; the answers of a live hub
are checked against it in tests/integration/test_openapi.py."""

from __future__ import annotations

from tests.inproc import FAST, InprocHub

pytestmark = FAST


async def test_security_schemes_replace_the_authorization_header(fast_hub: InprocHub) -> None:
    answer = await fast_hub.http.get("/openapi.json")  # no token: the schema is public
    assert answer.status_code == 200, answer.text
    spec = answer.json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["operatorToken"] == {**schemes["operatorToken"], "type": "http",
                                        "scheme": "bearer"}
    assert schemes["jobToken"]["type"] == "http" and schemes["jobToken"]["scheme"] == "bearer"
    for name in ("machineSignature", "accountSignature"):
        assert schemes[name]["type"] == "apiKey" and schemes[name]["in"] == "header"
        assert schemes[name]["name"] == "X-Outpost-Signature"
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            headers = [p["name"].lower() for p in operation.get("parameters", [])
                       if p["in"] == "header"]
            assert "authorization" not in headers, (method, path)
            security = operation.get("security")
            if path == "/v1/agent/register":
                assert security == [{"accountSignature": []}], (method, path)
            elif path == "/v1/agent/install.sh" or path.endswith(".whl"):
                assert not security, (method, path)  # public, like /v1/ca
            elif path.startswith("/v1/agent/"):
                assert security == [{"machineSignature": []}], (method, path)
            elif path.startswith("/v1/job/"):
                assert security == [{"jobToken": []}], (method, path)
            elif path.startswith("/v1/hooks/") or not path.startswith("/v1/") \
                    or path == "/v1/ca":
                assert not security, (method, path)  # public
            else:
                assert security == [{"operatorToken": []}], (method, path)
            # Every 4xx and 5xx is the real error body, in JSON, 500 included.
            statuses = operation["responses"]
            assert "500" in statuses and "401" in statuses, (method, path)
            for status, response in statuses.items():
                if status[0] in "45":
                    assert response["content"] == {"application/json": {"schema": {
                        "$ref": "#/components/schemas/ErrorBody"}}}, (method, path, status)
    error = spec["components"]["schemas"]["ErrorBody"]
    assert set(error["required"]) == {"code", "reason", "message", "fix", "details"}
