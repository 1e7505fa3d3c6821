"""Assets (HW-2) end to end: the CLI, account isolation, sealing at rest, and real jobs that
read assets through the runbook helper with their own short-lived job identity."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from outpost.agent import helper
from tests.support import SQLITE_ONLY, Agent, Hub, clean_env, registered_agent, run_cli, wait_until

MISSING = "No certificate was found in the certificate store with thumbprint"


def _cli(hub: Hub, *args: str, input: str = "", token: str | None = None
         ) -> subprocess.CompletedProcess[str]:
    """An operator command with standard input given (never the terminal's)."""
    return run_cli(*args, "--hub", hub.url, "--token", token or hub.admin_token,
                   "--ca-fingerprint", hub.fingerprint, input=input,
                   env=clean_env(COLUMNS="200"))


def _refused(result: subprocess.CompletedProcess[str], code: str, exit_code: int) -> str:
    assert result.returncode == exit_code, (result.returncode, result.stdout, result.stderr)
    assert f"code:   {code}" in result.stderr and "fix:" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return result.stderr


def _certificate(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    return cert, key


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _thumbprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA1()).hex().upper()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


# --- the operator's view ------------------------------------------------------------------

# SQLite only: the CLI's commands and output (the assets stored and read on both databases:
# test_another_accounts_assets_answer_404).
@SQLITE_ONLY
def test_assets_through_the_cli(hub: Hub, tmp_path: Path) -> None:
    hidden = f"hidden-{uuid.uuid4().hex}"
    password = f"pw-{uuid.uuid4().hex}"
    done = _cli(hub, "asset", "variable", "set", "region", "eu-west", "--description", "where")
    assert done.returncode == 0 and "Variable 'region' created." in done.stdout, done.stderr
    done = _cli(hub, "asset", "variable", "set", "api-key", "--secret", input=hidden + "\n")
    assert "Variable 'api-key' created (secret)." in done.stdout, done.stderr
    done = _cli(hub, "asset", "credential", "set", "db", "--username", "app", input=password)
    assert "Credential 'db' created for user app." in done.stdout, done.stderr

    cert, key = _certificate("web.example")
    pem_file = tmp_path / "web.pem"
    pem_file.write_text(_pem(cert) + _key_pem(key))
    done = _cli(hub, "asset", "certificate", "import", "web", str(pem_file))
    assert done.returncode == 0, done.stderr
    assert f"thumbprint: {_thumbprint(cert)}" in done.stdout
    assert "with a private key" in done.stdout and "CN=web.example" in done.stdout

    other, other_key = _certificate("signing.example")
    pfx = tmp_path / "signing.pfx"
    pfx.write_bytes(pkcs12.serialize_key_and_certificates(
        b"signing", other_key, other, None,
        serialization.BestAvailableEncryption(password.encode())))
    done = _cli(hub, "asset", "certificate", "import", "signing", str(pfx),
                "--password-stdin", "--json", input=password + "\n")
    assert _json(done)["thumbprint"] == _thumbprint(other)

    listed = hub.api("GET", "/v1/assets")
    rows = {(r["kind"], r["name"]): r for r in listed.json()}
    assert set(rows) == {("variable", "region"), ("variable", "api-key"),
                         ("credential", "db"), ("certificate", "web"),
                         ("certificate", "signing")}
    assert rows[("certificate", "web")]["thumbprint"] == _thumbprint(cert)
    assert rows[("variable", "api-key")]["secret"] is True
    table = _cli(hub, "asset", "list")
    assert _thumbprint(other) in table.stdout and "region" in table.stdout
    certificates = _json(_cli(hub, "asset", "certificate", "list", "--json"))
    assert sorted(c["name"] for c in certificates) == ["signing", "web"]
    variables = _cli(hub, "asset", "variable", "list")
    assert "region" in variables.stdout and "api-key" in variables.stdout
    assert "signing" not in variables.stdout and " db " not in variables.stdout
    assert [c["name"] for c in _json(_cli(hub, "asset", "credential", "list", "--json"))] \
        == ["db"]
    for text in (listed.text, table.stdout):
        assert hidden not in text and password not in text and "PRIVATE KEY" not in text
    for kind, name in rows:
        shown_json = hub.api("GET", f"/v1/assets/{kind}s/{name}").text
        assert hidden not in shown_json and password not in shown_json
        assert "PRIVATE KEY" not in shown_json

    assert hub.api("GET", "/v1/assets/variables/region").json()["value"] == "eu-west"
    shown = _cli(hub, "asset", "show", "credential", "db")
    assert "user name:  app" in shown.stdout and password not in shown.stdout
    assert hub.api("GET", "/v1/assets/variables/api-key").json()["value"] is None
    # A thumbprint as a certificate dialog shows it: lower case, spaced, with a stray mark.
    spaced = "\u200e" + " ".join(_thumbprint(cert)[i:i + 2] for i in range(0, 40, 2)).lower()
    assert hub.api("GET", f"/v1/assets/certificates/{spaced}").json()["name"] == "web"

    done = _cli(hub, "asset", "variable", "set", "region", "-", input="us-east\n")
    assert "Variable 'region' replaced." in done.stdout, done.stderr
    assert hub.api("GET", "/v1/assets/variables/region").json()["value"] == "us-east"
    done = _cli(hub, "asset", "remove", "credential", "db")
    assert "Removed credential 'db'." in done.stdout
    assert hub.api("GET", "/v1/assets/credentials/db").json()["code"] == "E3002"
    err = _refused(_cli(hub, "asset", "show", "certificate", "00" * 20), "E5001", 1)
    assert f"{MISSING} {'00' * 20}" in err


# SQLite only: validation, before anything is stored.
@SQLITE_ONLY
def test_bad_certificates_and_input_get_clean_errors(hub: Hub, tmp_path: Path) -> None:
    """Each gets its catalog code (exit 2 in the CLI), and nothing is stored."""
    cert, _ = _certificate("web.example")
    other, other_key = _certificate("signing.example")
    pfx = tmp_path / "signing.pfx"
    pfx.write_bytes(pkcs12.serialize_key_and_certificates(
        b"signing", other_key, other, None, serialization.BestAvailableEncryption(b"right")))
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    _refused(_cli(hub, "asset", "certificate", "import", "bad", str(bad)), "E5003", 2)
    _refused(_cli(hub, "asset", "certificate", "import", "bad", str(pfx), "--password-stdin",
                  input="wrong\n"), "E5004", 2)
    pfx_data = base64.b64encode(pfx.read_bytes()).decode()
    mismatched = base64.b64encode((_pem(cert) + _key_pem(other_key)).encode()).decode()
    for body, code, text in (({"data": pfx_data}, "E5004", "was not given"),
                             ({"data": mismatched}, "E5003", "does not belong")):
        response = hub.api("PUT", "/v1/assets/certificates/bad", json=body)
        assert response.status_code == 422 and response.json()["code"] == code
        assert text in response.json()["message"]
    for method, path, body, status, code in (
            ("PUT", "/v1/assets/variables/no%20spaces", {"value": "x"}, 422, "E3003"),
            ("GET", "/v1/assets/secrets/x", None, 422, "E3003"),
            ("PUT", "/v1/assets/certificates/raw", {"data": "%%%"}, 422, "E3003"),
            ("PUT", "/v1/assets/certificates/raw", {"data": "AAAA"}, 422, "E5003"),
            ("PUT", "/v1/assets/credentials/c", {"secret": "x"}, 422, "E3003")):
        response = hub.api(method, path, json=body)
        assert (response.status_code, response.json()["code"]) == (status, code), response.text
    for path, raw in (("variables/v", b'{"value": "\\ud800"}'),
                      ("credentials/c", b'{"username": "u", "secret": "s\\udfff"}'),
                      ("variables/v", b'{"value": "v", "description": "\\ud800"}')):
        response = hub.api("PUT", f"/v1/assets/{path}", content=raw,
                           headers={"Content-Type": "application/json"})
        assert (response.status_code, response.json()["code"]) == (422, "E3003"), response.text
    response = hub.api("PUT", "/v1/assets/variables/big", json={"value": "x" * 70000})
    assert response.status_code == 413 and response.json()["code"] == "E5005"
    names = {r["name"] for r in hub.api("GET", "/v1/assets").json()}
    assert not names & {"bad", "big", "raw", "c", "v", "no spaces"}


def test_another_accounts_assets_answer_404(hub: Hub) -> None:
    second = hub.api("POST", "/v1/accounts", json={"name": "second"}).json()
    token = second["token"]
    cert, _ = _certificate("only-first.example")
    assert hub.api("PUT", "/v1/assets/variables/shared", json={"value": "first's"}
                   ).status_code == 200
    assert hub.api("PUT", "/v1/assets/certificates/tls", json={
        "data": base64.b64encode(_pem(cert).encode()).decode()}
        ).status_code == 200

    assert hub.api("GET", "/v1/assets", token).json() == []
    for method, path in (("GET", "/v1/assets/variables/shared"),
                         ("DELETE", "/v1/assets/variables/shared"),
                         ("GET", "/v1/assets/certificates/tls"),
                         ("GET", f"/v1/assets/certificates/{_thumbprint(cert)}")):
        response = hub.api(method, path, token)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["code"] in ("E3002", "E5001")
    _refused(_cli(hub, "asset", "remove", "variable", "shared", token=token), "E3002", 1)
    # The same name in the second account is its own asset.
    assert _cli(hub, "asset", "variable", "set", "shared", "second's", token=token
                ).returncode == 0
    assert _json(_cli(hub, "asset", "show", "variable", "shared", "--json"))["value"] == \
        "first's"
    assert _json(_cli(hub, "asset", "show", "variable", "shared", "--json", token=token)
                 )["value"] == "second's"
    # Operator tokens are not job tokens, and made-up job tokens are refused.
    for bearer in (hub.admin_token, token, f"ojt_{uuid.uuid4()}.bogus", "ojt_"):
        response = hub.api("GET", "/v1/job/assets/variables/shared", bearer)
        assert response.status_code == 401 and response.json()["code"] == "E5002"


# Generated asset requests: tests/unit/test_api_bad_input.py (the fast tier).


def test_the_helper_directory_keeps_the_token_out_of_the_environment(tmp_path: Path) -> None:
    workdir = tmp_path / "job"
    workdir.mkdir(mode=0o700)
    env = helper.prepare(workdir, {"job_id": "j1", "job_token": "ojt_j1.sekrit"},
                         "https://hub:8443", "CA PEM")
    folder = Path(env["OUTPOST_HELPER_DIR"])
    assert folder.parent == workdir and env["PYTHONPATH"] == str(folder)
    assert not any("sekrit" in value for value in env.values())
    assert (folder / "job.token").read_text().strip() == "ojt_j1.sekrit"
    assert os.stat(folder).st_mode & 0o777 == 0o700
    for item in folder.iterdir():
        assert os.stat(item).st_mode & 0o777 == 0o600, item
    assert "@OUTPOST_PYTHON@" not in (folder / "outpost.sh").read_text()


# --- jobs ---------------------------------------------------------------------------------

def _healthy_agent(hub: Hub, tmp_path: Path, agents: list[Agent]) -> Agent:
    agent = registered_agent(hub, tmp_path, "w1")
    agents.append(agent.start())
    wait_until(lambda: hub.machines()["w1"]["status"] == "Healthy", 15, what="w1 healthy")
    return agent


def _publish(hub: Hub, tmp_path: Path, name: str, filename: str, body: str,
             *extra: str) -> None:
    script = tmp_path / filename
    script.write_text(body)
    done = hub.cli("runbook", "publish", name, str(script), *extra)
    assert done.returncode == 0, done.stderr


def _run(hub: Hub, runbook: str, *params: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    args = [a for p in params for a in ("--param", p)]
    done = hub.cli("job", "start", runbook, "--group", "web", *args, "--wait", "--json")
    job = json.loads(done.stdout)
    records = _json(hub.cli("job", "output", job["id"], "--json"))
    return job, records


def _database_bytes(database_url: str) -> bytes:
    if database_url.startswith("sqlite:///"):
        path = Path(database_url[len("sqlite:///"):])
        wal = path.with_name(path.name + "-wal")
        return path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    dump = subprocess.run(["pg_dump", "--data-only", database_url], capture_output=True,
                          timeout=60, check=True)
    return dump.stdout


BASH_RUNBOOK = """#!/bin/bash
set -e
. "$OUTPOST_HELPER_DIR/outpost.sh"
outpost_progress 10 starting
value=$(outpost_variable app-secret)
user=$(outpost_credential_user db)
secret=$(outpost_credential_secret db)
outpost_certificate web > cert.pem
outpost_certificate_key web > key.pem
echo "variable=$(printf %s "$value" | sha256sum | cut -d' ' -f1)"
echo "user=$user"
echo "secret=$(printf %s "$secret" | sha256sum | cut -d' ' -f1)"
echo "cert=$(sha256sum < cert.pem | cut -d' ' -f1)"
echo "key=$(sha256sum < key.pem | cut -d' ' -f1)"
outpost_progress 40 copying files
outpost_warning "two lines
of warning"
env
cp "$OUTPOST_HELPER_DIR/job.token" "$steal"
if outpost_variable other-account-only; then echo "read another account's variable"; fi
outpost_progress 100
"""


# SQLite only: the job's sandbox and helper on the machine, not the database.
@SQLITE_ONLY
def test_a_job_reads_assets_with_its_own_identity_and_nothing_leaks(
        hub: Hub, agents: list[Agent], tmp_path: Path, database_url: str,
        shared: Path) -> None:
    value, secret = f"v-{uuid.uuid4().hex}", f"s-{uuid.uuid4().hex}"
    cert, key = _certificate("job.example")
    key_pem = _key_pem(key)
    pem_file = tmp_path / "job.pem"
    pem_file.write_text(_pem(cert) + key_pem)
    assert _cli(hub, "asset", "variable", "set", "app-secret", "--secret",
                input=value).returncode == 0
    assert _cli(hub, "asset", "credential", "set", "db", "-u", "app", input=secret
                ).returncode == 0
    assert _cli(hub, "asset", "certificate", "import", "web", str(pem_file)).returncode == 0
    second = hub.api("POST", "/v1/accounts", json={"name": "second"}).json()
    assert hub.api("PUT", "/v1/assets/variables/other-account-only", second["token"],
                   json={"value": "not yours"}).status_code == 200

    _publish(hub, tmp_path, "uses-assets", "uses-assets.sh", BASH_RUNBOOK, "--param", "steal",
             "--log-progress")
    agent = _healthy_agent(hub, tmp_path, agents)
    stolen = shared / "stolen.token"
    job, records = _run(hub, "uses-assets", f"steal={stolen}")
    assert job["status"] == "Completed", (job, records)

    output = [r["text"] for r in records if r["stream"] == "Output"]
    assert f"variable={_sha(value)}" in output and f"secret={_sha(secret)}" in output
    assert "user=app" in output
    assert f"cert={_sha(_pem(cert))}" in output and f"key={_sha(key_pem)}" in output
    assert "read another account's variable" not in output
    errors = [r["text"] for r in records if r["stream"] == "Error"]
    assert "No variable 'other-account-only' in this account." in errors
    progress = [r["text"] for r in records if r["stream"] == "Progress"]
    assert progress == ["10% starting", "40% copying files", "100%"]
    warnings = [r["text"] for r in records if r["stream"] == "Warning"]
    assert warnings == ["two lines", "of warning"]

    # The token was in a file of the job, never in its environment.
    token = stolen.read_text().strip()
    assert token.startswith(f"ojt_{job['id']}.")
    env_lines = [t for t in output if "=" in t]
    assert any(t.startswith("OUTPOST_HELPER_DIR=") for t in env_lines)
    assert not any(token in t or token.split(".", 1)[1] in t for t in env_lines)

    # The job has ended, so its token has too.
    response = hub.api("GET", "/v1/job/assets/variables/app-secret", token)
    assert response.status_code == 401, response.text
    assert response.json()["code"] == "E5002" and "Completed" in response.json()["message"]
    assert value not in response.text

    # Sealed at rest, and in no log: the values, the private key, and the token.
    key_line = key_pem.splitlines()[1]
    stored = _database_bytes(database_url)
    assert b"app-secret" in stored  # names are in clear: this is the right database
    logs = hub.log() + agent.log()
    for plain in (value, secret, key_line, token):
        assert plain.encode() not in stored, plain
        assert plain not in logs, plain


PYTHON_RUNBOOK = """#!/usr/bin/env python3
import hashlib
import outpost_runbook as outpost

outpost.progress(25, "reading assets")
user, secret = outpost.get_credential("db")
cert = outpost.get_certificate("{thumbprint}")
print("user=" + user + " secret=" + hashlib.sha256(secret.encode()).hexdigest())
print("cert=" + cert["name"] + " " + cert["thumbprint"] + " " + cert["subject"])
print("identity=" + outpost.identity()["job_id"])
outpost.debug("a debug record")
for asked in ("{missing}", "no-such-cert"):
    try:
        outpost.get_certificate(asked)
    except outpost.OutpostError as exc:
        print("missing=" + exc.code + " " + exc.message)
"""


# SQLite only: the helper on the machine, not the database.
@SQLITE_ONLY
def test_python_helper_and_a_missing_certificate(hub: Hub, agents: list[Agent],
                                                  tmp_path: Path) -> None:
    secret = f"s-{uuid.uuid4().hex}"
    cert, _ = _certificate("py.example")
    pem_file = tmp_path / "py.pem"
    pem_file.write_text(_pem(cert))
    assert _cli(hub, "asset", "credential", "set", "db", "-u", "py", input=secret
                ).returncode == 0
    assert _cli(hub, "asset", "certificate", "import", "py-cert", str(pem_file)
                ).returncode == 0
    missing = "1234567890ABCDEF1234567890ABCDEF12345678"
    _publish(hub, tmp_path, "py-assets", "py-assets.py", PYTHON_RUNBOOK.format(
        thumbprint=_thumbprint(cert).lower(), missing=missing), "--log-progress")
    _publish(hub, tmp_path, "needs-cert", "needs-cert.sh",
             '#!/bin/bash\nset -e\n. "$OUTPOST_HELPER_DIR/outpost.sh"\n'
             f'outpost_certificate {missing} > cert.pem\necho "not reached"\n')
    _healthy_agent(hub, tmp_path, agents)

    job, records = _run(hub, "py-assets")
    assert job["status"] == "Completed", (job, records)
    texts = [(r["stream"], r["text"]) for r in records]
    assert ("Progress", "25% reading assets") in texts
    assert ("Output", f"user=py secret={_sha(secret)}") in texts
    assert ("Output", f"cert=py-cert {_thumbprint(cert)} CN=py.example") in texts
    assert ("Output", f"identity={job['id']}") in texts
    assert ("Debug", "a debug record") in texts
    assert ("Output", f"missing=E5001 {MISSING} {missing}") in texts
    assert ("Output", "missing=E5001 No certificate was found in the certificate store with "
                      "name 'no-such-cert'") in texts

    job, records = _run(hub, "needs-cert")
    assert job["status"] == "Failed" and job["exit_code"] == 1, job
    errors = [r["text"] for r in records if r["stream"] == "Error"]
    assert f"{MISSING} {missing}" in errors, records
    assert not any(r["text"] == "not reached" for r in records)
