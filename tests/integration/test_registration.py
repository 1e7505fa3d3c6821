"""Registering machines with a real hub, and how the hub authenticates agents afterwards.

HW-4 (refusals with the edge runtime's 403 text), HW-5 (outdated agent), HW-7 (TLS
interception), HW-10 (already registered), ED-7 (machine name length), and the machine
signatures that replace a bearer secret after registration.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from outpost import __version__
from outpost.agent import registration as reg_mod
from outpost.agent.state import StateDir
from outpost.agent.transport import Clock
from outpost.hub import pki
from outpost.protocol import signing
from outpost.protocol.errors import (
    ALREADY_REGISTERED_TEXT,
    FORBIDDEN_TEXT,
    INVALID_HOSTNAME_TEXT,
    entry,
)
from tests.support import SQLITE_ONLY, Agent, Hub, clean_env, register, run_cli, wait_until

FOREIGN_CA_CN = "Intercepting Proxy CA"


def _assert_refused(result: Any, reason: str, text: str, exit_code: int = 1) -> str:
    """The CLI failed with ``exit_code``, the text, the code and reason, and the fix."""
    assert result.returncode == exit_code, (result.returncode, result.stdout, result.stderr)
    err: str = result.stderr
    item = entry(reason)
    assert text in err, err
    assert f"{item.code} ({item.name})" in err, err
    assert "fix:" in err, err
    return err


def _fresh_state(tmp_path: Path, name: str) -> Path:
    return tmp_path / f"state-{name}-{uuid.uuid4().hex[:6]}"


# --- HW-4: refusals -------------------------------------------------------------------------

# SQLite only: the reasons for a refusal, checked before anything is stored.
@SQLITE_ONLY
def test_refused_registrations_answer_403_with_reason(hub: Hub, tmp_path: Path) -> None:
    # The raw answer: no signature headers at all.
    with hub.client() as client:
        response = client.post("/v1/agent/register", json={"name": "raw", "group": "web",
                                                           "public_key": "x"})
    assert response.status_code == 403, response.text
    body = response.json()
    assert body["message"] == FORBIDDEN_TEXT
    assert body["reason"] == "unknown_account"
    assert body["code"] == "E1001"
    assert body["fix"]

    # Unknown account: an id that does not exist on this hub.
    args = hub.register_args(_fresh_state(tmp_path, "a"), "m-unknown")
    other_account = str(uuid.uuid4())
    args[args.index("--account-id") + 1] = other_account
    err = _assert_refused(run_cli(*args), "unknown_account", FORBIDDEN_TEXT)
    assert entry("E1001").fixes[0] in err
    assert other_account in err

    # Bad signature: a well-formed key that is not the account's.
    wrong_key = signing.b64(b"\x01" * 32)
    refused_state = _fresh_state(tmp_path, "b")
    result = run_cli(*hub.register_args(refused_state, "m-badsig", key=wrong_key))
    err = _assert_refused(result, "bad_signature", FORBIDDEN_TEXT)
    assert "outpost account keys" in err
    # A refused attempt leaves no key and no registration behind.
    assert not (refused_state / "machine.key").exists()
    assert not (refused_state / "registration.json").exists()

    # Clock skew: the agent's clock runs 2000 s ahead of the hub's.
    result = run_cli(*hub.register_args(_fresh_state(tmp_path, "c"), "m-skew"),
                     env=clean_env(OUTPOST_TEST_CLOCK_SKEW="2000"))
    err = _assert_refused(result, "clock_skew", FORBIDDEN_TEXT)
    assert "The machine's clock reads" in err and "and the hub's" in err, err
    assert "client_time=" in err and "hub_time=" in err, err
    assert "2000 s apart" in err, err
    assert "Synchronise the machine's clock" in err, err

    assert hub.machines() == {}


def _account_signed_register(hub: Hub, name: str) -> httpx.Response:
    """A registration signed with the account's primary key, as the agent sends it."""
    public = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    body = json.dumps({"name": name, "group": "web", "public_key": signing.b64(public),
                       "facts": {"agent_version": __version__}}).encode()
    path = "/v1/agent/register"
    stamp = signing.format_time(datetime.now(UTC))
    key = signing.unb64(hub.primary_key)
    nonce = signing.new_nonce()
    headers = {signing.H_ACCOUNT: hub.account_id, signing.H_DATE: stamp,
               signing.H_NONCE: nonce,
               signing.H_SIGNATURE: signing.sign_account(key, "POST", path, stamp, body, nonce),
               "Content-Type": "application/json"}
    with hub.client() as client:
        return client.post(path, content=body, headers=headers)


# --- HW-10: already registered, --force, deregister -----------------------------------------

def test_already_registered_force_and_deregister(hub: Hub, tmp_path: Path) -> None:
    first = tmp_path / "state-first"
    assert register(hub, first, "dup").returncode == 0
    machine_id = hub.machines()["dup"]["id"]

    # Again from the same state directory: refused locally, naming account and group.
    err = _assert_refused(register(hub, first, "dup"), "already_registered",
                          ALREADY_REGISTERED_TEXT)
    assert hub.account_id in err and "group 'web'" in err, err

    # Another state directory, same name: the hub refuses with 409.
    second = tmp_path / "state-second"
    err = _assert_refused(register(hub, second, "dup"), "already_registered",
                          ALREADY_REGISTERED_TEXT)
    assert f"in account {hub.account_id} (default), group 'web'" in err, err
    assert "--force" in err
    assert not (second / "registration.json").exists()
    assert hub.machines()["dup"]["id"] == machine_id

    # The hub's own answer to that second registration: 409 with the same text.
    response = _account_signed_register(hub, "dup")
    assert response.status_code == 409, response.text
    body = response.json()
    assert body["reason"] == "already_registered" and body["code"] == "E1004", body
    assert body["message"].startswith(ALREADY_REGISTERED_TEXT), body
    assert body["details"]["group"] == "web" and body["details"]["account_id"] == hub.account_id

    # --force replaces the registration: a new machine id, still one machine of that name.
    forced = register(hub, first, "dup", "web", "--force")
    assert forced.returncode == 0, forced.stderr
    machines = hub.machines()
    assert list(machines) == ["dup"]
    new_id = machines["dup"]["id"]
    assert new_id != machine_id
    assert new_id in forced.stdout
    local = StateDir(first).registration()
    assert local is not None and local.machine_id == new_id

    # Deregister removes it on the hub and here.
    gone = run_cli("agent", "deregister", "--state-dir", str(first))
    assert gone.returncode == 0, gone.stderr
    assert "Removed the registration of 'dup'" in gone.stdout
    assert "could not be told" not in gone.stdout
    assert hub.machines() == {}
    assert not (first / "registration.json").exists()
    assert not (first / "machine.key").exists()


# --- ED-7: machine name length ----------------------------------------------------------------

# SQLite only: validation of the name, before anything is stored.
@SQLITE_ONLY
def test_machine_name_must_be_1_to_64_characters(hub: Hub, tmp_path: Path) -> None:
    for name in ("", "n" * 65):
        result = register(hub, _fresh_state(tmp_path, "bad"), name)
        _assert_refused(result, "invalid_hostname", INVALID_HOSTNAME_TEXT, exit_code=2)
        assert "--name" in result.stderr
    # The hub applies the same rule to an agent that does not check first.
    for name in ("", "n" * 65):
        response = _account_signed_register(hub, name)
        assert response.status_code == 422, response.text
        assert response.json()["message"] == INVALID_HOSTNAME_TEXT
        assert response.json()["reason"] == "invalid_hostname"
    assert hub.machines() == {}

    longest = "n" * 64
    result = register(hub, _fresh_state(tmp_path, "ok"), longest)
    assert result.returncode == 0, result.stderr
    assert list(hub.machines()) == [longest]


# --- HW-7: TLS interception -------------------------------------------------------------------

def _foreign_cert(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A server certificate for localhost issued by a CA that is not the hub's."""
    ca, ca_key = tmp_path / "foreign-ca.pem", tmp_path / "foreign-ca.key"
    cert, key = tmp_path / "foreign-server.pem", tmp_path / "foreign-server.key"
    pki.create_ca(FOREIGN_CA_CN, ca, ca_key)
    pki.create_server_cert(ca, ca_key, [], cert, key)
    return ca, cert, key


def _start_with_foreign_cert(hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    foreign_ca, cert, key = _foreign_cert(tmp_path)
    hub.extra_args = ["--tls-cert", str(cert), "--tls-key", str(key)]
    # The test's own operator client trusts the foreign CA, so it can see the hub come up.
    monkeypatch.setattr(hub, "ssl_context",
                        lambda: ssl.create_default_context(cafile=str(foreign_ca)))
    hub.start()


# SQLite only: TLS interception seen by the agent, not the database.
@SQLITE_ONLY
def test_registration_through_tls_interception_names_the_issuer(
        new_hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _start_with_foreign_cert(new_hub, tmp_path, monkeypatch)
    result = register(new_hub, _fresh_state(tmp_path, "tls"), "m-tls")
    err = _assert_refused(result, "tls_untrusted_issuer",
                          "was not issued by the expected authority")
    assert f"CN={FOREIGN_CA_CN}" in err, err
    assert new_hub.fingerprint in err, err
    assert "proxy may be intercepting TLS" in err, err
    assert new_hub.machines() == {}


# SQLite only: TLS interception seen by the agent, not the database.
@SQLITE_ONLY
def test_running_agent_reports_tls_interception_and_keeps_running(
        new_hub: Hub, agents: list[Agent], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    new_hub.start()
    state = tmp_path / "agent-tls"
    assert register(new_hub, state, "m-tls").returncode == 0
    agent = Agent(state, "m-tls")
    agents.append(agent.start())
    wait_until(lambda: (agent.status() or {}).get("last_heartbeat_ack_at"), 15,
               what="a first acknowledged heartbeat")

    new_hub.stop()
    _start_with_foreign_cert(new_hub, tmp_path, monkeypatch)

    def tls_error() -> dict[str, Any] | None:
        error = (agent.status() or {}).get("last_error")
        return error if error and error["code"] == "E1006" else None

    error = wait_until(tls_error, 20, 0.2, "the agent to record the TLS error")
    assert error is not None
    assert f"CN={FOREIGN_CA_CN}" in error["message"], error
    assert new_hub.fingerprint in error["message"], error
    assert "proxy may be intercepting TLS" in error["message"], error
    log = (state / "agent.log").read_text()
    assert f"CN={FOREIGN_CA_CN}" in log and "E1006" in log, log
    assert agent.proc is not None and agent.proc.poll() is None, agent.log()
    assert agent.status() is not None


# --- machine signatures after registration ----------------------------------------------------

def _signed(key: signing.Signer, machine_id: str, path: str, body: bytes,
            stamp: str | None = None) -> dict[str, str]:
    stamp = stamp or signing.format_time(datetime.now(UTC))
    nonce = signing.new_nonce()
    return {signing.H_MACHINE: machine_id, signing.H_DATE: stamp, signing.H_NONCE: nonce,
            signing.H_SIGNATURE: signing.sign_machine(key, "POST", path, stamp, nonce, body),
            "Content-Type": "application/json"}


def _assert_401(response: httpx.Response, reason: str) -> None:
    assert response.status_code == 401, response.text
    body = response.json()
    assert body["reason"] == reason and body["code"] == entry(reason).code, body
    assert body["fix"]


# SQLite only: the signatures of the machine's requests, not the database.
@SQLITE_ONLY
def test_machine_signed_requests(hub: Hub, tmp_path: Path) -> None:
    state_dir = tmp_path / "agent-signed"
    assert register(hub, state_dir, "m-signed").returncode == 0
    state = StateDir(state_dir)
    reg = state.registration()
    assert reg is not None
    key = state.load_key()
    path = "/v1/agent/heartbeat"
    body = json.dumps({"agent_version": __version__, "heartbeat_interval": 30}).encode()

    with hub.client() as client:  # no token: no Authorization header
        assert "authorization" not in client.headers
        headers = _signed(key, reg.machine_id, path, body)
        first = client.post(path, content=body, headers=headers)
        assert first.status_code == 200, first.text
        assert first.json()["machine_id"] == reg.machine_id
        assert "authorization" not in first.request.headers

        # The very same request again is a replay.
        _assert_401(client.post(path, content=body, headers=headers), "replayed_request")

        # Correctly signed, but stamped 20 minutes ago.
        old = signing.format_time(datetime.now(UTC) - timedelta(minutes=20))
        _assert_401(client.post(path, content=body,
                                headers=_signed(key, reg.machine_id, path, body, old)),
                    "stale_request")

        # Signed with a key that is not the machine's.
        other = Ed25519PrivateKey.generate()
        _assert_401(client.post(path, content=body,
                                headers=_signed(other, reg.machine_id, path, body)),
                    "machine_unknown")

    assert hub.machines()["m-signed"]["last_heartbeat_at"] is not None

    # The agent's own transport: signed, and never a bearer secret on the wire.
    sent: list[httpx.Request] = []

    async def heartbeat_once() -> Any:
        client = reg_mod.client_for(state, reg, Clock())
        client._client.event_hooks["request"] = [_record(sent)]
        try:
            return await client.request("POST", path, {"agent_version": __version__})
        finally:
            await client.aclose()

    assert asyncio.run(heartbeat_once())["machine_id"] == reg.machine_id
    assert len(sent) == 1
    assert "authorization" not in sent[0].headers
    assert sent[0].headers[signing.H_MACHINE] == reg.machine_id
    assert sent[0].headers[signing.H_SIGNATURE]


def _record(sent: list[httpx.Request]) -> Any:
    async def hook(request: httpx.Request) -> None:
        sent.append(request)
    return hook


# --- key rotation -----------------------------------------------------------------------------

def test_secondary_key_keeps_working_when_primary_is_regenerated(
        hub: Hub, tmp_path: Path) -> None:
    secondary = str(hub.init["secondary_key"])
    result = run_cli(*hub.register_args(_fresh_state(tmp_path, "s"), "m-secondary",
                                        key=secondary))
    assert result.returncode == 0, result.stderr

    rotated = hub.cli("account", "keys", hub.account_id, "--regenerate", "primary", "--json")
    assert rotated.returncode == 0, rotated.stderr
    keys = json.loads(rotated.stdout)
    assert keys["primary_key"] != hub.primary_key
    assert keys["secondary_key"] == secondary

    old = run_cli(*hub.register_args(_fresh_state(tmp_path, "o"), "m-old-primary"))
    _assert_refused(old, "bad_signature", FORBIDDEN_TEXT)

    still = run_cli(*hub.register_args(_fresh_state(tmp_path, "s2"), "m-secondary-2",
                                       key=secondary))
    assert still.returncode == 0, still.stderr
    new = run_cli(*hub.register_args(_fresh_state(tmp_path, "n"), "m-new-primary",
                                     key=keys["primary_key"]))
    assert new.returncode == 0, new.stderr
    assert sorted(hub.machines()) == ["m-new-primary", "m-secondary", "m-secondary-2"]


# --- HW-5: outdated agent ---------------------------------------------------------------------

# SQLite only: the version check, before anything is stored.
@SQLITE_ONLY
def test_outdated_agent_is_refused_with_the_versions(new_hub: Hub, tmp_path: Path) -> None:
    new_hub.extra_args = ["--min-agent-version", "99.0"]
    new_hub.start()
    result = register(new_hub, _fresh_state(tmp_path, "old"), "m-old")
    err = _assert_refused(result, "agent_outdated", "The agent is out of date")
    assert "99.0" in err and __version__ in err, err
    assert f"this machine runs {__version__}" in err, err
    assert new_hub.machines() == {}



# --- a captured registration sent again -------------------------------------------------------

class _Recorder:
    """A TLS reverse proxy in front of the hub, with the hub's own certificate (the agent
    pins the hub's CA, which signed it): it passes every request on and keeps a copy."""

    def __init__(self, hub: Hub) -> None:
        import http.server
        import threading

        recorder = self
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _pass(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length", "connection")}
                recorder.seen.append((self.command, self.path, headers, body))
                with hub.client() as client:
                    answer = client.request(self.command, self.path, content=body,
                                            headers=headers)
                self.send_response(answer.status_code)
                for name in ("Content-Type", "X-Outpost-CA-Fingerprint"):
                    if name in answer.headers:
                        self.send_header(name, answer.headers[name])
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = _pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(hub.data_dir / "server.pem", hub.data_dir / "server.key")
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://localhost:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_replayed_registration_is_refused(hub: Hub, tmp_path: Path) -> None:
    """A registration captured on the wire and sent again two seconds later is refused with
    E1009: it neither gives the machine a new id nor locks the real agent out."""
    recorder = _Recorder(hub)  # the agent keeps talking through it
    state = tmp_path / "state-replayed"
    agent = Agent(state, "replayed")
    try:
        args = hub.register_args(state, "replayed")
        args[args.index("--hub") + 1] = recorder.url
        done = run_cli(*args, "--force")
        assert done.returncode == 0, done.stderr
        machine_id = hub.machines()["replayed"]["id"]
        captured = [seen for seen in recorder.seen if seen[1] == "/v1/agent/register"]
        assert len(captured) == 1, recorder.seen
        method, path, headers, body = captured[0]
        assert signing.H_NONCE in headers, headers

        time.sleep(2)
        with hub.client() as client:
            replayed = client.request(method, path, content=body, headers=headers)
        assert replayed.status_code == 401, replayed.text
        answer = replayed.json()
        assert answer["code"] == "E1009" and answer["reason"] == "replayed_request", answer
        assert answer["fix"], answer
        assert hub.machines()["replayed"]["id"] == machine_id  # no new id

        # The real agent still works: its heartbeats are taken.
        agent.start()
        wait_until(lambda: hub.machines()["replayed"]["status"] == "Healthy", 20,
                   what=f"the agent Healthy\n{agent.log()}")
    finally:
        agent.stop()
        recorder.close()

    # A registration without any nonce (an older agent) is refused the same way, saying so.
    unsigned = {k: v for k, v in headers.items() if k.lower() != signing.H_NONCE.lower()}
    stamp = signing.format_time(datetime.now(UTC))
    unsigned[signing.H_DATE] = stamp
    unsigned[signing.H_SIGNATURE] = signing.sign_account(
        signing.unb64(hub.primary_key), "POST", path, stamp, body)
    with hub.client() as client:
        old = client.post(path, content=body, headers=unsigned)
    assert old.status_code == 401 and old.json()["code"] == "E1009", old.text
    assert "no nonce" in old.json()["message"] and "Upgrade" in old.json()["fix"], old.text
    assert hub.machines()["replayed"]["id"] == machine_id
