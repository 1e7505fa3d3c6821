"""``outpost check`` and ``outpost hub check``: each check's fault, made for real.

One hub serves the module (SQLite); the faults that must not touch it (a closed port, a
host name that does not resolve, a foreign CA) point a copy of a registered state directory
at something else through its config file. The healthy-machine test runs on both databases.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from outpost.agent.state import StateDir, write_checked
from outpost.hub import pki
from outpost.protocol.errors import INVALID_HOSTNAME_TEXT
from tests.proxy import connect_proxy
from tests.support import (
    Agent,
    Hub,
    clean_env,
    free_port,
    init_hub,
    registered_agent,
    run_cli,
    small_tmpfs,
    stop_process,
    wait_until,
)

FOREIGN_CA_CN = "Intercepting Proxy CA"


def check(state: Path, *args: str, env: dict[str, str] | None = None,
          prefix: tuple[str, ...] = ()) -> tuple[int, dict[str, Any]]:
    """Run ``outpost check -o json``; (exit code, results by check id, plus 'counts')."""
    cmd = [*prefix, sys.executable, "-m", "outpost", "check", "--state-dir", str(state),
           "--output", "json", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          env=env or clean_env())
    assert done.stdout, done.stderr
    body = json.loads(done.stdout)
    by_id: dict[str, Any] = {c["id"]: c for c in body["checks"]}
    by_id["counts"] = body["counts"]
    assert body["exit_code"] == done.returncode
    return done.returncode, by_id


def hub_check(data_dir: Path, *args: str, env: dict[str, str] | None = None
              ) -> tuple[int, dict[str, Any]]:
    done = run_cli("hub", "check", "--data-dir", str(data_dir), "--output", "json", *args,
                   env=env)
    assert done.stdout, done.stderr
    body = json.loads(done.stdout)
    return done.returncode, {c["id"]: c for c in body["checks"]}


def assert_problem(result: dict[str, Any], outcome: str, code: str, *texts: str) -> None:
    assert result["result"] == outcome, result
    assert result["code"] == code, result
    assert result["fix"], result
    for text in texts:
        assert text in result["details"], result


# --- module fixtures: one hub, one running agent, one registered stopped state --------------
@pytest.fixture(scope="module")
def mhub(module_sqlite_hub: Hub) -> Hub:
    """The module's one running hub (conftest's module_sqlite_hub)."""
    return module_sqlite_hub


@pytest.fixture(scope="module")
def running(mhub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    agent = registered_agent(mhub, tmp_path_factory.mktemp("running"), "running-one")
    agent.start()
    try:
        wait_until(lambda: (agent.status() or {}).get("last_heartbeat_ack_at"), 20,
                   what="a first acknowledged heartbeat")
        yield agent
    finally:
        agent.stop()


@pytest.fixture(scope="module")
def stopped(mhub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registered state directory whose agent is not running."""
    return registered_agent(mhub, tmp_path_factory.mktemp("stopped"), "stopped-one").state_dir


def copy_state(source: Path, tmp_path: Path, config: dict[str, Any] | None = None) -> Path:
    target = tmp_path / "state"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("agent.*", "*.log"))
    if config is not None:
        (target / "agent.yaml").write_text(yaml.safe_dump(config))
    return target


# --- a healthy machine, on both databases -----------------------------------------------------
def test_healthy_machine_passes_every_check(hub: Hub, agents: list[Agent],
                                            tmp_path: Path) -> None:
    # The test machine is shared and often busy: CPU pressure there is not this test's
    # subject (test_no_heartbeat_recently_and_memory_pressure makes pressure on purpose).
    agent = registered_agent(hub, tmp_path, "healthy", max_cpu_percent=100)
    agents.append(agent.start())
    wait_until(lambda: (agent.status() or {}).get("last_heartbeat_ack_at"), 20,
               what="a first acknowledged heartbeat")
    code, res = check(agent.state_dir, "--warnings-as-errors")
    counts = res.pop("counts")
    assert {k: v["result"] for k, v in res.items()} == {k: "ok" for k in res}, res
    assert code == 0 and counts["ok"] == len(res) == 20
    assert "directly" in res["tcp"]["details"]
    assert res["signed-request"]["details"].startswith("accepted as 'healthy'")

    text = run_cli("check", "--state-dir", str(agent.state_dir))
    assert text.returncode == 0, text.stdout + text.stderr
    assert text.stdout.count("[ OK ]") == 20
    assert "20 ok, 0 warnings, 0 errors, 0 skipped" in text.stdout

    code, hres = hub_check(hub.data_dir, "--database-url", hub.database_url)
    assert code == 0 and all(r["result"] == "ok" for r in hres.values()), hres
    assert list(hres) == ["hub-config", "database", "migrations", "tls-certificate", "clock",
                          "disk", "protections", "message-forwarding"]


def test_check_list_names_every_check() -> None:
    done = run_cli("check-list", "--json")
    assert done.returncode == 0, done.stderr
    listing = json.loads(done.stdout)
    assert [c["id"] for c in listing][:4] == ["config", "machine-name", "agent-running",
                                              "registration"]
    assert all(c["looks_at"] for c in listing) and len(listing) == 20
    hub = json.loads(run_cli("check-list", "--hub", "--json").stdout)
    assert "migrations" in [c["id"] for c in hub]


# --- config, name, process, registration ------------------------------------------------------
def test_tab_in_config_names_file_line_and_column(stopped: Path, tmp_path: Path) -> None:
    state = copy_state(stopped, tmp_path)
    (state / "agent.yaml").write_text("heartbeat_interval: 5\nhub_urls:\n\t- https://x:1\n")
    code, res = check(state)
    assert code == 1
    assert_problem(res["config"], "error", "E2002", f"{state / 'agent.yaml'}:3:1", "spaces")
    assert res["dns"]["result"] == "skipped"
    assert "needs 'config'" in res["dns"]["details"], res["dns"]
    assert res["dns"]["skipped_because"] == "config"


def test_seventy_character_name(stopped: Path, tmp_path: Path) -> None:
    state = copy_state(stopped, tmp_path)
    sd = StateDir(state)
    reg = sd.registration()
    assert reg is not None
    reg.name = "n" * 70
    sd.save_registration(reg)
    code, res = check(state)
    assert code == 1
    assert_problem(res["machine-name"], "error", "E1005", INVALID_HOSTNAME_TEXT,
                   "70 characters")


def test_agent_stopped_names_the_start_command(stopped: Path, mhub: Hub) -> None:
    code, res = check(stopped)
    assert code == 1
    assert_problem(res["agent-running"], "error", "E2003", "not running")
    assert f"outpost agent run --state-dir {stopped}" in res["agent-running"]["fix"]
    assert res["heartbeat"]["result"] == "skipped"
    assert "needs 'agent-running'" in res["heartbeat"]["details"]
    # The hub is up: everything that does not need the process passes.
    for name in ("registration", "dns", "tcp", "tls", "clock", "signed-request",
                 "agent-version", "cache"):
        assert res[name]["result"] == "ok", res[name]

    text = run_cli("check", "--state-dir", str(stopped))
    assert text.returncode == 1
    assert "[FAIL] agent-running" in text.stdout and "[SKIP] heartbeat" in text.stdout
    assert "code:  E2003 (agent_not_running)" in text.stdout
    assert "cause: " in text.stdout and "fix:   Start it" in text.stdout


def test_registration_removed_or_corrupt(stopped: Path, tmp_path: Path) -> None:
    state = copy_state(stopped, tmp_path / "a")
    (state / "registration.json").unlink()
    code, res = check(state)  # as 'agent reset-cache' leaves it: the identity stays
    assert code == 1
    assert_problem(res["registration"], "error", "E7001", "missing", "identity.json")
    assert "fetches the registration again" in res["registration"]["fix"]
    (state / "identity.json").unlink()
    code, res = check(state)
    assert code == 1
    assert_problem(res["registration"], "error", "E1011", "No registration")
    assert res["tls"]["result"] == "skipped"

    state = copy_state(stopped, tmp_path / "b")
    path = state / "registration.json"
    path.write_text(path.read_text().replace('"group": "web"', '"group": "wxb"'))
    code, res = check(state)
    assert code == 1
    assert_problem(res["registration"], "error", "E7001", "checksum")
    assert_problem(res["cache"], "error", "E7002", "registration.json")


def test_corrupt_cache_file_and_corrupt_key(stopped: Path, tmp_path: Path) -> None:
    state = copy_state(stopped, tmp_path / "a")
    sd = StateDir(state)
    write_checked(sd.hub_cache_path, {"min_agent_version": "0.1.0"})
    data = sd.hub_cache_path.read_bytes()
    sd.hub_cache_path.write_bytes(data[: len(data) // 2])  # a torn write
    code, res = check(state)
    assert code == 1
    assert_problem(res["cache"], "error", "E7002", "hub.json")
    assert res["registration"]["result"] == "ok"

    state = copy_state(stopped, tmp_path / "b")
    (state / "machine.key").write_text("garbage\n")
    code, res = check(state)
    assert code == 1
    assert_problem(res["registration"], "error", "E1013", "machine.key")
    assert_problem(res["cache"], "error", "E1013")


# --- the network path -------------------------------------------------------------------------
def test_hub_name_that_does_not_resolve(stopped: Path, tmp_path: Path) -> None:
    state = copy_state(stopped, tmp_path, {"hub_urls": ["https://hub.outpost.invalid:8443"]})
    code, res = check(state)
    assert code == 1
    assert_problem(res["dns"], "error", "E2004", "hub.outpost.invalid")
    assert res["tcp"]["result"] == "skipped"


def test_hub_port_closed(stopped: Path, tmp_path: Path) -> None:
    port = free_port()
    state = copy_state(stopped, tmp_path, {"hub_urls": [f"https://localhost:{port}"]})
    code, res = check(state)
    assert code == 1
    assert_problem(res["tcp"], "error", "E2004", f"localhost:{port}", "refused")
    assert res["tcp"]["data"]["kind"] == "refused"
    for name in ("tls", "clock", "signed-request", "agent-version"):
        assert res[name]["result"] == "skipped", res[name]


def test_tcp_goes_through_the_proxy_the_agent_uses(stopped: Path, mhub: Hub,
                                                   tmp_path: Path) -> None:
    with connect_proxy() as proxy:
        state = copy_state(stopped, tmp_path / "a", {"proxy": proxy.url})
        code, res = check(state)
        assert res["tcp"]["result"] == "ok", res["tcp"]
        assert "through the proxy" in res["tcp"]["details"]
        assert res["tls"]["result"] == "ok" and res["signed-request"]["result"] == "ok"
        assert any(t.endswith(f":{mhub.port}") for t in proxy.tunnels)
        # HTTPS_PROXY from the environment, as the daemon's client reads it.
        before = len(proxy.tunnels)
        code, res = check(stopped, env=clean_env(HTTPS_PROXY=proxy.url))
        assert "through the proxy" in res["tcp"]["details"], res["tcp"]
        assert len(proxy.tunnels) > before
    with connect_proxy(refuse=True) as proxy:
        state = copy_state(stopped, tmp_path / "b", {"proxy": proxy.url})
        code, res = check(state)
        assert code == 1
        assert_problem(res["tcp"], "error", "E2004", "refused to connect", "403")
        assert res["tcp"]["data"]["kind"] == "proxy"


@pytest.fixture
def foreign_tls_server(tmp_path: Path) -> Iterator[int]:
    """A TLS server on loopback whose certificate comes from a CA that is not the hub's."""
    ca, ca_key = tmp_path / "foreign-ca.pem", tmp_path / "foreign-ca.key"
    cert, key = tmp_path / "foreign.pem", tmp_path / "foreign.key"
    pki.create_ca(FOREIGN_CA_CN, ca, ca_key)
    pki.create_server_cert(ca, ca_key, [], cert, key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.settimeout(2)
                    tls.recv(1024)
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_foreign_ca_names_the_issuer_seen(stopped: Path, mhub: Hub, tmp_path: Path,
                                          foreign_tls_server: int) -> None:
    state = copy_state(stopped, tmp_path,
                       {"hub_urls": [f"https://localhost:{foreign_tls_server}"]})
    code, res = check(state)
    assert code == 1
    assert_problem(res["tls"], "error", "E1006", f"CN={FOREIGN_CA_CN}", mhub.fingerprint,
                   "proxy may be intercepting TLS")
    assert res["clock"]["result"] == "skipped"


def test_clock_skew_warns_at_five_minutes_and_fails_at_twenty(running: Agent) -> None:
    code, res = check(running.state_dir, env=clean_env(OUTPOST_TEST_CLOCK_SKEW="300"))
    assert_problem(res["clock"], "warning", "E1003", "ahead")
    assert 290 < res["clock"]["data"]["skew_seconds"] < 310
    assert res["signed-request"]["result"] == "ok"  # within the hub's window
    assert code == 0, res  # warnings alone pass...
    code, _ = check(running.state_dir, "--warnings-as-errors",
                    env=clean_env(OUTPOST_TEST_CLOCK_SKEW="300"))
    assert code == 1  # ...unless asked otherwise

    code, res = check(running.state_dir, env=clean_env(OUTPOST_TEST_CLOCK_SKEW="-1200"))
    assert code == 1
    assert_problem(res["clock"], "error", "E1003", "behind", "15 minutes")
    # The refusal shows the hub's reason.
    assert_problem(res["signed-request"], "error", "E1010", "refused", "stale_request")


def test_wrong_machine_key_is_refused(stopped: Path, tmp_path: Path) -> None:
    state = copy_state(stopped, tmp_path)
    StateDir(state).new_key()  # a well-formed key the hub does not know
    code, res = check(state)
    assert code == 1
    assert res["registration"]["result"] == "ok"
    assert_problem(res["signed-request"], "error", "E1008", "refused", "machine_unknown")


def test_agent_older_than_the_hub_minimum(tmp_path: Path) -> None:
    hub = init_hub(tmp_path / "hub", f"sqlite:///{tmp_path / 'hub.db'}")
    try:
        hub.start()
        state = registered_agent(hub, tmp_path, "old-one").state_dir
        hub.stop()
        hub.extra_args = ["--min-agent-version", "99.0"]
        hub.start()
        code, res = check(state)
    finally:
        hub.stop()
    assert code == 1
    assert_problem(res["agent-version"], "error", "E1007", "99.0", "out of date")
    assert_problem(res["signed-request"], "error", "E1007")


# --- the running agent: heartbeat and pressure -----------------------------------------------
def test_no_heartbeat_recently_and_memory_pressure(stopped: Path, tmp_path: Path) -> None:
    """An agent whose hub port is closed heartbeats into the void; its memory threshold is
    set below what the machine uses, so its own backpressure says it takes no work."""
    port = free_port()
    state = copy_state(stopped, tmp_path)
    agent = Agent(state, "stopped-one", {"heartbeat_interval": 1, "max_memory_percent": 1,
                                         "max_cpu_percent": 100,
                                         "pressure_seconds": 0,
                                         "hub_urls": [f"https://localhost:{port}"]})
    agent.start()
    try:
        status = wait_until(lambda: (agent.status() or {}).get("uptime_seconds", 0) > 6
                            and agent.status(), 20, 0.3, "the agent to run 6 s")
        assert status and status["last_error"]["code"] == "E2004"
        code, res = check(state)
    finally:
        agent.stop()
    assert code == 1
    assert res["agent-running"]["result"] == "ok"
    assert_problem(res["heartbeat"], "error", "E2004", "never", "hub could not be reached")
    assert_problem(res["pressure"], "warning", "E7005", "memory", "threshold")
    assert res["tcp"]["data"]["kind"] == "refused"


def test_too_few_cpus_is_a_warning(running: Agent) -> None:
    if not shutil.which("taskset"):
        pytest.skip("taskset is not installed")
    code, res = check(running.state_dir, prefix=("taskset", "-c", "0"))
    assert_problem(res["hardware"], "warning", "E7004", "1 CPU(s)", "fewer than 2 CPUs")
    assert code == 0, res
    code, _ = check(running.state_dir, "--warnings-as-errors", prefix=("taskset", "-c", "0"))
    assert code == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="job users are a root agent's")
def test_a_root_agent_that_runs_runbooks_as_root_is_a_warning(
        mhub: Hub, tmp_path: Path) -> None:
    agent = registered_agent(mhub, tmp_path, "as-root", job_users=False)
    agent.start()
    try:
        wait_until(lambda: (agent.status() or {}).get("last_heartbeat_ack_at"), 20,
                   what="a first acknowledged heartbeat")
        code, res = check(agent.state_dir)
        assert_problem(res["sandbox"], "warning", "E7010", "runbooks run as root")
        assert code == 0, res
    finally:
        agent.stop()


# --- local resources: ports and disk ---------------------------------------------------------
def test_status_socket_held_by_another_process(stopped: Path, tmp_path: Path) -> None:
    state = copy_state(stopped, tmp_path)
    address = StateDir(state).socket_address
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import socket,sys,time; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); "
         "s.listen(); print('ready', flush=True); time.sleep(60)", address],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        code, res = check(state)
    finally:
        stop_process(holder)
        if holder.stdout is not None:
            holder.stdout.close()
    assert code == 1
    assert_problem(res["ports"], "error", "E2005", "port is already allocated",
                   f"pid {holder.pid}", "not an Outpost agent")
    assert res["agent-running"]["result"] == "error"


def test_full_disk_under_the_state_dir(stopped: Path, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", "1m") as mount:
        state = mount / "state"
        shutil.copytree(stopped, state, ignore=shutil.ignore_patterns("agent.*", "*.log"))
        code, res = check(state)
    assert code == 1
    assert_problem(res["disk"], "error", "E7006", "MB free")


# --- outpost hub check ------------------------------------------------------------------------
def _expiring_cert(hub_dir: Path, path: Path, days: float) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ca = x509.load_pem_x509_certificate((hub_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((hub_dir / "ca.key").read_bytes(), None)
    server = x509.load_pem_x509_certificate((hub_dir / "server.pem").read_bytes())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(server.subject).issuer_name(ca.subject)
            .public_key(server.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=days))
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_hub_check_faults(mhub: Hub, tmp_path: Path) -> None:
    data = mhub.data_dir
    url = mhub.database_url
    # A certificate from the hub's CA with 10 days left: a warning, exit 0.
    _expiring_cert(data, tmp_path / "soon.pem", 10)
    code, res = hub_check(data, "--database-url", url, "--tls-cert", str(tmp_path / "soon.pem"))
    assert_problem(res["tls-certificate"], "warning", "E7008", "in 10 days")
    assert code == 0, res
    # One from another CA: agents would refuse it.
    pki.create_ca(FOREIGN_CA_CN, tmp_path / "f-ca.pem", tmp_path / "f-ca.key")
    pki.create_server_cert(tmp_path / "f-ca.pem", tmp_path / "f-ca.key", [],
                           tmp_path / "f.pem", tmp_path / "f.key")
    code, res = hub_check(data, "--database-url", url, "--tls-cert", str(tmp_path / "f.pem"))
    assert code == 1
    assert_problem(res["tls-certificate"], "error", "E7009", FOREIGN_CA_CN)
    # The clock 20 minutes off the database's.
    code, res = hub_check(data, "--database-url", url,
                          env=clean_env(OUTPOST_TEST_CLOCK_SKEW="1200"))
    assert code == 1
    assert_problem(res["clock"], "error", "E1003", "1200 s apart")
    # Nothing listens where the database should be.
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/outpost"
    code, res = hub_check(data, "--database-url", dead)
    assert code == 1
    assert_problem(res["database"], "error", "E3007", "could not be reached")
    assert res["migrations"]["result"] == "skipped" and res["clock"]["result"] == "skipped"
    # Not a hub directory at all.
    code, res = hub_check(tmp_path / "nowhere")
    assert code == 1
    assert_problem(res["hub-config"], "error", "E3005", "not initialised")


def test_hub_check_finds_a_database_behind_its_migrations(mhub: Hub, tmp_path: Path) -> None:
    import sqlalchemy as sa
    from alembic import command

    from outpost.hub import db

    old = tmp_path / "old.db"
    engine = sa.create_engine(f"sqlite:///{old}")
    with engine.begin() as conn:
        command.upgrade(db._alembic_config(conn), "0004")
    engine.dispose()
    code, res = hub_check(mhub.data_dir, "--database-url", f"sqlite:///{old}")
    assert code == 1
    assert_problem(res["migrations"], "error", "E7007", "revision 0004")
    assert res["database"]["result"] == "ok"
    time.sleep(0)  # the database file stays as it was: the check only reads
    code, res = hub_check(mhub.data_dir, "--database-url", f"sqlite:///{tmp_path / 'no.db'}")
    assert_problem(res["database"], "error", "E3007", "does not exist")
    assert not (tmp_path / "no.db").exists()
