"""The hub itself: ``outpost hub init``, what a running hub serves, ED-5 (port taken), error
bodies on bad input, migrations on both databases, and secrets at rest.

The tests of bad input, migrations and secrets share one hub a database (``module_hub``):
none of them reads what another stores. The metrics test counts machines and registrations
from zero, so it has a hub of its own."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import socket
import sqlite3
import stat
import uuid
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from outpost.hub.db import MIGRATIONS
from tests.support import Hub, register, run_cli

PRIVATE_FILES = ("ca.key", "server.key", "master.key", "admin.token")
INIT_KEYS = {"url", "ca_fingerprint", "account_id", "primary_key", "secondary_key",
             "admin_token", "profile"}
TABLES = {"accounts", "tokens", "machines", "nonces", "work_items"}


def _snapshot(root: Path) -> dict[str, tuple[int, bytes, int]]:
    """Every file under ``root``: modification time (ns), contents and mode."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes(), p.stat().st_mode)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_error_body(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body: dict[str, Any] = response.json()
    assert {"code", "message", "fix"} <= body.keys(), body
    assert body["code"] == code, body
    assert body["message"] and body["fix"], body
    assert "Traceback" not in response.text
    return body


# --- hub init -------------------------------------------------------------------------------

def test_init_json_files_certificate_and_keys(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    result = run_cli("hub", "init", "--data-dir", str(data), "--hostname", "hub.example",
                     "--json")
    assert result.returncode == 0, result.stderr
    init = json.loads(result.stdout)
    assert set(init) == INIT_KEYS, init
    assert init["url"] == "https://hub.example:8443"
    assert init["profile"] == "hub.example"  # the CLI profile it wrote, named after the host

    for name in ("hub.yaml", "ca.pem", "server.pem", *PRIVATE_FILES):
        assert (data / name).is_file(), name
    for name in PRIVATE_FILES:
        mode = stat.S_IMODE((data / name).stat().st_mode)
        assert mode == 0o600, f"{name} has mode {mode:o}"

    # The server certificate is valid for localhost, 127.0.0.1 and the given host name.
    server = x509.load_pem_x509_certificate((data / "server.pem").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "hub.example"} <= set(sans.get_values_for_type(x509.DNSName))
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)

    # The fingerprint agents pin is SHA-256 of the CA certificate's DER encoding.
    ca = x509.load_pem_x509_certificate((data / "ca.pem").read_bytes())
    der = ca.public_bytes(serialization.Encoding.DER)
    assert init["ca_fingerprint"] == hashlib.sha256(der).hexdigest()
    assert server.issuer == ca.subject

    for key in ("primary_key", "secondary_key"):
        assert len(base64.b64decode(init[key], validate=True)) == 32, init[key]
    assert init["primary_key"] != init["secondary_key"]
    assert str(uuid.UUID(init["account_id"])) == init["account_id"]
    assert (data / "admin.token").read_text().strip() == init["admin_token"]

    # Again on the same directory: the same answer, and not one file touched.
    before = _snapshot(data)
    again = run_cli("hub", "init", "--data-dir", str(data), "--hostname", "hub.example",
                    "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == init
    assert "already initialised" in again.stderr
    assert _snapshot(data) == before

    text = run_cli("hub", "init", "--data-dir", str(data))
    assert text.returncode == 0, text.stderr
    assert f"{data} is already initialised; nothing was changed." in text.stdout
    assert _snapshot(data) == before


def test_init_text_prints_the_register_line(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    result = run_cli("hub", "init", "--data-dir", str(data), "--hostname", "hub.example")
    assert result.returncode == 0, result.stderr
    assert f"Hub initialised in {data}." in result.stdout
    init = json.loads(run_cli("hub", "init", "--data-dir", str(data), "--json").stdout)
    line = (f"outpost agent register --hub https://hub.example:8443 "
            f"--account-id {init['account_id']} --account-key {init['primary_key']} "
            f"--group default --ca-fingerprint {init['ca_fingerprint']}")
    lines = [s.strip() for s in result.stdout.splitlines()]
    assert line in lines, result.stdout
    assert f"outpost hub run --data-dir {data}" in lines, result.stdout
    assert init["admin_token"] in result.stdout
    assert init["ca_fingerprint"] in result.stdout


# --- what a running hub serves --------------------------------------------------------------

def test_running_hub_serves_health_openapi_and_metrics(hub: Hub, tmp_path: Path) -> None:
    assert register(hub, tmp_path / "agent-m1", "m1").returncode == 0
    with hub.client() as client:
        health = client.get("/healthz")
        assert health.status_code == 200, health.text
        assert health.json()["status"] == "ok"

        spec = client.get("/openapi.json")
        assert spec.status_code == 200, spec.text
        paths = json.loads(spec.text)["paths"]
        assert "/v1/machines" in paths and "/v1/agent/register" in paths

        ca = client.get("/v1/ca")
        assert ca.status_code == 200, ca.text
        assert ca.headers["x-outpost-ca-fingerprint"] == hub.fingerprint

        metrics = client.get("/metrics")
    assert metrics.status_code == 200, metrics.text
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert "# TYPE outpost_machines gauge" in text, text
    assert 'outpost_machines{status="Pending"} 1.0' in text, text
    assert 'outpost_machines{status="Healthy"} 0.0' in text, text
    assert "outpost_registrations_total 1.0" in text, text
    assert "# TYPE outpost_http_requests_total counter" in text, text
    assert 'outpost_http_requests_total{status="200"}' in text, text


# --- ED-5: the port is taken ----------------------------------------------------------------

def test_port_already_allocated_names_the_holder(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    assert run_cli("hub", "init", "--data-dir", str(data), "--json").returncode == 0
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        result = run_cli("hub", "run", "--data-dir", str(data), "--bind", f"127.0.0.1:{port}",
                         timeout=30)
    assert result.returncode != 0, result.stdout
    err = result.stderr
    assert f"Bind for 127.0.0.1:{port} failed: port is already allocated" in err, err
    assert "python" in err.lower(), err
    assert f"pid {os.getpid()}" in err, err
    assert "E2005" in err, err
    assert "Traceback" not in err


# --- bad input: JSON errors with a code, never a traceback or a bare 500 ----------------------

def test_bad_input_answers_json_with_code(module_hub: Hub) -> None:
    hub = module_hub
    with hub.client() as anon, hub.client(hub.admin_token) as admin:
        body = _assert_error_body(
            anon.post("/v1/agent/register", content=b"{not json",
                      headers={"content-type": "application/json"}), 403, "E1001")
        assert body["reason"] == "unknown_account"

        # Unsigned agent requests: refused, not parsed.
        _assert_error_body(anon.post("/v1/agent/heartbeat", content=b"\xff\xfe"), 401, "E1008")
        body = _assert_error_body(anon.post("/v1/agent/poll?wait=abc"), 422, "E3003")
        assert "wait" in body["message"], body

        body = _assert_error_body(admin.post("/v1/accounts", json={"name": ""}), 422, "E3003")
        assert "name" in body["message"], body
        body = _assert_error_body(admin.post("/v1/accounts", json={}), 422, "E3003")
        assert "name" in body["message"], body
        body = _assert_error_body(
            admin.post("/v1/accounts", content=b"not json at all",
                       headers={"content-type": "application/json"}), 422, "E3003")
        assert "body" in body["message"], body
        body = _assert_error_body(admin.post("/v1/accounts", json={"name": "x" * 200}), 422,
                                  "E3003")
        assert "name" in body["message"], body
        body = _assert_error_body(admin.post("/v1/machines/nope/ping?timeout=abc"), 422,
                                  "E7051")
        assert "timeout" in body["message"], body

        _assert_error_body(admin.get("/v1/no/such/path"), 404, "E3002")
        _assert_error_body(anon.get("/nothing-here"), 404, "E3002")
        _assert_error_body(admin.get("/v1/machines/nope"), 404, "E3002")
        _assert_error_body(admin.get(f"/v1/accounts/{uuid.uuid4()}/keys"), 404, "E3002")
        _assert_error_body(
            admin.post(f"/v1/accounts/{hub.account_id}/keys/tertiary/regenerate"), 422,
            "E3003")
        _assert_error_body(anon.get("/v1/machines"), 401, "E3001")
        refused = admin.put("/v1/machines")
        _assert_error_body(refused, 405, "E3012")
        assert refused.headers["allow"] == "GET", refused.headers

    # The hub is still well and logged no crash.
    assert hub.api("GET", "/healthz").status_code == 200
    assert "Traceback" not in hub.log(), hub.log()


# --- migrations on both databases -----------------------------------------------------------

def _head_revision() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head
    return head


def test_migrations_reach_head(module_hub: Hub) -> None:
    hub = module_hub
    head = _head_revision()
    if hub.database_url.startswith("sqlite:///"):
        conn = sqlite3.connect(hub.database_url[len("sqlite:///"):])
        try:
            versions = [r[0] for r in conn.execute("SELECT version_num FROM alembic_version")]
            tables = {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
    else:
        import psycopg

        with psycopg.connect(hub.database_url) as pg:
            versions = [r[0] for r in pg.execute("SELECT version_num FROM alembic_version")]
            tables = {r[0] for r in pg.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = 'public'")}
    assert versions == [head]
    assert TABLES | {"alembic_version"} <= tables, tables


# --- secrets at rest ------------------------------------------------------------------------

def _secret_forms(secret: str) -> list[bytes]:
    forms = [secret.encode()]
    try:
        forms.append(base64.b64decode(secret, validate=True))
    except ValueError:
        pass
    return forms


def test_secrets_are_not_stored_in_plain_text(module_hub: Hub, tmp_path: Path) -> None:
    hub = module_hub
    made = hub.cli("account", "create", "second", "--json")
    assert made.returncode == 0, made.stderr
    second = json.loads(made.stdout)
    assert register(hub, tmp_path / "agent-m1", "m1").returncode == 0
    assert "m1" in hub.machines()
    secrets = [hub.primary_key, hub.init["secondary_key"], hub.admin_token,
               second["primary_key"], second["secondary_key"], second["token"]]

    if hub.database_url.startswith("sqlite:///"):
        path = Path(hub.database_url[len("sqlite:///"):])
        files = [p for p in (path, Path(f"{path}-wal"), hub.data_dir / "hub.db",
                             hub.data_dir / "seed.yaml") if p.exists()]
        assert path in files
        stored = b"".join(p.read_bytes() for p in files)
        # The rows are there, so the test reads the right file.
        assert b"second" in stored and hub.account_id.encode() in stored
    else:
        import psycopg

        with psycopg.connect(hub.database_url) as pg:
            rows = [*pg.execute("SELECT * FROM accounts"), *pg.execute("SELECT * FROM tokens"),
                    *pg.execute("SELECT * FROM machines")]
        stored = repr(rows).encode() + (hub.data_dir / "seed.yaml").read_bytes()
        assert hub.account_id.encode() in stored
    log = hub.log().encode()
    assert log, "the hub wrote no log"
    for secret in secrets:
        for form in _secret_forms(secret):
            assert form not in stored, f"a secret is stored in plain text: {secret[:6]}..."
            assert form not in log, f"a secret is in the hub's log: {secret[:6]}..."
