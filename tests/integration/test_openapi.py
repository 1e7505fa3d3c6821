"""``/openapi.json`` describes the API as it is: what each operator route answers (checked
against real answers of a live hub, no field missing and none undeclared), and the real error
body on every 4xx/5xx. Who may call each operation (the security schemes) is read from the
hub's app in the fast tier: tests/unit/test_api_openapi.py."""

from __future__ import annotations

import base64
import datetime
import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from outpost.hub import db
from tests.deploybuild import manifest_yaml, module_package
from tests.extbuild import manifest, package
from tests.support import Agent, Hub, healthy_agent, publish_script, register, wait_until

OPERATOR_SCHEMES = ({"operatorToken": []}, {"jobToken": []})


def _strict(node: Any) -> Any:
    """The schema with every object closed: an answer's field the model does not declare
    fails validation (the models themselves stay open for clients)."""
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if node.get("type") == "object" and "properties" in node:
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


class Checker:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        with hub.client() as client:
            self.spec = client.get("/openapi.json").json()
        self.components = _strict(self.spec["components"])
        self.seen: set[tuple[str, str]] = set()

    def operation(self, method: str, template: str) -> dict[str, Any]:
        found: dict[str, Any] = self.spec["paths"][template][method.lower()]
        return found

    def schema(self, method: str, template: str, status: int) -> dict[str, Any]:
        responses = self.operation(method, template)["responses"]
        assert str(status) in responses, (method, template, status, sorted(responses))
        content = responses[str(status)]["content"]["application/json"]["schema"]
        return {**_strict(content), "components": self.components}

    def check(self, response: httpx.Response, method: str, template: str) -> Any:
        body = response.json()
        errors = [e.message for e in jsonschema_rs.validator_for(
            self.schema(method, template, response.status_code)).iter_errors(body)]
        assert not errors, (method, template, response.status_code, errors, body)
        self.seen.add((method.lower(), template))
        return body

    def call(self, method: str, template: str, path: str | None = None, *, token: str | None = None,
             status: int = 200, **kw: Any) -> Any:
        response = self.hub.api(method, path or template, token, **kw)
        assert response.status_code == status, (method, path, response.status_code,
                                                response.text)
        return self.check(response, method, template)


def _certificate_b64() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api.example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    return base64.b64encode(pem).decode()


RECOVERY_OPS = {name: {"run": "bin/install"} for name in ("point", "recover", "prune")}


def _catalog_row(hub: Hub, machine_id: str, op_id: str, kind: str = "backup") -> None:
    """A snapshot in the backup catalog as a backup snapshot operation's end writes it (the
    backup extension end to end is tests/integration/test_backup_cli.py)."""
    url = hub.database_url.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            account = conn.execute(sa.select(db.machines.c.account_id).where(
                db.machines.c.id == machine_id)).scalar()
            conn.execute(db.backup_snapshots.insert().values(
                id=f"catalog-row-{kind}", account_id=account, machine_id=machine_id,
                short_id="0123abcd" if kind == "backup" else "4567abcd",
                snapshot_id=("0123abcd" if kind == "backup" else "4567abcd") + "e" * 56,
                op_id=op_id, kind=kind,
                paths=["/srv"], files=3, bytes_added=3_000_000_000, total_bytes=5_000_000_000,
                duration_seconds=1.5, consistency="crash", waited_seconds=2.25,
                wait_reason="waiting: CPU at 97% has been above the 90% threshold for 2 s",
                taken_at=1.5e9, created_at=1.5e9, forgotten_at=None, forgotten_by=None))
    finally:
        engine.dispose()


def test_real_answers_match_the_declared_models(
        hub: Hub, agents: list[Agent], tmp_path: Path, shared: Path) -> None:
    # (on SQLite and on PostgreSQL: each database's types must give the declared ones)
    api = Checker(hub)
    publish_script(hub, tmp_path, "hello", "echo hello\necho oops >&2\n")
    publish_script(hub, tmp_path, "hold", f'cp "$OUTPOST_HELPER_DIR/job.token" {shared}/t\n'
                   "sleep 30\n")
    publish_script(hub, tmp_path, "hook", 'echo "$body"\n', "--param", "body")
    healthy_agent(hub, tmp_path, agents)
    assert register(hub, tmp_path / "idle", "idle").returncode == 0

    # Errors: the real body, validated as declared (closed: nothing more, nothing less).
    api.check(hub.api("GET", "/v1/jobs/no-such-job"), "GET", "/v1/jobs/{job_id}")
    with hub.client() as anonymous:
        refused = anonymous.get("/v1/whoami")
    assert refused.status_code == 401
    api.check(refused, "GET", "/v1/whoami")
    api.seen.clear()

    api.call("GET", "/healthz")
    api.call("GET", "/v1/whoami")
    made = api.call("POST", "/v1/accounts", json={"name": "second"}, status=201)
    api.call("GET", "/v1/accounts")
    keys = "/v1/accounts/{account_id}/keys"
    api.call("GET", keys, keys.format(account_id=made["id"]))
    api.call("POST", keys + "/{which}/regenerate",
             keys.format(account_id=made["id"]) + "/primary/regenerate")

    api.call("POST", "/v1/tokens", status=201, json={"name": "ci"})
    api.call("GET", "/v1/tokens")
    api.call("DELETE", "/v1/tokens/{id_or_name}", "/v1/tokens/ci")

    api.call("GET", "/v1/machines")
    api.call("GET", "/v1/heartbeats")
    api.call("GET", "/v1/machines/{name}", "/v1/machines/w1")
    api.call("POST", "/v1/machines/{name}/ping", "/v1/machines/w1/ping")
    api.call("GET", "/v1/messages", params={"machine": "w1"})
    api.call("POST", "/v1/machines/{name}/modules/{module}/methods/{method}",  # no agent: 504
             "/v1/machines/idle/modules/sensor/methods/reset", status=504,
             json={"timeout_seconds": 0.2})
    api.call("POST", "/v1/machines/{name}/backup-token", "/v1/machines/idle/backup-token",
             status=201, json={"quota_bytes": 1 << 30})
    api.call("DELETE", "/v1/machines/{name}", "/v1/machines/idle")

    api.call("POST", "/v1/runbooks", status=201, json={
        "name": "api-made", "content": "#!/bin/bash\necho $who\n", "filename": "a.sh",
        "params": ["who:string=World"], "description": "made through the API"})
    again = api.call("POST", "/v1/runbooks", json={
        "name": "api-made", "content": "#!/bin/bash\necho $who\n", "filename": "a.sh",
        "params": ["who:string=World"], "description": "made through the API"})
    assert again["unchanged"] is True  # 200: the same as the latest version
    api.call("GET", "/v1/runbooks")
    api.call("GET", "/v1/runbooks/{name}", "/v1/runbooks/api-made")
    api.call("POST", "/v1/runbooks", status=201, json={
        "name": "gone", "content": "#!/bin/bash\ntrue\n", "filename": "g.sh"})
    removed = api.call("DELETE", "/v1/runbooks/{name}", "/v1/runbooks/gone")
    assert removed["removed"] is True and removed["versions"] == 1

    job = api.call("POST", "/v1/jobs", status=201, json={"runbook": "hello", "group": "web"})
    api.call("POST", "/v1/jobs/batch", status=201, json={"jobs": [
        {"runbook": "api-made", "group": "web", "params": {"who": "you"}}]})
    wait_until(lambda: hub.api("GET", f"/v1/jobs/{job['id']}").json()["status"] == "Completed",
               30, 0.1, "the job to complete")
    api.call("GET", "/v1/jobs")
    api.call("GET", "/v1/jobs/{job_id}", f"/v1/jobs/{job['id']}")
    output = api.call("GET", "/v1/jobs/{job_id}/output", f"/v1/jobs/{job['id']}/output")
    assert {r["text"] for r in output} >= {"hello", "oops"}
    parent = api.call("POST", "/v1/fanouts", status=201, json={
        "runbook": "hello", "group": "web", "max_concurrency": "50%", "max_errors": 0})
    assert parent["fanout"]["breakdown"] and parent["warnings"] == []
    wait_until(lambda: hub.api("GET", f"/v1/jobs/{parent['id']}").json()["status"] ==
               "Completed", 30, 0.1, "the job on every machine to complete")
    ended = api.call("GET", "/v1/jobs/{job_id}", f"/v1/jobs/{parent['id']}")
    assert ended["fanout"]["counts"] == {"Completed": 1}
    child = api.call("GET", "/v1/jobs/{job_id}",
                     f"/v1/jobs/{ended['fanout']['breakdown'][0]['job_id']}")
    assert child["parent_id"] == parent["id"]
    waiting = api.call("POST", "/v1/jobs", status=201,
                       json={"runbook": "hello", "group": "nomachines"})
    shown = api.call("GET", "/v1/jobs/{job_id}", f"/v1/jobs/{waiting['id']}")
    assert shown["waiting_for"]  # declared, present when it may wait long
    for action in ("suspend", "resume", "stop"):
        api.call("POST", f"/v1/jobs/{{job_id}}/{action}", f"/v1/jobs/{waiting['id']}/{action}")

    api.call("GET", "/v1/groups")
    api.call("PUT", "/v1/groups/{name}", "/v1/groups/web", json={"memory_mb": 256})

    api.call("PUT", "/v1/assets/variables/{name}", "/v1/assets/variables/v1",
             json={"value": "x"})
    api.call("PUT", "/v1/assets/credentials/{name}", "/v1/assets/credentials/c1",
             json={"username": "u", "secret": "s"})
    api.call("PUT", "/v1/assets/certificates/{name}", "/v1/assets/certificates/web",
             json={"data": _certificate_b64()})
    api.call("GET", "/v1/assets")
    for plural, name in (("variables", "v1"), ("credentials", "c1"), ("certificates", "web")):
        api.call("GET", f"/v1/assets/{plural}/{{name}}", f"/v1/assets/{plural}/{name}")

    # A running job's own calls, with its token.
    held = api.call("POST", "/v1/jobs", status=201, json={"runbook": "hold", "group": "web"})
    token = wait_until(lambda: (shared / "t").exists() and (shared / "t").read_text().strip(),
                       30, 0.1, "the job's token")
    api.call("GET", "/v1/job/identity", token=token)
    for kind, name in (("variable", "v1"), ("credential", "c1"), ("certificate", "web")):
        api.call("GET", "/v1/job/assets/{kind}/{name}", f"/v1/job/assets/{kind}/{name}",
                 token=token)
    api.call("POST", "/v1/jobs/{job_id}/stop", f"/v1/jobs/{held['id']}/stop")
    for plural, name in (("variables", "v1"), ("credentials", "c1"), ("certificates", "web")):
        api.call("DELETE", f"/v1/assets/{plural}/{{name}}", f"/v1/assets/{plural}/{name}")

    gzip = {"Content-Type": "application/gzip"}
    data = package(manifest("hello", "1.0.0", settings_schema={"type": "object"},
                            operations={"snap": {"run": "bin/snap"}}))
    api.call("POST", "/v1/extensions", status=201, content=data, headers=gzip)
    api.call("POST", "/v1/extensions", content=data, headers=gzip)  # 200: the same again
    api.call("GET", "/v1/extensions")
    api.call("GET", "/v1/extensions/{name}", "/v1/extensions/hello")
    goal = "/v1/extensions/{name}/targets/{kind}/{target}"
    api.call("PUT", goal, "/v1/extensions/hello/targets/group/web",
             json={"settings": {"a": 1}, "protected_settings": {"b": 2}})
    api.call("GET", "/v1/extensions/{name}/machines", "/v1/extensions/hello/machines")
    api.call("GET", "/v1/machines/{machine}/extensions", "/v1/machines/w1/extensions")
    api.call("POST", "/v1/machines/{machine}/extensions/{name}/retry",
             "/v1/machines/w1/extensions/hello/retry")
    asked = api.call("POST", "/v1/machines/{machine}/extensions/{name}/operations/{operation}",
                     "/v1/machines/w1/extensions/hello/operations/snap", status=201,
                     json={"params": {"path": "/srv"}})
    api.call("GET", "/v1/extension-operations")
    api.call("GET", "/v1/extension-operations/{op_id}", f"/v1/extension-operations/{asked['id']}")
    api.call("POST", "/v1/machines/{machine}/extensions/{name}/uninstall",
             "/v1/machines/w1/extensions/hello/uninstall")
    api.call("DELETE", goal, "/v1/extensions/hello/targets/group/web")
    # Edge modules (docs/modules.md).
    module = module_package("sensor", "1.0.0")
    api.call("POST", "/v1/modules", status=201, content=module, headers=gzip)
    api.call("POST", "/v1/modules", content=module, headers=gzip)  # 200: the same again
    api.call("GET", "/v1/modules")
    api.call("GET", "/v1/modules/{name}", "/v1/modules/sensor")
    api.call("GET", "/v1/deployments/schema")
    api.call("POST", "/v1/deployments", json={"name": "edge", "manifest": manifest_yaml(),
                                              "group": "web"})
    api.call("GET", "/v1/deployments")
    api.call("GET", "/v1/deployments/{name}", "/v1/deployments/edge")
    api.call("GET", "/v1/deployments/{name}/rollout", "/v1/deployments/edge/rollout")
    api.call("DELETE", "/v1/deployments/{name}", "/v1/deployments/edge")
    _catalog_row(hub, asked["machine_id"], asked["id"])
    api.call("GET", "/v1/backups")
    api.call("GET", "/v1/machines/{machine}/backups", "/v1/machines/w1/backups",
             params={"forgotten": "true"})
    api.call("GET", "/v1/machines/{machine}/backups/{snapshot}",
             "/v1/machines/w1/backups/latest")
    api.call("POST", "/v1/machines/{machine}/backups/{snapshot}/restore",  # (backup not set)
             "/v1/machines/w1/backups/0123/restore", json={"target": "/srv"}, status=404)

    # Disaster recovery (docs/recovery.md), with the shipped recovery extension or, on a hub
    # that does not ship one yet, a stand-in with its operations.
    if hub.api("GET", "/v1/extensions/recovery").status_code == 404:
        made = hub.api("POST", "/v1/extensions", headers=gzip, content=package(
            manifest("recovery", "1.0.0", operations=RECOVERY_OPS)))
        assert made.status_code == 201, made.text
    healthy_agent(hub, tmp_path, agents, "w2")
    protect = {"paths": ["/srv"], "rpo": "1h", "target_group": "web"}
    api.call("POST", "/v1/machines/{machine}/protection", "/v1/machines/w1/protection",
             json=protect)
    api.call("DELETE", "/v1/machines/{machine}/protection", "/v1/machines/w1/protection")
    api.call("POST", "/v1/machines/{machine}/protection", "/v1/machines/w1/protection",
             json=protect)
    api.call("GET", "/v1/machines/{machine}/protection", "/v1/machines/w1/protection")
    api.call("GET", "/v1/protections")
    _catalog_row(hub, asked["machine_id"], asked["id"], "recovery")
    drill = api.call("POST", "/v1/machines/{machine}/failover", "/v1/machines/w1/failover",
                     status=201, json={"to": "w2", "test": True})
    api.call("GET", "/v1/recovery-actions", params={"machine": "w1"})
    api.call("GET", "/v1/recovery-actions/{action_id}", f"/v1/recovery-actions/{drill['id']}")
    api.call("POST", "/v1/machines/{machine}/failback", "/v1/machines/w1/failback", json={},
             status=409)

    api.call("POST", "/v1/schedules", status=201, json={
        "name": "nightly", "runbook": "hello", "group": "web", "cron": "0 3 * * *"})
    api.call("GET", "/v1/schedules")
    api.call("GET", "/v1/schedules/{name}", "/v1/schedules/nightly")
    api.call("POST", "/v1/schedules/{name}/disable", "/v1/schedules/nightly/disable")
    api.call("POST", "/v1/schedules/{name}/enable", "/v1/schedules/nightly/enable")
    api.call("DELETE", "/v1/schedules/{name}", "/v1/schedules/nightly")

    hook = api.call("POST", "/v1/webhooks", status=201,
                    json={"name": "ci", "runbook": "hook", "group": "web"})
    api.call("GET", "/v1/webhooks")
    with httpx.Client(verify=hub.ssl_context(), timeout=30) as caller:
        called = caller.post(hook["url"], content=json.dumps({"ref": "main"}))
    assert called.status_code == 202, called.text
    api.check(called, "POST", "/v1/hooks/{secret}")
    api.call("DELETE", "/v1/webhooks/{name}", "/v1/webhooks/ci")

    # Every operator and job operation was called, and answered as it says.
    operator_ops = {(method, path) for path, ops in api.spec["paths"].items()
                    for method, op in ops.items()
                    if op.get("security") and op["security"][0] in OPERATOR_SCHEMES}
    assert operator_ops - api.seen == set(), sorted(operator_ops - api.seen)
    generic = [(m, p) for m, p in operator_ops
               if "$ref" not in json.dumps(api.operation(m, p)["responses"][
                   next(s for s in api.operation(m, p)["responses"] if s[0] == "2")])]
    assert generic == [], generic  # each has a model, not a bare object
