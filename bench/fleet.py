"""A fleet of simulated agents against a real hub, and what the hub costs per agent.

Each simulated agent has its own Ed25519 machine key and talks to the hub as the real agent
does, through the agent's own transport (``outpost.agent.transport.HubClient``: the signing
of ``outpost.protocol.signing``, the pinned CA, one httpx client per agent): it registers
through ``POST /v1/agent/register`` (signed with the account key), heartbeats at the
interval the hub gave it (with jitter), keeps a long-poll open, and reports the start and
end of each job it claims through ``POST /v1/agent/reports`` (exit 0, or 1 for a chosen
fraction). Agents live in worker processes (``per_process`` each, 2,000 by default), each
an asyncio loop.

As a library (``Fleet``, for other benchmarks)::

    with Fleet([hub.url], hub.data_dir / "ca.pem", hub.account_id, hub.primary_key,
               group="web", n=1000, fail_ratio=0.1) as fleet:
        fleet.wait_registered(timeout=300)
        ...                       # submit jobs to group "web"
        stats = fleet.snapshot()  # counters, heartbeat lateness, claims and ends per job

As a benchmark::

    .venv/bin/python -m bench.fleet --agents 1000,5000,10000 [--database sqlite|postgres]
        [--replicas 2] [--max-seconds N]

starts a real hub (or two on one PostgreSQL), and for each size registers the fleet
(registrations/s), runs it for a measured window of at least two heartbeat intervals, and
prints the hub's CPU, RSS, open connections and descriptors, heartbeats received against
expected and how many were late, the long-polls open, and the job-start latency of one
machine while the fleet runs.

A heartbeat is *late* when its answer arrives more than ``late_seconds`` (1 s by default)
after it was due: due is when the simulated agent's schedule says it should be sent, so a
simulator that falls behind counts too; its own lag (sent minus due) is printed apart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import random
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PER_PROCESS = 2000
LATE_SECONDS = 1.0


@dataclass
class FleetSpec:
    """What one worker process simulates: agents ``start`` .. ``start + count - 1``."""

    hub_urls: list[str]
    ca_pem: str
    account_id: str
    account_key: str
    group: str
    prefix: str
    start: int
    count: int
    fail_ratio: float = 0.0
    job_seconds: float = 0.0
    poll_wait: float = 25.0
    heartbeat_interval: float | None = None  # None: the interval the hub answers with
    late_seconds: float = LATE_SECONDS
    register_concurrency: int = 32
    split_urls: bool = False  # agent i talks first to hub_urls[i % len(hub_urls)]
    seed: int = 0


@dataclass
class Stats:
    """What a worker counted since its last reset (claims and ends: since it started)."""

    agents: int = 0
    registered: int = 0
    register_errors: int = 0
    register_seconds: float = 0.0
    heartbeats_sent: int = 0
    heartbeats_answered: int = 0
    heartbeat_errors: int = 0
    heartbeats_late: int = 0
    heartbeat_lag_max: float = 0.0  # the simulator's own lag: sent minus due
    heartbeat_answer: list[float] = field(default_factory=list)  # answered minus due
    polls_open: int = 0
    polls_answered: int = 0
    poll_errors: int = 0
    jobs_claimed: int = 0
    jobs_ended: int = 0
    jobs_failed: int = 0
    report_errors: int = 0
    work_items: int = 0
    claims: dict[str, float] = field(default_factory=dict)  # job id -> claim arrived (epoch)
    ends: dict[str, int] = field(default_factory=dict)  # job id -> exit code reported
    errors: list[str] = field(default_factory=list)  # the first few, for the operator

    def error(self, text: str) -> None:
        if len(self.errors) < 10:
            self.errors.append(text)

    def reset(self) -> None:
        self.heartbeats_sent = self.heartbeats_answered = self.heartbeat_errors = 0
        self.heartbeats_late = self.polls_answered = self.poll_errors = 0
        self.heartbeat_lag_max = 0.0
        self.heartbeat_answer = []
        self.errors = []


# --- the worker process ------------------------------------------------------------------

class SimAgent:
    """One simulated agent: its own key and HubClient, a heartbeat loop and a poll loop."""

    def __init__(self, spec: FleetSpec, index: int, stats: Stats, facts: dict[str, Any]
                 ) -> None:
        self.spec, self.index, self.stats, self.facts = spec, index, stats, facts
        self.name = f"{spec.prefix}-{index:05d}"
        urls = list(spec.hub_urls)
        if spec.split_urls:
            first = index % len(urls)
            urls = urls[first:] + urls[:first]
        self.urls = urls
        self.client: Any = None
        self.interval = 30.0
        self.held: dict[str, int] = {}
        self.rng = random.Random(spec.seed * 1_000_003 + index)
        self.started = time.time()
        # The agent's heartbeat rides on its poll (turns.py) where the build under test has
        # that; an older build gets heartbeats on their own, beside the poll.
        try:
            from outpost.agent.turns import Turns
        except ImportError:
            self.turns: Any = None
        else:
            self.turns = Turns() if hasattr(Turns, "beat_lost") else None

    async def register(self) -> None:
        from nacl.signing import SigningKey

        from outpost.agent.transport import HubClient
        from outpost.protocol import signing

        key = SigningKey.generate()
        self.client = HubClient(self.urls, self.spec.ca_pem, timeout=60.0, connections=4)
        request = {"name": self.name, "group": self.spec.group, "labels": {"sim": "1"},
                   "public_key": signing.b64(bytes(key.verify_key)), "facts": self.facts,
                   "force": True}
        answer = await self.client.request(
            "POST", "/v1/agent/register", request,
            account=(self.spec.account_id, signing.unb64(self.spec.account_key)))
        self.client.machine_id = answer["machine_id"]
        self.client.machine_key = key
        self.interval = self.spec.heartbeat_interval or float(answer["heartbeat_interval"])

    def _beat(self, sent: float) -> dict[str, Any]:
        return {"agent_version": self.facts["agent_version"],
                "uptime_seconds": sent - self.started, "heartbeat_interval": self.interval,
                "running_jobs": len(self.held),
                "jobs": [{"id": j, "attempt": a} for j, a in self.held.items()]}

    def _answered(self, due: float) -> None:
        st = self.stats
        answered = time.time()
        st.heartbeats_answered += 1
        st.heartbeat_answer.append(answered - due)
        if answered - due > self.spec.late_seconds:
            st.heartbeats_late += 1

    async def heartbeats(self) -> None:
        """Heartbeats on their own: every one (an older build), or those no poll carried."""
        from outpost.protocol.errors import OutpostError

        st = self.stats
        turns = self.turns
        due = time.time() + self.rng.uniform(0, self.interval)  # spread the fleet's beats
        if turns is not None:
            turns.cadence = self.interval
            turns.next_beat(due - time.time(), self.interval)
        while True:
            if turns is None:
                await asyncio.sleep(max(0.0, due - time.time()))
            else:
                await turns.until_due(self.interval)
                if not turns.due():
                    continue
                await turns.beat_turn()
                if not turns.due():
                    continue
                due = time.time()
            sent = time.time()
            st.heartbeat_lag_max = max(st.heartbeat_lag_max, sent - due)
            st.heartbeats_sent += 1
            try:
                await self.client.request("POST", "/v1/agent/heartbeat", self._beat(sent))
            except OutpostError as exc:
                st.heartbeat_errors += 1
                st.error(f"heartbeat {self.name}: {exc.code} {exc.message}")
            else:
                self._answered(due)
            if turns is not None:
                turns.next_beat(self.interval * self.rng.uniform(0.95, 1.05), self.interval)
                continue
            # The real agent sleeps an interval after each answer; a schedule that does not
            # drift keeps the expected count exact. Jitter: +-5 % of the interval.
            due += self.interval * self.rng.uniform(0.95, 1.05)
            if due < time.time():
                due = time.time()

    async def polls(self) -> None:
        from outpost.protocol.errors import OutpostError

        st = self.stats
        while True:
            hold, carry = self.spec.poll_wait, False
            if self.turns is not None:  # as the agent: the heartbeat rides on the poll
                hold, carry = await self.turns.poll_turn(hold)
                hold = round(hold, 3)
            body = None
            if carry:
                sent = time.time()
                st.heartbeats_sent += 1
                body = {"heartbeat": self._beat(sent)}
            st.polls_open += 1
            try:
                answer = await self.client.request(
                    "POST", f"/v1/agent/poll?wait={hold:g}&capacity=1", body,
                    timeout=hold + 30)
            except OutpostError as exc:
                st.poll_errors += 1
                st.error(f"poll {self.name}: {exc.code} {exc.message}")
                if carry:
                    st.heartbeat_errors += 1
                    self.turns.beat_lost()
                await asyncio.sleep(self.rng.uniform(1, 3))
                continue
            finally:
                st.polls_open -= 1
                if self.turns is not None:
                    self.turns.poll_back()
            st.polls_answered += 1
            if carry:
                if answer.get("heartbeat") is None:
                    self.turns.beat_lost(refused=True)
                else:
                    # Recorded as the poll arrived: its lateness is the time to send it,
                    # which the hub's answer does not show; counted as on time.
                    self._answered(time.time())
            for item in answer.get("items", []):
                if item.get("kind") == "job":
                    await self.run_job(item["payload"])
                else:
                    await self.work_done(item)

    async def run_job(self, payload: dict[str, Any]) -> None:
        from outpost.protocol.errors import OutpostError

        st = self.stats
        job_id, attempt = str(payload["job_id"]), int(payload["attempt"])
        st.claims[job_id] = time.time()
        st.jobs_claimed += 1
        self.held[job_id] = attempt
        code = 1 if self.rng.random() < self.spec.fail_ratio else 0
        try:
            await self.client.request("POST", "/v1/agent/reports", {"reports": [
                {"job_id": job_id, "attempt": attempt, "started": True}]})
            if self.spec.job_seconds:
                await asyncio.sleep(self.spec.job_seconds)
            await self.client.request("POST", "/v1/agent/reports", {"reports": [
                {"job_id": job_id, "attempt": attempt,
                 "end": {"exit_code": code, "cause": "exit"}}]})
        except OutpostError as exc:
            st.report_errors += 1
            st.error(f"report {self.name} {job_id}: {exc.code} {exc.message}")
        else:
            st.jobs_ended += 1
            st.jobs_failed += code
            st.ends[job_id] = code
        finally:
            self.held.pop(job_id, None)

    async def work_done(self, item: dict[str, Any]) -> None:
        from outpost.protocol.errors import OutpostError

        self.stats.work_items += 1
        result: dict[str, Any] = ({"received_at": time.time()} if item.get("kind") == "ping"
                                  else {"error": "a simulated agent does not handle "
                                        f"work of kind '{item.get('kind')}'"})
        with contextlib.suppress(OutpostError):
            await self.client.request("POST", f"/v1/agent/work/{item['id']}/done",
                                      {"result": result})


async def _worker_main(spec: FleetSpec, conn: multiprocessing.connection.Connection) -> None:
    from outpost.agent.facts import machine_facts
    from outpost.protocol.errors import OutpostError

    stats = Stats(agents=spec.count)
    facts = machine_facts()
    agents = [SimAgent(spec, spec.start + i, stats, facts) for i in range(spec.count)]
    tasks: list[asyncio.Task[None]] = []
    gate = asyncio.Semaphore(spec.register_concurrency)
    begun = time.monotonic()

    async def enrol(agent: SimAgent) -> None:
        for attempt in range(5):
            async with gate:
                try:
                    await agent.register()
                except OutpostError as exc:
                    stats.error(f"register {agent.name}: {exc.code} {exc.message}")
                    await asyncio.sleep(0.5 * (attempt + 1))
                    continue
            stats.registered += 1
            tasks.append(asyncio.create_task(agent.heartbeats(), name=f"hb-{agent.name}"))
            tasks.append(asyncio.create_task(agent.polls(), name=f"poll-{agent.name}"))
            return
        stats.register_errors += 1

    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str] = asyncio.Queue()
    loop.add_reader(conn.fileno(), lambda: commands.put_nowait(conn.recv()))
    enrolling = asyncio.gather(*(enrol(a) for a in agents))

    def registered() -> None:
        stats.register_seconds = time.monotonic() - begun
        conn.send(("registered", stats.registered, stats.register_errors,
                   stats.register_seconds, list(stats.errors)))

    enrolling.add_done_callback(lambda _t: registered())
    try:
        while True:
            command = await commands.get()
            if command == "snapshot":
                conn.send(("snapshot", asdict(stats)))
            elif command == "reset":
                stats.reset()
                conn.send(("reset",))
            elif command == "stop":
                break
    finally:
        loop.remove_reader(conn.fileno())
        enrolling.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(enrolling, *tasks, return_exceptions=True)
        await asyncio.gather(*(a.client.aclose() for a in agents if a.client is not None),
                             return_exceptions=True)
        conn.send(("stopped",))


def _worker(spec: FleetSpec, conn: multiprocessing.connection.Connection) -> None:
    _raise_fd_limit()
    try:
        import uvloop  # the hub's extra installs it; the simulator must not be the limit

        uvloop.run(_worker_main(spec, conn))
    except ImportError:
        asyncio.run(_worker_main(spec, conn))


FD_WANTED = 65536  # 10,000 agents hold about 20,000 connections to one hub


def _raise_fd_limit() -> int:
    """Raise this process's descriptor limit (and, as root, the hard one, to FD_WANTED):
    the hub started from here inherits it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < FD_WANTED and os.geteuid() == 0:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (FD_WANTED, FD_WANTED))
            return FD_WANTED
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# --- the API ---------------------------------------------------------------------------

class Fleet:
    """``n`` simulated agents of group ``group`` in worker processes (``per_process`` agents
    each). ``start()`` begins registering them, ``wait_registered()`` waits until all have
    (or raises), ``snapshot()`` merges the workers' counters, ``stop()`` ends every worker.
    A context manager: leaving it stops the workers, whatever happened. Workers are spawned
    (not forked), so a script that uses it runs its code under ``if __name__ ==
    "__main__":``."""

    def __init__(self, hub_urls: str | list[str], ca_path: str | Path, account_id: str,
                 account_key: str, group: str, n: int, fail_ratio: float = 0.0, *,
                 per_process: int = PER_PROCESS, prefix: str = "sim",
                 job_seconds: float = 0.0, poll_wait: float = 25.0,
                 heartbeat_interval: float | None = None, late_seconds: float = LATE_SECONDS,
                 split_urls: bool = False, register_concurrency: int = 32) -> None:
        urls = [hub_urls] if isinstance(hub_urls, str) else list(hub_urls)
        ca_pem = Path(ca_path).read_text()
        self.n = n
        self.names = [f"{prefix}-{i:05d}" for i in range(n)]
        self.specs = [
            FleetSpec(urls, ca_pem, account_id, account_key, group, prefix, start,
                      min(per_process, n - start), fail_ratio, job_seconds, poll_wait,
                      heartbeat_interval, late_seconds, register_concurrency, split_urls,
                      seed=start)
            for start in range(0, n, per_process)]
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: list[Any] = []
        self._conns: list[multiprocessing.connection.Connection] = []
        self.registered = 0
        self.register_seconds = 0.0
        self.register_errors: list[str] = []

    def start(self) -> Fleet:
        for spec in self.specs:
            parent, child = self._ctx.Pipe()
            proc = self._ctx.Process(target=_worker, args=(spec, child), daemon=True,
                                     name=f"fleet-{spec.start}")
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
        return self

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def _expect(self, conn: multiprocessing.connection.Connection, kind: str,
                timeout: float) -> tuple[Any, ...]:
        if not conn.poll(timeout):
            raise TimeoutError(f"a fleet worker did not answer '{kind}' within {timeout:g} s")
        message: tuple[Any, ...] = conn.recv()
        if message[0] != kind:
            raise RuntimeError(f"a fleet worker answered {message[0]!r}, not {kind!r}")
        return message

    def wait_registered(self, timeout: float = 600.0) -> float:
        """Wait until every worker has registered its agents: registrations per second.
        Raises RuntimeError if some could not register."""
        deadline = time.monotonic() + timeout
        begun = time.monotonic()
        total, failed, errors = 0, 0, []
        for conn in self._conns:
            _, ok, bad, _seconds, errs = self._expect(
                conn, "registered", max(0.1, deadline - time.monotonic()))
            total, failed = total + ok, failed + bad
            errors += errs
        self.register_seconds = time.monotonic() - begun
        self.registered, self.register_errors = total, errors
        if failed:
            raise RuntimeError(f"{failed} of {self.n} simulated agents could not register: "
                               + "; ".join(errors[:3]))
        return total / max(self.register_seconds, 1e-9)

    def _all(self, command: str, answer: str, timeout: float = 60.0) -> list[tuple[Any, ...]]:
        for conn in self._conns:
            conn.send(command)
        return [self._expect(conn, answer, timeout) for conn in self._conns]

    def reset(self) -> None:
        """Start counting heartbeats and polls afresh (claims and ends are kept)."""
        self._all("reset", "reset")

    def snapshot(self) -> dict[str, Any]:
        """The workers' counters summed; lists and dicts joined; maxima taken."""
        merged: dict[str, Any] = {}
        for _, part in self._all("snapshot", "snapshot"):
            for key, value in part.items():
                if key not in merged:
                    merged[key] = value
                elif isinstance(value, list):
                    merged[key] = merged[key] + value
                elif isinstance(value, dict):
                    merged[key] = {**merged[key], **value}
                elif key.endswith("_max") or key == "register_seconds":
                    merged[key] = max(merged[key], value)
                else:
                    merged[key] += value
        return merged

    def stop(self, timeout: float = 20.0) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send("stop")
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


# --- the benchmark ---------------------------------------------------------------------

def _hub_sample(pid: int) -> dict[str, float]:
    import psutil

    proc = psutil.Process(pid)
    with proc.oneshot():
        cpu = proc.cpu_times()
        return {"cpu": cpu.user + cpu.system, "rss": proc.memory_info().rss,
                "fds": proc.num_fds(),
                "connections": sum(1 for c in proc.net_connections("tcp")
                                   if c.status == "ESTABLISHED"),
                "at": time.monotonic()}


def _metric(hub: Any, name: str, having: str = "") -> float:
    """A counter or gauge of the hub's /metrics, summed over its labels (those of lines
    that contain ``having``; NaN when the hub did not answer in time: an overloaded hub is a
    result too)."""
    return _parse(_metrics_text(hub), name, having)


def _metrics_text(hub: Any) -> str | None:
    try:
        return str(hub.api("GET", "/metrics", timeout=120).text)
    except Exception as exc:  # noqa: BLE001 - printed, and the figure shows as nan
        print(f"  (/metrics did not answer: {type(exc).__name__})")
        return None


def _parse(text: str | None, name: str, having: str = "") -> float:
    if text is None:
        return float("nan")
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            if (head == name or head.startswith(name + "{")) and having in head:
                total += float(value)
    return total


def _lags(hubs: list[Any]) -> list[float]:
    """The hubs' event-loop lag samples: in all, and those over 50 and over 100 ms."""
    name = "outpost_event_loop_lag_seconds"
    texts = [_metrics_text(h) for h in hubs]  # one read per hub: its figures agree
    total = sum(_parse(t, name + "_count") for t in texts)
    within = [sum(_parse(t, name + "_bucket", f'le="{le}"') for t in texts)
              for le in ("0.05", "0.1")]
    return [total, total - within[0], total - within[1]]


async def _job_latency(hubs: list[Any], probe: Fleet, count: int, interval: float
                       ) -> tuple[list[float], int]:
    """Submit ``count`` jobs, one at a time, to the group that holds only the probe machine
    (through each hub in turn): milliseconds from the submit being sent to the claim reaching
    the probe agent, and how many never arrived within 10 s."""
    import httpx

    latencies: list[float] = []
    slow: list[tuple[Any, str, float, float, float]] = []
    lost = 0
    clients = [httpx.AsyncClient(base_url=h.url, verify=h.ssl_context(), timeout=30,
                                 headers={"Authorization": f"Bearer {h.admin_token}"})
               for h in hubs]
    try:
        for i in range(count):
            client = clients[i % len(clients)]
            sent = time.time()
            try:
                response = await client.post("/v1/jobs", json={"runbook": "noop",
                                                               "group": "fleet-probe"})
            except httpx.HTTPError as exc:
                print(f"  (a submit failed: {type(exc).__name__})")
                lost += 1
                continue
            if response.status_code != 201:
                print(f"  (a submit was refused: {response.status_code} {response.text[:200]})")
                lost += 1
                continue
            answered = time.time()
            job_id = response.json()["id"]
            deadline = time.monotonic() + 10
            claimed = None
            while time.monotonic() < deadline:
                claims = probe.snapshot()["claims"]
                if job_id in claims:
                    claimed = claims[job_id]
                    break
                await asyncio.sleep(0.005)
            if claimed is None:
                lost += 1
            else:
                latencies.append((claimed - sent) * 1e3)
                if claimed - sent > SLOW_START:
                    slow.append((client, job_id, sent, answered, claimed))
            await asyncio.sleep(interval)
        for client, job_id, sent, answered, claimed in slow:
            await _explain_slow_start(client, job_id, sent, answered, claimed)
    finally:
        for client in clients:
            await client.aclose()
    return latencies, lost


SLOW_START = 0.1  # seconds: a job start slower than this is taken apart


async def _explain_slow_start(client: Any, job_id: str, sent: float, answered: float,
                              claimed: float) -> None:
    """Where a slow job start's time went: the submit's answer, the hub's claim (the
    attempt's ``started_at``, the hub's clock: the same machine's), the agent's receipt."""
    try:
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        at_hub = float(job["attempts"][0]["started_at"])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        print(f"  (slow start of {job_id}: its claim time unknown: {exc!r})")
        return
    print(f"  slow start {job_id}: {(claimed - sent) * 1e3:.0f} ms = submit answered "
          f"{(answered - sent) * 1e3:.0f} ms, then claimed at the hub "
          f"{(at_hub - answered) * 1e3:.0f} ms, then at the agent "
          f"{(claimed - at_hub) * 1e3:.0f} ms")


def measure(hubs: list[Any], size: int, window: float, latency_jobs: int,
            replicas_split: bool, late_seconds: float, simulator_nice: int = 0
            ) -> dict[str, Any]:
    from bench._common import load, percentile

    ca = hubs[0].data_dir / "ca.pem"
    urls = [h.url for h in hubs]
    pids = [h.proc.pid for h in hubs]
    result: dict[str, Any] = {"agents": size}
    print(f"\n== {size} agents on {len(hubs)} hub(s); {load()}", flush=True)
    idle = [_hub_sample(pid) for pid in pids]
    with Fleet(urls, ca, hubs[0].account_id, hubs[0].primary_key, "fleet", size,
               prefix=f"sim{size}", split_urls=replicas_split,
               late_seconds=late_seconds) as fleet, \
            Fleet(urls, ca, hubs[0].account_id, hubs[0].primary_key, "fleet-probe", 1,
                  prefix=f"probe{size}", late_seconds=late_seconds) as probe:
        if simulator_nice:
            # The simulated fleet stands for machines elsewhere: on this one it must not take
            # the cores from the hub it measures (the probe agent keeps its priority).
            for pid in fleet.pids:
                os.setpriority(os.PRIO_PROCESS, pid, simulator_nice)
        rate = fleet.wait_registered(timeout=max(600.0, size / 5))
        probe.wait_registered(timeout=60)
        result["registrations_per_s"] = rate
        print(f"  registered {fleet.registered} agents in {fleet.register_seconds:.1f} s: "
              f"{rate:.0f} registrations/s", flush=True)
        # Let every agent's first heartbeat and poll land before the window opens.
        settle = min(window / 2, 35.0)
        time.sleep(settle)  # the fleet runs on its own schedule: nothing to wait on
        fleet.reset()
        beats_before = sum(_metric(h, "outpost_heartbeats_total") for h in hubs)
        gc_before = [sum(_metric(h, f"outpost_gc_pause_seconds_{part}", 'generation="2"')
                         for h in hubs) for part in ("count", "sum")]
        requests_before = sum(_metric(h, "outpost_http_requests_total") for h in hubs)
        lag_before = _lags(hubs)
        before = [_hub_sample(pid) for pid in pids]
        started = time.monotonic()
        print(f"  window opens at {time.time():.3f}", flush=True)
        latencies, lost = asyncio.run(_job_latency(hubs, probe, latency_jobs, 0.2))
        remaining = window - (time.monotonic() - started)
        if remaining > 0:
            time.sleep(remaining)  # the measured window is a length of time
        print(f"  window closes at {time.time():.3f}", flush=True)
        after = [_hub_sample(pid) for pid in pids]
        beats_after = sum(_metric(h, "outpost_heartbeats_total") for h in hubs)
        gc_after = [sum(_metric(h, f"outpost_gc_pause_seconds_{part}", 'generation="2"')
                        for h in hubs) for part in ("count", "sum")]
        requests_after = sum(_metric(h, "outpost_http_requests_total") for h in hubs)
        lag_after = _lags(hubs)
        stats = fleet.snapshot()
        polls_metric = sum(_metric(h, "outpost_long_polls_open") for h in hubs)
    elapsed = after[0]["at"] - before[0]["at"]
    interval = 30.0
    cpu = sum(a["cpu"] - b["cpu"] for a, b in zip(after, before, strict=True)) / elapsed * 100
    rss = sum(a["rss"] for a in after)
    fds = sum(a["fds"] for a in after)
    conns = sum(a["connections"] for a in after)
    idle_rss = sum(s["rss"] for s in idle)
    idle_fds = sum(s["fds"] for s in idle)
    expected = size * elapsed / interval
    answers = stats["heartbeat_answer"]
    result.update({
        "window_s": elapsed, "hub_cpu_percent": cpu, "hub_rss_mb": rss / 2**20,
        "hub_fds": fds, "hub_connections": conns,
        "heartbeats_expected": expected, "heartbeats_received": beats_after - beats_before,
        # Every request the hub served in the window (the /metrics reads are 2 per hub).
        "requests_per_agent_minute": (requests_after - requests_before) / size
        / elapsed * 60,
        "heartbeats_answered": stats["heartbeats_answered"],
        "heartbeats_late": stats["heartbeats_late"],
        "heartbeat_errors": stats["heartbeat_errors"],
        "heartbeat_answer_p50_ms": percentile(answers, 50) * 1e3 if answers else None,
        "heartbeat_answer_p99_ms": percentile(answers, 99) * 1e3 if answers else None,
        "simulator_lag_max_s": stats["heartbeat_lag_max"],
        "polls_open": stats["polls_open"], "polls_open_hub": polls_metric,
        "poll_errors": stats["poll_errors"],
        "job_start_p50_ms": percentile(latencies, 50) if latencies else None,
        "job_start_p99_ms": percentile(latencies, 99) if latencies else None,
        "job_start_lost": lost, "job_start_count": len(latencies),
        "full_collections": gc_after[0] - gc_before[0],
        "full_collection_seconds": gc_after[1] - gc_before[1],
        # Samples of the event loop's lag (every 50 ms): in all, over 50 ms, over 100 ms.
        "loop_lag_samples": [a - b for a, b in zip(lag_after, lag_before, strict=True)],
        "per_agent_cpu_percent": cpu / size,
        "per_agent_rss_kib": (rss - idle_rss) / size / 1024,
        "per_agent_fds": (fds - idle_fds) / size,
        "errors": stats["errors"][:3],
    })
    _print(result, late_seconds)
    return result


def connection_memory(hub: Any, count: int) -> float:
    """KiB of the hub's RSS per idle TLS keep-alive connection: ``count`` clients, each its
    own connection, each one GET /healthz, all left open while the RSS is read."""
    import httpx

    async def run() -> float:
        ctx = hub.ssl_context()
        clients = [httpx.AsyncClient(verify=ctx, timeout=60) for _ in range(count)]
        gate = asyncio.Semaphore(32)
        before = _hub_sample(hub.proc.pid)["rss"]

        async def one(client: httpx.AsyncClient) -> None:
            async with gate:
                await client.get(f"{hub.url}/healthz")

        try:
            await asyncio.gather(*(one(c) for c in clients))
            after = _hub_sample(hub.proc.pid)
        finally:
            for client in clients:
                await client.aclose()
        print(f"  {after['connections']} connections open: RSS {before / 2**20:.0f} -> "
              f"{after['rss'] / 2**20:.0f} MiB")
        return (after["rss"] - before) / count / 1024

    return asyncio.run(run())


def _print(r: dict[str, Any], late: float) -> None:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f} ms"

    print(f"  window {r['window_s']:.0f} s: hub CPU {r['hub_cpu_percent']:.1f} % of one core, "
          f"RSS {r['hub_rss_mb']:.0f} MiB, {r['hub_fds']} fds, "
          f"{r['hub_connections']} established connections")
    print(f"  requests per agent per minute: {r['requests_per_agent_minute']:.2f}")
    print(f"  heartbeats: expected {r['heartbeats_expected']:.0f}, received by the hub "
          f"{r['heartbeats_received']:.0f}, answered {r['heartbeats_answered']}, late (> "
          f"{late:g} s after due) {r['heartbeats_late']}, errors {r['heartbeat_errors']}; "
          f"answer after due p50 {ms(r['heartbeat_answer_p50_ms'])}, p99 "
          f"{ms(r['heartbeat_answer_p99_ms'])}; simulator lag max "
          f"{r['simulator_lag_max_s']:.2f} s")
    print(f"  long-polls open: {r['polls_open']} (the hub's gauge: "
          f"{r['polls_open_hub']:.0f}), poll errors {r['poll_errors']}")
    p99 = r["job_start_p99_ms"]
    print(f"  job start (submit sent -> claim at the agent), {r['job_start_count']} jobs: "
          f"p50 {ms(r['job_start_p50_ms'])}, p99 {ms(p99)} (target p99 < 100 ms: "
          f"{'met' if p99 is not None and p99 < 100 else 'NOT met'}); "
          f"never arrived: {r['job_start_lost']}")
    samples, over50, over100 = r["loop_lag_samples"]
    if samples:  # a build that measures it
        print(f"  event loop held: {over50:.0f} of {samples:.0f} samples over 50 ms, "
              f"{over100:.0f} over 100 ms")
    if r["full_collections"]:
        print(f"  full garbage collections: {r['full_collections']:.0f}, the hub stopped "
              f"{r['full_collection_seconds'] / r['full_collections'] * 1e3:.0f} ms each "
              "on average")
    print(f"  per agent: {r['per_agent_cpu_percent'] * 1000:.2f} milli-% CPU "
          f"({r['per_agent_cpu_percent']:.4f} %), {r['per_agent_rss_kib']:.1f} KiB RSS, "
          f"{r['per_agent_fds']:.2f} fds")
    if r["errors"]:
        print(f"  first errors: {r['errors']}")


@contextlib.contextmanager
def hubs(kind: str, root: Path, replicas: int, extra_args: list[str],
         profile: Path | None = None, src: Path | None = None,
         stalls: Path | None = None) -> Iterator[list[Any]]:
    """Running hubs on one fresh database: ``src`` runs another build's ``src`` directory,
    ``profile`` a directory for the first hub's cProfile and SQL statement counts,
    ``stalls`` a file for the first hub's event-loop turns of 50 ms or more, with stacks."""
    from bench._common import Hooks, _stop, database, init_hub, publish
    from tests.support import Hub, free_port

    env: dict[str, str] = {}
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
        env = Hooks(cprofile=profile, sqltime=profile / "sql.txt", stalls=stalls).env("hub")
    elif stalls is not None:
        env = Hooks(stalls=stalls).env("hub")
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(src), *filter(None, [env.get("PYTHONPATH"), os.environ.get("PYTHONPATH")])])
    with database(kind, root) as url:
        first = init_hub(root / "hub", url, extra_args=extra_args)
        started: list[Any] = []
        saved = dict(os.environ)
        try:
            os.environ.update(env)  # Hub.start passes the environment on
            try:
                first.start()
            finally:
                os.environ.clear()
                os.environ.update(saved)
            started.append(first)
            for _ in range(replicas - 1):
                other = Hub(first.data_dir, free_port(), url, first.init,
                            extra_args=extra_args)
                other.start()
                started.append(other)
            publish(first, "noop", "true\n")
            yield started
        finally:
            if profile is not None and started and started[0].proc.poll() is None:
                import signal

                started[0].proc.send_signal(signal.SIGUSR1)  # writes the profile so far
                time.sleep(1)  # the hub writes it in its signal handler
            for hub in started:
                _stop(hub.proc)


def _stalls_file(directory: Path | None, size: int, run: int) -> Path | None:
    if directory is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    return directory.resolve() / f"stalls-{size}-{run}.txt"


def main(argv: list[str] | None = None) -> int:
    from bench._common import TimeBound, cancel_time_bound, load, time_bound

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", default="1000,5000,10000",
                        help="fleet sizes, comma-separated (default 1000,5000,10000)")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--replicas", type=int, default=1,
                        help="hubs on one PostgreSQL, agents split between them")
    parser.add_argument("--window", type=float, default=65.0,
                        help="measured seconds per size (at least two heartbeat intervals)")
    parser.add_argument("--latency-jobs", type=int, default=200)
    parser.add_argument("--late", type=float, default=LATE_SECONDS,
                        help="a heartbeat answered this many seconds after due is late")
    parser.add_argument("--max-seconds", type=float, default=1800.0)
    parser.add_argument("--profile", type=Path, default=None,
                        help="a directory: the hub's cProfile (hub.prof) and SQL counts")
    parser.add_argument("--simulator-nice", type=int, default=10,
                        help="the simulated fleet's processes' nice value, so that they do "
                             "not take the cores from the hub (0: as started)")
    parser.add_argument("--stalls", type=Path, default=None,
                        help="a directory: the hub's event-loop turns of 50 ms or more, with "
                             "the stacks seen in them (one file per size and build)")
    parser.add_argument("--compare", type=Path, action="append", default=[],
                        help="another build's src directory: each size runs on it too, "
                             "alternating with this build (repeatable)")
    parser.add_argument("--tls-memory", type=int, default=0, metavar="N",
                        help="instead of a fleet: the hub's RSS per idle TLS connection, "
                             "with N connections open")
    args = parser.parse_args(argv)
    if args.replicas > 1 and args.database != "postgres":
        parser.error("--replicas needs --database postgres")
    sizes = [int(s) for s in args.agents.split(",") if s.strip()]
    hard = _raise_fd_limit()
    print(f"fleet benchmark: sizes {sizes}, {args.database}, {args.replicas} hub(s), window "
          f"{args.window:g} s; {load()}; descriptor limit {hard}", flush=True)
    time_bound(args.max_seconds)
    results = []
    builds: list[tuple[str, Path | None]] = [("this build", None)]
    builds += [(f"--compare {src}", src.resolve()) for src in args.compare]
    try:
        if args.tls_memory:
            for label, src in builds:
                with tempfile.TemporaryDirectory(prefix="outpost-fleet-") as tmp, \
                        hubs(args.database, Path(tmp), 1, [], None, src) as running:
                    kib = connection_memory(running[0], args.tls_memory)
                    print(f"{label}: {kib:.1f} KiB of hub RSS per idle TLS connection",
                          flush=True)
            sizes = []
        for size in sizes:
            for label, src in builds:
                if len(builds) > 1:
                    print(f"\n-- {label}", flush=True)
                with tempfile.TemporaryDirectory(prefix="outpost-fleet-") as tmp, \
                        hubs(args.database, Path(tmp), args.replicas, [],
                             args.profile / f"{size}-{len(results)}" if args.profile else None,
                             src, _stalls_file(args.stalls, size, len(results))) as running:
                    result = measure(running, size, args.window, args.latency_jobs,
                                     args.replicas > 1, args.late, args.simulator_nice)
                    result["build"] = label
                    results.append(result)
    except TimeBound as exc:
        print(f"stopped: {exc}")
    finally:
        cancel_time_bound()
    if results:
        print("\n| agents | build | hub CPU % | RSS MiB | fds | connections | heartbeats recv/exp "
              "| late | polls open | job start p50/p99 ms |")
        for r in results:
            print(f"| {r['agents']} | {r['build']} | {r['hub_cpu_percent']:.1f} | "
                  f"{r['hub_rss_mb']:.0f} | "
                  f"{r['hub_fds']} | {r['hub_connections']} | "
                  f"{r['heartbeats_received']:.0f}/{r['heartbeats_expected']:.0f} | "
                  f"{r['heartbeats_late']} | {r['polls_open']} | "
                  f"{r['job_start_p50_ms'] or 0:.1f}/{r['job_start_p99_ms'] or 0:.1f} |")
    print(f"done; {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
