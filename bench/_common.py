"""What the job benchmarks share: a real hub and agent on 127.0.0.1, a database per run,
submitting with httpx, percentiles, a time bound and clean-up of every process started."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.support import (  # noqa: E402
    PG_ADMIN,
    Agent,
    Hub,
    init_hub,
    query,
    registered_agent,
    stop_process,
    wait_until,
)

HOOK_DIR = Path(__file__).resolve().parent / "_hook"
MB = 1024 * 1024
__all__ = ["Agent", "Hub", "query", "wait_until"]


class TimeBound(Exception):
    """The benchmark ran past its --max-seconds."""


def time_bound(seconds: float) -> None:
    """Raise TimeBound in the main thread after ``seconds``; the finally blocks clean up."""
    def expire(_sig: int, _frame: Any) -> None:
        raise TimeBound(f"stopped after the {seconds:g} s time bound")

    signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def cancel_time_bound() -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)


@contextlib.contextmanager
def database(kind: str, root: Path) -> Iterator[str]:
    """A fresh database URL: a SQLite file, or a PostgreSQL database dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{root / 'hub.db'}"
        return
    import psycopg

    name = f"outpost_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Hooks:
    """Benchmark-only instrumentation of the hub and agent processes (bench/_hook)."""

    trace: Path | None = None
    uvloop: set[str] = field(default_factory=set)  # roles: "hub", "agent"
    nodelay: set[str] = field(default_factory=set)  # roles: "hub", "agent"
    sniffio: set[str] = field(default_factory=set)  # roles: "hub", "agent"
    cprofile: Path | None = None  # a directory: hub.prof and agent.prof
    sqlite_pool: int = 0  # the hub's SQLite connections (0: as src/ makes them)
    sqltime: Path | None = None  # a file: the hub's SQL statements, counted and timed
    stalls: Path | None = None  # a file: the hub's event-loop turns of 50 ms+, with stacks

    def env(self, role: str) -> dict[str, str]:
        env: dict[str, str] = {}
        if self.trace:
            env["BENCH_TRACE"] = str(self.trace)
        if role in self.uvloop:
            env["BENCH_UVLOOP"] = "1"
        if role in self.nodelay:
            env["BENCH_NODELAY"] = "1"
        if role in self.sniffio:
            env["BENCH_SNIFFIO"] = "1"
        if self.sqlite_pool and role == "hub":
            env["BENCH_SQLITE_POOL"] = str(self.sqlite_pool)
        if self.sqltime and role == "hub":
            env["BENCH_SQLTIME"] = str(self.sqltime)
        if self.stalls and role == "hub":
            env["BENCH_STALLS"] = str(self.stalls)
        if self.cprofile:
            env["BENCH_CPROFILE"] = str(self.cprofile / f"{role}.prof")
        if env:
            env["BENCH_ROLE"] = role
            path = os.environ.get("PYTHONPATH")
            env["PYTHONPATH"] = str(HOOK_DIR) + (os.pathsep + path if path else "")
        return env


@dataclass
class Stack:
    hub: Hub
    agent: Agent
    database_url: str

    @property
    def agent_pid(self) -> int:
        assert self.agent.proc is not None
        return self.agent.proc.pid

    @property
    def hub_pid(self) -> int:
        assert self.hub.proc is not None
        return self.hub.proc.pid


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _stop(proc: subprocess.Popen[Any] | None) -> None:
    """Stop one process we started, then any of its descendants left behind."""
    if proc is None:
        return
    left = _descendants(proc.pid)
    stop_process(proc, timeout=15)
    for child in left:
        with contextlib.suppress(psutil.Error):
            child.kill()


@contextlib.contextmanager
def stack(root: Path, database_url: str, hooks: Hooks | None = None,
          **agent_config: Any) -> Iterator[Stack]:
    """A running hub on ``database_url`` and one Healthy agent of group 'web'."""
    hooks = hooks or Hooks()
    hub = init_hub(root / "hub", database_url)
    agent: Agent | None = None
    saved = dict(os.environ)
    try:
        os.environ.update(hooks.env("hub"))  # Hub.start passes the environment on
        try:
            hub.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        agent = registered_agent(hub, root, "bench", heartbeat_interval=5, **agent_config)
        agent.env.update(hooks.env("agent"))
        agent.start()
        wait_until(lambda: hub.machines()["bench"]["status"] == "Healthy", 30,
                   what="the agent to be Healthy")
        yield Stack(hub, agent, database_url)
    finally:
        if agent is not None:
            _stop(agent.proc)
        _stop(hub.proc)


def publish(hub: Hub, name: str, content: str, kind: str = "bash") -> None:
    response = hub.api("POST", "/v1/runbooks", json={"name": name, "content": content,
                                                     "type": kind})
    assert response.status_code == 201, response.text


async def submit_noops(st: Stack, count: int, clients: int, batch: int = 1
                       ) -> tuple[list[str], float, float]:
    """Queue ``count`` jobs of the published runbook ``noop`` on group ``web`` from
    ``clients`` concurrent httpx connections, ``batch`` a request (above 1 through
    POST /v1/jobs/batch): (their ids, first sent, last answered)."""
    import asyncio
    import itertools

    import httpx

    ids: list[str] = []
    todo = iter(range(count))
    first: list[float] = []
    job = {"runbook": "noop", "group": "web"}

    async def worker(client: httpx.AsyncClient) -> None:
        while chunk := list(itertools.islice(todo, batch)):
            first.append(time.time())
            if batch == 1:
                response = await client.post("/v1/jobs", json=job)
            else:
                response = await client.post("/v1/jobs/batch", json={"jobs": [job] * len(chunk)})
            if response.status_code != 201:
                raise RuntimeError(f"submit refused: {response.status_code} {response.text}")
            answer = response.json()
            ids.extend([answer["id"]] if batch == 1 else [j["id"] for j in answer["jobs"]])

    async with httpx.AsyncClient(base_url=st.hub.url, verify=st.hub.ssl_context(),
                                 headers={"Authorization": f"Bearer {st.hub.admin_token}"},
                                 timeout=60, limits=httpx.Limits(max_connections=clients)
                                 ) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    return ids, min(first), time.time()


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def py_spy(pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes] | None:
    """Sample one process with py-spy (all threads, raw collapsed stacks), if installed."""
    exe = Path(sys.executable).parent / "py-spy"
    if not exe.exists():
        print(f"  (py-spy is not installed in {exe.parent}; no profile)")
        return None
    return subprocess.Popen(
        [str(exe), "record", "--pid", str(pid), "--rate", "500", "--format", "raw",
         "--threads", "--nonblocking", "--duration", str(int(seconds)), "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def finish_py_spy(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None:
        stop_process(proc, signal.SIGINT, timeout=30)


def elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


class Cpu:
    """CPU seconds used by the hub, the agent, and the agent's reaped children (runbooks)."""

    def __init__(self, st: Stack) -> None:
        self.hub = psutil.Process(st.hub_pid)
        self.agent = psutil.Process(st.agent_pid)
        self.start = self._read()

    def _read(self) -> tuple[float, float, float]:
        h, a = self.hub.cpu_times(), self.agent.cpu_times()
        return (h.user + h.system, a.user + a.system, a.children_user + a.children_system)

    def used(self) -> tuple[float, float, float]:
        end = self._read()
        return (end[0] - self.start[0], end[1] - self.start[1], end[2] - self.start[2])


def file_cost_us(directory: Path | None, count: int = 200) -> float:
    """CPU microseconds to make and write a small file in a new directory under
    ``directory`` (the system's temporary directory when None), as the agent makes each
    job's spool. On ext4 it depends on how full the inode tables near the directory are:
    on one machine 18 µs under /root and 860 µs under /tmp, the same disk. A figure that
    depends on it says where it was measured."""
    import resource
    import shutil
    import tempfile

    def cpu() -> float:
        used = resource.getrusage(resource.RUSAGE_SELF)
        return used.ru_utime + used.ru_stime

    folder = Path(tempfile.mkdtemp(prefix="outpost-bench-probe-", dir=directory))
    try:
        start = cpu()
        for i in range(count):
            fd = os.open(folder / f"{i}.jsonl", os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
            os.write(fd, b"x" * 200)
            os.close(fd)
        return (cpu() - start) / count * 1e6
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def where(directory: Path | None) -> str:
    """Where a run's state lives, and what a file costs there (file_cost_us)."""
    import tempfile

    place = directory or Path(tempfile.gettempdir())
    return f"state under {place}: a new file costs {file_cost_us(directory):.0f} µs of CPU there"


def load() -> str:
    """The machine's load averages: other work competing for the cores skews the figures."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min) {five:.1f} (5 min) on {os.cpu_count()} cores"
