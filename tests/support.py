"""Helpers for tests that run real hub and agent processes over real HTTPS."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from tests import zygote

T = TypeVar("T")
OUTPOST = [sys.executable, "-m", "outpost"]
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"

# A test whose subject is not what the database does (the sandbox, the agent's processes, the
# CLI's output, validation before anything is stored) runs on SQLite only: the hub's fixture
# is ``hub``/``new_hub``/``database_url`` (SQLITE_ONLY) or ``module_hub``
# (MODULE_HUB_SQLITE_ONLY). Each use says why in a comment; what the database does (claims,
# leases, conditional updates, catalogs, migrations...) is tested on both.
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
MODULE_HUB_SQLITE_ONLY = pytest.mark.parametrize("module_hub", ["sqlite"], indirect=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_CONFIG_ROOT: Path | None = None


def config_home() -> str:
    """A fresh XDG_CONFIG_HOME (not created until a command writes a profile there). Pass it
    to several calls, ``clean_env(XDG_CONFIG_HOME=home)``, for them to share profiles."""
    global _CONFIG_ROOT
    if _CONFIG_ROOT is None:
        _CONFIG_ROOT = Path(tempfile.mkdtemp(prefix="outpost-test-config-"))
        atexit.register(shutil.rmtree, _CONFIG_ROOT, True)
    return str(_CONFIG_ROOT / uuid.uuid4().hex)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a command under test: no OUTPOST_* variable, no proxy, and its own
    empty config directory (never the user's ~/.config), unless ``extra`` names one."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("OUTPOST_") and k.lower() not in (
               "http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    env["PYTHONUNBUFFERED"] = "1"
    env["XDG_CONFIG_HOME"] = config_home()
    env.update(extra)
    return env


# A process a test started: a plain subprocess, or a child of the test process's zygote
# (tests/zygote.py), which offers what the tests use of Popen.
Proc = subprocess.Popen[bytes] | zygote.Process


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    """``outpost ARGS``, its output captured as text: forked from the zygote when it may be
    (tests/zygote.py; ``OUTPOST_TEST_ZYGOTE=0``: always ``subprocess.run``)."""
    return zygote.run([*OUTPOST, *args], env=env or clean_env(), timeout=timeout, input=input)


def wait_until(check: Callable[[], T], timeout: float = 10.0, interval: float = 0.05,
               what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
            last = result
        except Exception as exc:  # the thing waited for may not answer yet
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


def stop_process(proc: subprocess.Popen[Any] | zygote.Process | None,
                 sig: int = signal.SIGTERM,
                 timeout: float = 10.0) -> int | None:
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@dataclass
class Hub:
    data_dir: Path
    port: int
    database_url: str
    init: dict[str, Any]
    proc: Proc | None = None
    extra_args: list[str] = field(default_factory=list)
    log_name: str = "hub-test.log"
    # The clients ``api`` reads with (GET), kept open between calls: a wait that polls the
    # hub every 50 ms would otherwise pay for a client, a TLS handshake and a connection on
    # both sides each time (about 3.5 ms of CPU against 1.3 ms). One per token and thread.
    _readers: dict[tuple[str, int], httpx.Client] = field(default_factory=dict, repr=False,
                                                          compare=False)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def replica(self, port: int | None = None) -> Hub:
        """Another hub process (not started yet) on the same database and data directory
        (so the same CA, vault key and accounts), on a port of its own, with its own log."""
        port = port or free_port()
        return Hub(self.data_dir, port, self.database_url, self.init,
                   extra_args=list(self.extra_args), log_name=f"hub-test-{port}.log")

    @property
    def fingerprint(self) -> str:
        return str(self.init["ca_fingerprint"])

    @property
    def account_id(self) -> str:
        return str(self.init["account_id"])

    @property
    def primary_key(self) -> str:
        return str(self.init["primary_key"])

    @property
    def admin_token(self) -> str:
        return str(self.init["admin_token"])

    @property
    def log_path(self) -> Path:
        return self.data_dir / self.log_name

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 30.0) -> Hub:
        args = [*OUTPOST, "hub", "run", "--data-dir", str(self.data_dir), "--bind",
                f"127.0.0.1:{self.port}", "--database-url", self.database_url, *self.extra_args]
        with self.log_path.open("ab") as fh:
            self.proc = zygote.spawn(args, stdout=fh, stderr=subprocess.STDOUT,
                                     env=clean_env())
        wait_until(self._ready, timeout, 0.05, f"the hub on port {self.port}:\n{self.log()}")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"the hub exited with {self.proc.returncode}:\n{self.log()}")
        with self.client() as client:
            return client.get("/healthz", timeout=2).status_code == 200

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        self.close_readers()
        return stop_process(self.proc, sig)

    def close_readers(self) -> None:
        """Close the connections ``api`` keeps for its GETs (a stopped hub's are dead)."""
        readers, self._readers = self._readers, {}
        for client in readers.values():
            client.close()

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.data_dir / "ca.pem"))

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, verify=self.ssl_context(), headers=headers,
                            timeout=30)

    def api(self, method: str, path: str, token: str | None = None, **kw: Any) -> httpx.Response:
        """One request as ``token`` (the admin's by default). A GET goes over a connection
        kept from the last one (``_readers``), and is sent once more on a new one if that
        connection turns out closed (the hub restarted, or a replica took the port); any
        other method gets a client and a connection of its own, as a CLI command would."""
        token = token or self.admin_token
        if method.upper() != "GET":
            with self.client(token) as client:
                return client.request(method, path, **kw)
        key = (token, threading.get_ident())
        reader = self._readers.get(key)
        if reader is not None:
            try:
                return reader.request(method, path, **kw)
            except (httpx.NetworkError, httpx.RemoteProtocolError):
                reader.close()
        # Idle connections are dropped after 5 s, long before the hub's keep-alive (75 s)
        # could close one under a request.
        reader = self._readers[key] = httpx.Client(
            base_url=self.url, verify=self.ssl_context(), timeout=30,
            headers={"Authorization": f"Bearer {token}"},
            limits=httpx.Limits(max_connections=1, keepalive_expiry=5))
        return reader.request(method, path, **kw)

    def cli(self, *args: str, token: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """An operator command against this hub, connected by URL, token and fingerprint."""
        return run_cli(*args, "--hub", self.url, "--token", token or self.admin_token,
                       "--ca-fingerprint", self.fingerprint, timeout=timeout)

    def register_args(self, state_dir: Path, name: str, group: str = "web",
                      key: str | None = None) -> list[str]:
        return ["agent", "register", "--hub", self.url, "--account-id", self.account_id,
                "--account-key", key or self.primary_key, "--group", group,
                "--ca-fingerprint", self.fingerprint, "--name", name,
                "--state-dir", str(state_dir)]

    def machines(self, token: str | None = None) -> dict[str, dict[str, Any]]:
        response = self.api("GET", "/v1/machines", token)
        assert response.status_code == 200, response.text
        return {m["name"]: m for m in response.json()}


_SQLITE_TEMPLATE: Path | None = None


def migrate_outside_loop(migrate_sync: Callable[[str], None], url: str) -> None:
    """``db.migrate_sync(url)`` (which runs its own event loop) in a thread of its own, so
    that a fixture of an async test, inside the test's loop, may call it too."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        pool.submit(migrate_sync, url).result()


def migrated_sqlite(path: Path) -> str:
    """A SQLite database at ``path`` at the newest revision, empty (no account seeded): a
    copy of one this test process migrated once, as the hub's own migrations leave it. A
    hub started on it finds the schema current and only seeds its account, so a test pays
    for a file copy instead of the migrations (about 0.3 s of CPU in the hub's process).
    Returns its URL. The hub's migrations of an empty database are tested by the hubs that
    start on one (``module_hub``, test_schema.py, test_hub.py's init)."""
    global _SQLITE_TEMPLATE
    import sqlite3

    if _SQLITE_TEMPLATE is None:
        from outpost.hub import db

        root = Path(tempfile.mkdtemp(prefix="outpost-test-template-"))
        atexit.register(shutil.rmtree, root, True)
        migrate_outside_loop(db.migrate_sync, f"sqlite:///{root / 'template.db'}")
        _SQLITE_TEMPLATE = root / "template.db"
    assert not path.exists(), path
    path.parent.mkdir(parents=True, exist_ok=True)
    # The backup API copies a consistent image whatever the journal holds.
    with contextlib.closing(sqlite3.connect(_SQLITE_TEMPLATE)) as src, \
            contextlib.closing(sqlite3.connect(path)) as dst:
        src.backup(dst)
    return f"sqlite:///{path}"


def init_hub(data_dir: Path, database_url: str, port: int | None = None,
             extra_args: list[str] | None = None) -> Hub:
    """An initialised hub data directory (not started), made by the function behind
    ``outpost hub init`` in this process: the command itself is tested in test_hub.py, and
    here it would cost a Python process (about 1 s of CPU) for every hub of the suite. Its
    default SQLite database is at the newest revision as the command leaves it (``hub check``
    reads it; a copy of a migrated one, ``migrated_sqlite``); the CLI profile the command
    writes is left out (no test reads it through this helper)."""
    from outpost.hub import config as hub_config

    port = port or free_port()
    result = hub_config.init(data_dir, [], bind=f"127.0.0.1:{port}")
    assert result.created, f"{data_dir} was initialised already"
    default = hub_config.load_config(hub_config.HubPaths(data_dir)).database_url
    assert default.startswith("sqlite:///"), default
    migrated_sqlite(Path(default[len("sqlite:///"):]))
    return Hub(data_dir, port, database_url, result.to_json(), extra_args=extra_args or [])


@dataclass
class Agent:
    state_dir: Path
    name: str
    # No CPU reading exceeds 100 %: a busy test machine (several workers on 2 cores is at
    # 100 % for minutes) must not hold back jobs or extension operations with pressure: true
    # (the backup snapshot); the tests of backpressure set their own thresholds.
    config: dict[str, Any] = field(default_factory=lambda: {"heartbeat_interval": 1,
                                                            "max_cpu_percent": 100})
    proc: Proc | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def log_path(self) -> Path:
        return self.state_dir / "agent-test.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def write_config(self) -> Path:
        import yaml

        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / "agent.yaml"
        path.write_text(yaml.safe_dump(self.config))
        return path

    def start(self) -> Agent:
        """The daemon, started as ``outpost agent run --state-dir S --config C`` leaves it:
        that command replaces itself (same pid, same arguments) with ``python -m
        outpost.cli.agentd``, started here directly so each agent does not pay for a CLI
        process first (about 0.25 s of CPU). The command itself runs in test_cache.py and
        test_logs.py."""
        config = self.write_config()
        with self.log_path.open("ab") as fh:
            self.proc = zygote.spawn(
                [sys.executable, "-m", "outpost.cli.agentd", "--state-dir", str(self.state_dir),
                 "--config", str(config)], stdout=fh, stderr=subprocess.STDOUT,
                env=clean_env(**self.env))
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        return stop_process(self.proc, sig)

    def status(self) -> dict[str, Any] | None:
        """What ``outpost agent status --json`` prints of a running agent, or None when it is
        not running. Read from the agent's status socket in this process, by the function
        behind the command (tests wait on it often; a command would cost a Python process
        each time): the command itself is tested in test_agent_daemon.py."""
        from outpost.agent.daemon import read_status
        from outpost.agent.state import StateDir

        info = read_status(StateDir(self.state_dir))
        if info is not None:
            info["running"] = True
        return info


def register(hub: Hub, state_dir: Path, name: str, group: str = "web",
             *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*hub.register_args(state_dir, name, group), *extra)


def registered_agent(hub: Hub, tmp: Path, name: str, group: str = "web",
                     **config: Any) -> Agent:
    """An agent registered (not started) in state directory ``tmp/agent-NAME``.

    Registered by the function behind ``outpost agent register`` in this process, over the
    hub's real HTTPS with its CA pinned: the command itself is tested through the CLI
    (``register``), and here it would cost a Python process for every agent of the suite."""
    import asyncio

    from outpost.agent.registration import RegisterOptions
    from outpost.agent.registration import register as register_machine
    from outpost.agent.state import StateDir
    from outpost.agent.transport import Clock

    state = tmp / f"agent-{name}"
    asyncio.run(register_machine(StateDir(state), RegisterOptions(
        hub=hub.url, account_id=hub.account_id, account_key=hub.primary_key, group=group,
        ca_fingerprint=hub.fingerprint, name=name), Clock()))
    agent = Agent(state, name)
    agent.config.update(config)
    return agent


def machine_calls(hub: Hub, state_root: Path, name: str = "m1",
                  urls: list[str] | None = None, group: str = "web") -> Callable[..., Any]:
    """Register machine ``name`` (in ``group``) for real and return ``call(method, path,
    payload=None)``, which sends one request signed with its own key (no agent daemon: the
    test decides exactly what the machine says) to ``hub``, or to ``urls`` (other
    replicas)."""
    import asyncio

    from outpost.agent.registration import RegisterOptions, client_for
    from outpost.agent.registration import register as register_machine
    from outpost.agent.state import StateDir
    from outpost.agent.transport import Clock

    state = StateDir(state_root)
    # Registered in this process, as registered_agent does (the command is tested through
    # the CLI in test_registration.py).
    asyncio.run(register_machine(state, RegisterOptions(
        hub=hub.url, account_id=hub.account_id, account_key=hub.primary_key, group=group,
        ca_fingerprint=hub.fingerprint, name=name), Clock()))
    reg = state.registration()
    assert reg is not None

    def call(method: str, path: str, payload: Any = None) -> Any:
        async def once() -> Any:
            client = client_for(state, reg, Clock(), urls=urls)
            try:
                return await client.request(method, path, payload)
            finally:
                await client.aclose()
        return asyncio.run(once())
    return call


@contextmanager
def shared_dir() -> Iterator[Path]:
    """A directory every user may write (1777, under /var/tmp), removed after: a root agent
    runs runbooks as its unprivileged job users, who cannot reach the test's private
    temporary directory, so what a test and its runbooks share goes here."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="outpost-test-shared-", dir="/var/tmp"))
    os.chmod(path, 0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def small_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (such as "1m") mounted at ``mount`` for the test, unmounted after;
    the test is skipped, saying why, where mounting is not allowed."""

    mount.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def publish_script(hub: Hub, tmp_path: Path, name: str, body: str, *extra: str) -> None:
    """Publish a bash runbook: through the CLI with ``extra`` publish options, otherwise
    with the request ``runbook publish`` sends (a test that needs a runbook need not pay
    for a CLI process; the command itself is tested in test_runbooks.py)."""
    script = tmp_path / f"{name}.sh"
    script.write_text("#!/bin/bash\n" + body)
    if extra:
        done = hub.cli("runbook", "publish", name, str(script), *extra)
        assert done.returncode == 0, done.stderr
        return
    stored = hub.api("POST", "/v1/runbooks", json={
        "name": name, "content": script.read_text(), "type": None, "filename": script.name,
        "description": "", "params": [], "log_verbose": False, "log_progress": False})
    assert stored.status_code in (200, 201), stored.text


def healthy_agent(hub: Hub, tmp_path: Path, agents: list[Agent], name: str = "w1",
                  **config: Any) -> Agent:
    """A registered agent, started (and added to ``agents`` to be stopped) and Healthy."""
    agent = registered_agent(hub, tmp_path, name, **config)
    agents.append(agent.start())
    wait_until(lambda: hub.machines()[name]["status"] == "Healthy", 15, what=f"{name} healthy")
    return agent


def shell(cmd: str) -> str:
    return shlex.quote(cmd)


def query(database_url: str, sql: str) -> list[tuple[Any, ...]]:
    """Rows of one SQL query against a hub's database, SQLite or PostgreSQL."""
    if database_url.startswith("sqlite:///"):
        import sqlite3

        conn = sqlite3.connect(database_url[len("sqlite:///"):])
        try:
            return list(conn.execute(sql).fetchall())
        finally:
            conn.close()
    import psycopg

    with psycopg.connect(database_url) as pg:
        return list(pg.execute(sql).fetchall())  # type: ignore[arg-type]


def last_beat(hub: Hub, name: str) -> float:
    """When the hub last heard a heartbeat from machine ``name`` (0 if never)."""
    return float(hub.machines()[name]["last_heartbeat_at"] or 0)


def claimed_job(hub: Hub, call: Any, group: str = "web") -> str:
    """A no-op job queued on ``hub`` in ``group`` and claimed by the machine that ``call``
    speaks for (machine_calls, registered in that group)."""
    published = hub.api("POST", "/v1/runbooks", json={"name": "noop", "type": "bash",
                                                      "content": "true"})
    # 200: a hub shared by several tests has it already, unchanged.
    assert published.status_code in (200, 201), published.text
    job = hub.api("POST", "/v1/jobs", json={"runbook": "noop", "group": group})
    assert job.status_code == 201, job.text
    items = call("POST", "/v1/agent/poll?wait=0&capacity=1")["items"]
    assert [i["payload"]["job_id"] for i in items] == [job.json()["id"]]
    return str(job.json()["id"])


def loaded_modules(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys\n"
         "print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, timeout=60, env=clean_env())
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))
