"""The agent's checks behind ``outpost check``: one small function per thing that can be wrong
on a managed machine, in the order a person would look (SCENARIOS.md ids in each title).

Network checks walk the path the daemon really uses: its hub URLs (config, else the
registration's), its proxy (config, else HTTPS_PROXY/NO_PROXY), its pinned CA, its clock
(including the test hook that skews it) and its machine key. Nothing here imports the hub.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import ssl
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil

from outpost import __version__
from outpost.protocol import versions
from outpost.protocol.checks import (
    ERROR,
    OK,
    WARNING,
    Outcome,
    Registry,
    Result,
    disk_outcome,
    error,
    from_error,
    ok,
    problem,
    run_checks,
    warning,
)
from outpost.protocol.errors import CATALOG, INVALID_HOSTNAME_TEXT, HubRefused, OutpostError

from . import config as agent_config
from .config import AgentConfig
from .daemon import read_status
from .registration import check_name, client_for
from .state import CorruptFile, Registration, StateDir
from .transport import Clock, classify, ssl_context, untrusted_issuer

# HW-1b: the documented minimum. "4 GB" machines report a little less to the OS.
MIN_CPUS = 2
MIN_MEMORY_BYTES = int(3.5 * 2**30)
# HW-4: the hub refuses signed requests beyond 15 minutes; beyond 1 minute is worth a word.
CLOCK_WARNING_SECONDS = 60.0
CLOCK_ERROR_SECONDS = 900.0
# A heartbeat older than this many intervals is what makes the hub call a machine
# Unresponsive (docs/architecture.md, "Machine status").
HEARTBEAT_INTERVALS = 3


@dataclass
class AgentContext:
    """What the checks are given, and what earlier checks found for later ones."""

    state: StateDir
    config_path: Path | None
    clock: Clock = field(default_factory=Clock)
    timeout: float = 5.0
    config: AgentConfig | None = None
    registration: Registration | None = None
    status: dict[str, Any] | None = None
    reachable: list[str] = field(default_factory=list)
    hub_url: str | None = None
    health: dict[str, Any] | None = None

    @property
    def hub_urls(self) -> list[str]:
        cfg = self.config.hub_urls if self.config else []
        reg = self.registration.hub_urls if self.registration else []
        return [u.rstrip("/") for u in (cfg or reg)]

    def proxy_for(self, url: str) -> str | None:
        """The proxy the daemon's HTTP client uses for ``url`` (EX-6)."""
        if self.config is not None and self.config.proxy:
            return self.config.proxy
        host = urlsplit(url).hostname or ""
        if urllib.request.proxy_bypass_environment(host):  # type: ignore[attr-defined]
            return None
        env = urllib.request.getproxies_environment()
        return env.get("https") or env.get("all")


checks: Registry[AgentContext] = Registry()


@checks.add("config", "Config file is valid (ED-2)",
            "the agent's YAML config: syntax, tabs, known settings and their ranges",
            scenarios=("ED-2",))
def config_valid(ctx: AgentContext) -> Outcome:
    ctx.config = agent_config.load(ctx.config_path)  # OutpostError: file, line, column
    if ctx.config_path is None:
        return ok("no config file; the defaults apply", path=None)
    return ok(f"{ctx.config_path} is valid", path=str(ctx.config_path))


@checks.add("machine-name", "Machine name is valid (ED-7)",
            "the registered machine name (else the host name): 1 to 64 characters",
            scenarios=("ED-7",))
def machine_name(ctx: AgentContext) -> Outcome:
    try:
        reg = ctx.state.registration()
    except CorruptFile:
        reg = None
    name, source = (reg.name, "registered name") if reg else (socket.gethostname(),
                                                              "host name")
    try:
        check_name(name)
    except OutpostError as exc:
        shown = name if len(name) <= 40 else name[:37] + "..."
        return error("invalid_hostname",
                     f"{INVALID_HOSTNAME_TEXT}: the {source} '{shown}' has {len(name)} "
                     f"characters", exc.fix, name=name, length=len(name))
    return ok(f"'{name}' ({source}, {len(name)} characters)", name=name)


@checks.add("agent-running", "Agent process is running (HW-3)",
            "the pidfile agent.pid and the status socket agent.sock in the state directory",
            scenarios=("HW-3", "HW-6"))
def agent_running(ctx: AgentContext) -> Outcome:
    start = f"outpost agent run --state-dir {ctx.state.root}"
    ctx.status = read_status(ctx.state, timeout=ctx.timeout)
    if ctx.status is not None:
        return ok(f"pid {ctx.status['pid']}, version {ctx.status['version']}, up "
                  f"{ctx.status['uptime_seconds']:.0f} s", pid=ctx.status["pid"])
    pid = ctx.state.running_pid()
    if pid is not None:
        return error("agent_not_running",
                     f"The agent process {pid} exists but does not answer on its status "
                     f"socket {ctx.state.socket_address!r}",
                     f"Restart it: kill {pid}; then {start} (or systemctl restart "
                     f"outpost-agent)", pid=pid)
    stop = ctx.state.last_stop()
    when = ""
    if stop is not None:
        seconds = max(0, round(time.time() - float(stop["at"])))
        told = stop.get("hub_told")
        when = (f": it was stopped {seconds} s ago, and "
                + (f"the hub at {told} was told (it shows the machine Stopped)" if told else
                   "no hub answered its stop notice (the hub shows the machine Unresponsive "
                   "once heartbeats are missed)"))
    return error("agent_not_running",
                 f"The Outpost agent is not running (state dir {ctx.state.root}){when}",
                 f"Start it: {start} (or, as a service: systemctl start outpost-agent)",
                 start_command=start, stopped_at=stop["at"] if stop else None)


@checks.add("registration", "Registration is present and readable",
            "registration.json (checksummed) and machine.key in the state directory",
            scenarios=("HW-9", "HW-10"))
def registration(ctx: AgentContext) -> Outcome:
    path = ctx.state.registration_path
    try:
        reg = ctx.state.registration()
    except CorruptFile as exc:
        return error("registration_corrupt", f"{path} is corrupt: {exc}",
                     "Run 'outpost agent reset-cache' if this agent version can fetch it "
                     "again; otherwise register again with 'outpost agent register ... "
                     "--force'.", path=str(path))
    if reg is None and ctx.state.identity_path.exists():
        # After 'agent reset-cache': the identity stays, the agent fetches the rest again.
        return error("registration_corrupt",
                     f"{path} is missing but {ctx.state.identity_path.name} is present (the "
                     f"cache was cleared); the checks that talk to the hub need it",
                     f"Start the agent ('outpost agent run --state-dir {ctx.state.root}'): "
                     f"it fetches the registration again from the hub.", path=str(path))
    if reg is None:
        return error("not_registered", f"No registration in {ctx.state.root}",
                     "Run the 'outpost agent register ...' line that 'outpost hub init' "
                     "printed; pass the same --state-dir as the agent uses.")
    ctx.state.load_key()  # OutpostError machine_key_corrupt (E1013) when it is damaged
    ctx.registration = reg
    return ok(f"machine '{reg.name}' ({reg.machine_id}), group '{reg.group}', account "
              f"{reg.account_id}", machine_id=reg.machine_id, hub_urls=reg.hub_urls)


@checks.add("dns", "Hub host name resolves (ED-11)",
            "DNS for each hub URL's host, or for the proxy's host when a proxy is used",
            needs=("config", "registration"), scenarios=("ED-11",))
def dns(ctx: AgentContext) -> Outcome:
    found: dict[str, str] = {}
    failed: dict[str, str] = {}
    for url in ctx.hub_urls:
        proxy = ctx.proxy_for(url)
        # Through a proxy the proxy resolves the hub's name; this machine needs the proxy's.
        host = urlsplit(proxy).hostname if proxy else urlsplit(url).hostname
        try:
            infos = socket.getaddrinfo(host or "", None, type=socket.SOCK_STREAM)
            found[url] = f"{host} -> {infos[0][4][0]}" + (" (the proxy)" if proxy else "")
        except (OSError, UnicodeError) as exc:
            failed[url] = f"{host}: {exc}"
    data: dict[str, Any] = {"resolved": found, "failed": failed}
    if failed and not found:
        return error("hub_unreachable",
                     "cannot resolve " + "; ".join(failed.values()),
                     "Check the host name in the hub URL (agent config 'hub_urls' or the "
                     "registration) and this machine's DNS servers (/etc/resolv.conf).", **data)
    if failed:
        return warning("hub_unreachable", "resolves " + "; ".join(found.values())
                       + ", but not " + "; ".join(failed.values()),
                       "Fix or remove the hub URLs that do not resolve.", **data)
    return ok("; ".join(found.values()), **data)


def _connect(url: str, proxy: str | None, timeout: float) -> str:
    """Open a TCP connection to the hub, through ``proxy`` with CONNECT when there is one;
    a description of the path, or OutpostError naming the kind of failure."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    if proxy is None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as exc:
            kind = "timeout" if isinstance(exc, TimeoutError) else "refused" \
                if isinstance(exc, ConnectionRefusedError) else "other"
            raise OutpostError("hub_unreachable", f"TCP to {host}:{port} failed ({kind}): "
                               f"{exc}", kind=kind, url=url) from exc
        return f"{host}:{port} directly"
    p = urlsplit(proxy)
    p_host, p_port = p.hostname or "", p.port or (443 if p.scheme == "https" else 80)
    try:
        sock = socket.create_connection((p_host, p_port), timeout=timeout)
    except OSError as exc:
        raise OutpostError("hub_unreachable", f"the proxy {p_host}:{p_port} cannot be "
                           f"reached: {exc}", kind="proxy", url=url, proxy=proxy) from exc
    try:
        if p.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=p_host)
        head = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        if p.username:
            creds = f"{p.username}:{p.password or ''}".encode()
            head += f"Proxy-Authorization: Basic {base64.b64encode(creds).decode()}\r\n"
        sock.sendall((head + "\r\n").encode())
        answer = b""
        while b"\r\n" not in answer and len(answer) < 4096:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    except OSError as exc:
        raise OutpostError("hub_unreachable", f"the proxy {p_host}:{p_port} failed: {exc}",
                           kind="proxy", url=url, proxy=proxy) from exc
    finally:
        sock.close()
    status = answer.split(b"\r\n", 1)[0].decode(errors="replace")
    if " 200" not in status:
        raise OutpostError("hub_unreachable", f"the proxy {p_host}:{p_port} refused to "
                           f"connect to {host}:{port}: {status or 'no answer'}",
                           kind="proxy", url=url, proxy=proxy)
    return f"{host}:{port} through the proxy {p_host}:{p_port}"


@checks.add("tcp", "TCP reaches the hub (EX-6, ED-10)",
            "a TCP connection to each hub URL, through the proxy the agent uses",
            needs=("dns",), scenarios=("EX-6", "ED-10"))
def tcp(ctx: AgentContext) -> Outcome:
    paths: dict[str, str] = {}
    failures: list[OutpostError] = []
    for url in ctx.hub_urls:
        try:
            paths[url] = _connect(url, ctx.proxy_for(url), ctx.timeout)
            ctx.reachable.append(url)
        except OutpostError as exc:
            failures.append(exc)
    if not paths:
        first = failures[0]
        kind = first.details.get("kind")
        fix = ("Check that the proxy runs and allows CONNECT to the hub's port, or fix "
               "'proxy:' in the agent config / HTTPS_PROXY." if kind == "proxy" else
               "Check that the hub runs and listens on that port, and that a firewall "
               "allows outbound TCP to it (or set 'proxy:' in the agent config).")
        return error("hub_unreachable", "; ".join(e.message for e in failures), fix,
                     kind=kind)
    text = "; ".join(paths.values())
    if failures:
        return warning("hub_unreachable", text + "; but " + "; ".join(
            e.message for e in failures), "Fix or remove the hub URLs that do not answer.")
    return ok(text, paths=paths)


@checks.add("tls", "TLS chain matches the pinned CA (HW-7)",
            "the hub's certificate, verified against the CA pinned at registration",
            needs=("tcp",), scenarios=("HW-7",))
def tls(ctx: AgentContext) -> Outcome:
    assert ctx.registration is not None and ctx.config is not None
    reg = ctx.registration
    url = ctx.reachable[0]
    local_before = ctx.clock.now().timestamp()
    try:
        with httpx.Client(verify=ssl_context(reg.ca_pem), proxy=ctx.config.proxy,
                          trust_env=True, timeout=ctx.timeout) as client:
            response = client.get(url + "/healthz")
    except httpx.HTTPError as exc:
        kind, detail = classify(exc)
        if kind == "tls" and "certificate verify failed" in detail:
            return from_error(untrusted_issuer(url, reg.ca_fingerprint))
        return error("hub_unreachable", f"HTTPS to {url} failed ({kind}): {detail}",
                     kind=kind)
    local_after = ctx.clock.now().timestamp()
    try:
        body = response.json()
    except ValueError:
        body = None
    if not response.is_success or not isinstance(body, dict):
        return error("hub_unreachable", f"{url}/healthz answered HTTP "
                     f"{response.status_code}, not an Outpost hub's answer",
                     "Check that the hub URL points at an Outpost hub.")
    body["local_time"] = (local_before + local_after) / 2
    body["round_trip_seconds"] = local_after - local_before
    ctx.hub_url, ctx.health = url, body
    return ok(f"{url} presents a certificate issued by the pinned CA "
              f"(SHA-256 {reg.ca_fingerprint[:16]}...)", url=url,
              ca_fingerprint=reg.ca_fingerprint)


@checks.add("clock", "Clock agrees with the hub's (HW-4)",
            "this machine's clock against the hub's: warning beyond 1 minute, error beyond 15",
            needs=("tls",), scenarios=("HW-4",))
def clock(ctx: AgentContext) -> Outcome:
    assert ctx.health is not None
    hub_time = float(ctx.health["hub_time"])
    local = float(ctx.health["local_time"])
    skew = local - hub_time
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    text = (f"this machine reads {time.strftime(fmt, time.gmtime(local))}, the hub "
            f"{time.strftime(fmt, time.gmtime(hub_time))} ({abs(skew):.0f} s "
            f"{'ahead' if skew > 0 else 'behind'})")
    data = {"skew_seconds": round(skew, 3), "local_time": local, "hub_time": hub_time}
    fix = ("Synchronise this machine's clock with NTP (for example 'timedatectl set-ntp "
           "true' or 'chronyc makestep').")
    if abs(skew) > CLOCK_ERROR_SECONDS:
        return error("clock_skew", f"{text}; the hub refuses signed requests beyond "
                     f"{CLOCK_ERROR_SECONDS / 60:.0f} minutes", fix, **data)
    if abs(skew) > CLOCK_WARNING_SECONDS:
        return warning("clock_skew", f"{text}; more than {CLOCK_WARNING_SECONDS:.0f} s apart",
                       fix, **data)
    return ok(text, **data)


@checks.add("signed-request", "Signed request is accepted (HW-4)",
            "a request signed with the machine key (GET /v1/agent/registration)",
            needs=("registration", "tls"), scenarios=("HW-4",))
async def signed_request(ctx: AgentContext) -> Outcome:
    assert ctx.registration is not None and ctx.config is not None and ctx.hub_url
    reg = ctx.registration
    client = client_for(ctx.state, reg, ctx.clock, ctx.config.proxy, [ctx.hub_url],
                        ctx.timeout, 1)
    try:
        answer = await client.request("GET", "/v1/agent/registration")
    except HubRefused as exc:
        out = from_error(exc)
        out.details = f"the hub refused a signed request: {exc.code} {exc.reason}: " \
                      f"{exc.message}"
        return out
    finally:
        await client.aclose()
    if answer.get("machine_id") != reg.machine_id:
        return error("machine_unknown", f"the hub answered for machine "
                     f"{answer.get('machine_id')}, not {reg.machine_id}")
    return ok(f"accepted as '{answer.get('name')}' ({reg.machine_id}) in group "
              f"'{answer.get('group')}'", machine_id=reg.machine_id)


@checks.add("agent-version", "Agent version meets the hub's minimum (HW-5)",
            "this agent's version against the hub's min_agent_version",
            needs=("tls",), scenarios=("HW-5",))
def agent_version(ctx: AgentContext) -> Outcome:
    assert ctx.health is not None
    minimum = str(ctx.health.get("min_agent_version") or "0")
    data = {"agent_version": __version__, "min_agent_version": minimum}
    try:
        old = versions.older_than(__version__, minimum)
    except ValueError:
        old = True
    if old:
        return error("agent_outdated",
                     f"The agent is out of date (The specified class does not exist): the hub "
                     f"needs agent version {minimum} or newer, and this machine runs "
                     f"{__version__}",
                     f"Upgrade the agent ('pip install --upgrade outpost-fleet') to {minimum} or "
                     f"newer, then restart it.", **data)
    return ok(f"{__version__} (the hub needs {minimum} or newer)", **data)


@checks.add("cache", "State cache is intact (HW-9)",
            "machine.key, identity.json and every cached file (checksums)",
            scenarios=("HW-9",))
def cache(ctx: AgentContext) -> Outcome:
    report = ctx.state.cache_report() if ctx.state.root.is_dir() else []
    aside = [p.name for p in ctx.state.corrupt_copies()]
    data: dict[str, Any] = {"files": {f["name"]: f["state"] for f in report},
                            "moved_aside": aside}
    corrupt = [f for f in report if f["state"] == "corrupt"]
    lost = [f for f in corrupt if not f["refetchable"]]
    if lost:  # the machine key: nothing can send it again
        return error("machine_key_corrupt", "; ".join(f["detail"] for f in lost),
                     "Register this machine again: 'outpost agent register ... --force'.",
                     **data)
    if corrupt:
        listed = "; ".join(f"{f['name']}: {f['detail']}" for f in corrupt)
        return error("cache_file_corrupt", f"corrupt: {listed}",
                     "A running agent moves a corrupt cache file aside and fetches it again "
                     "from the hub; if it stays corrupt, run 'outpost agent reset-cache'.",
                     **data)
    present = [f["name"] for f in report if f["state"] == "ok"]
    text = (f"intact: {', '.join(present)}" if present else "no cached files yet") + (
        f"; moved aside earlier: {', '.join(aside)}" if aside else "")
    return ok(text, **data)


@checks.add("heartbeat", "Hub acknowledged a heartbeat recently",
            "the running agent's last acknowledged heartbeat against its interval",
            needs=("agent-running",), scenarios=("HW-9",))
def heartbeat(ctx: AgentContext) -> Outcome:
    assert ctx.status is not None
    interval = float(ctx.status.get("heartbeat_interval") or 30.0)
    limit = max(HEARTBEAT_INTERVALS * interval, 5.0)
    last = ctx.status.get("last_heartbeat_ack_at")
    uptime = float(ctx.status.get("uptime_seconds") or 0.0)
    last_error = ctx.status.get("last_error") or {}
    data = {"last_heartbeat_ack_at": last, "heartbeat_interval": interval,
            "last_error": last_error or None}
    if last is not None and time.time() - float(last) <= limit:
        return ok(f"acknowledged {time.time() - float(last):.0f} s ago (every {interval:g} s)",
                  **data)
    why = (f"; the agent's last error: {last_error.get('code')} {last_error.get('message')}"
           if last_error else "")
    if last is None and uptime <= limit:
        return warning("heartbeat_missing", f"no heartbeat acknowledged yet; the agent "
                       f"started {uptime:.0f} s ago{why}",
                       "Run the check again in a minute.", **data)
    seen = "never" if last is None else f"{time.time() - float(last):.0f} s ago"
    code = str(last_error.get("code") or "")
    return error(code if code in CATALOG else "heartbeat_missing",
                 f"last heartbeat acknowledged {seen}, expected every {interval:g} s{why}",
                 last_error.get("fix") or None, **data)


def _cgroup_memory_limit() -> int | None:
    try:
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@checks.add("hardware", "Machine meets the minimum hardware (HW-1b)",
            "CPUs this process may use and memory (with the cgroup limit): 2 CPUs, 4 GB",
            scenarios=("HW-1b",))
def hardware(ctx: AgentContext) -> Outcome:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count() or 1
    memory = psutil.virtual_memory().total
    limit = _cgroup_memory_limit()
    if limit is not None:
        memory = min(memory, limit)
    data: dict[str, Any] = {"cpus": cpus, "memory_bytes": memory}
    text = f"{cpus} CPU(s), {memory / 2**30:.1f} GiB of memory"
    short = []
    if cpus < MIN_CPUS:
        short.append(f"fewer than {MIN_CPUS} CPUs")
    if memory < MIN_MEMORY_BYTES:
        short.append("less than 4 GB of memory")
    if short:
        return warning("hardware_below_minimum", f"{text}: {' and '.join(short)}", **data)
    return ok(text, **data)


@checks.add("pressure", "No sustained CPU or memory pressure (HW-1b)",
            "the agent's own backpressure verdict, else 1.5 s of samples against its thresholds",
            needs=("config",), scenarios=("HW-1b", "EX-7"))
def pressure(ctx: AgentContext) -> Outcome:
    cfg = (ctx.config or AgentConfig()).effective()
    if ctx.status is not None:
        reason = ctx.status.get("not_taking_work")
        if reason and "threshold" in str(reason):
            return warning("machine_under_pressure", f"the agent takes no new job: {reason}",
                           reason=reason)
        if reason:
            return ok(f"no pressure (the agent is full: {reason})")
        return ok(f"the agent takes work: neither CPU ({cfg.max_cpu_percent:g}%) nor "
                  f"memory ({cfg.max_memory_percent:g}%) has stayed above its threshold "
                  f"for {cfg.pressure_seconds:g} s")
    # No agent to ask: three samples over 1.5 s, and only pressure in all of them counts.
    samples = [(psutil.cpu_percent(interval=0.5), psutil.virtual_memory().percent)
               for _ in range(3)]
    cpu = min(c for c, _ in samples)
    mem = min(m for _, m in samples)
    data: dict[str, Any] = {"cpu_percent": cpu, "memory_percent": mem,
            "max_cpu_percent": cfg.max_cpu_percent,
            "max_memory_percent": cfg.max_memory_percent}
    over = [f"{name} at {value:.0f}% (threshold {limit:g}%)" for name, value, limit in
            (("CPU", cpu, cfg.max_cpu_percent), ("memory", mem, cfg.max_memory_percent))
            if value > limit]
    if over:
        return warning("machine_under_pressure", "for the last 1.5 s: " + ", ".join(over),
                       **data)
    return ok(f"CPU {cpu:.0f}%, memory {mem:.0f}% (thresholds {cfg.max_cpu_percent:g}% / "
              f"{cfg.max_memory_percent:g}%)", **data)


@checks.add("disk", "State directory has free disk",
            "free space on the file system of the state directory (spool, logs, cache)")
def disk(ctx: AgentContext) -> Outcome:
    return disk_outcome(ctx.state.root, "agent's state directory")


def _unix_holder(address: str) -> str | None:
    """'name (pid N)' of the process listening on a Unix socket address."""
    want = {address, address.replace("\0", "@", 1)}
    try:
        for conn in psutil.net_connections(kind="unix"):
            if isinstance(conn.laddr, str) and conn.laddr in want and conn.pid:
                try:
                    return f"{psutil.Process(conn.pid).name()} (pid {conn.pid})"
                except psutil.Error:
                    return f"pid {conn.pid}"
    except (psutil.Error, OSError):
        return None
    return None


def _listening(address: str) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(1.0)
    try:
        sock.connect(address)
        return True
    except OSError:
        return False
    finally:
        sock.close()


@checks.add("ports", "Local addresses the agent binds are free (ED-5)",
            "the agent's status socket (it needs no inbound TCP port): free or its own",
            scenarios=("ED-5", "ED-10"))
def ports(ctx: AgentContext) -> Outcome:
    address = ctx.state.socket_address
    shown = "unix:" + (address.replace("\0", "@", 1))
    if ctx.status is not None:
        return ok(f"{shown} is held by the agent itself (pid {ctx.status['pid']}); no "
                  f"inbound TCP port is needed", address=shown)
    if not _listening(address):
        return ok(f"{shown} is free; no inbound TCP port is needed", address=shown)
    who = _unix_holder(address)
    held = f" It is held by {who}, which is not an Outpost agent." if who else \
        " It is held by a process that is not an Outpost agent."
    return error("port_allocated",
                 f"Bind for {shown} failed: port is already allocated.{held}",
                 (f"Stop {who}" if who else "Stop the process that listens on it")
                 + ", or run the agent with another --state-dir.", address=shown,
                 holder=who)


@checks.add("sandbox", "Runbooks run as unprivileged users, within limits",
            "the running agent's job users and what limits jobs (cgroup v2, v1 or rlimits)",
            needs=("agent-running",))
def sandbox(ctx: AgentContext) -> Outcome:
    found = (ctx.status or {}).get("sandbox")
    if not found:
        return ok("the agent does not say (an older version)")
    users, limits = str(found["run_as"]), str(found["limits_by"])
    data = {"run_as": users, "limits_by": limits, "default_limits": found["default_limits"]}
    text = f"runbooks run as {users}; job limits: {limits}"
    if os.geteuid() == 0 and users.startswith("root (the agent's user)"):
        return warning("sandbox_weak", f"{text}: runbooks run as root, as the agent does",
                       "Remove 'job_users: false' from the agent's config and restart it.",
                       **data)
    if limits.startswith("rlimits"):
        return warning("sandbox_weak", f"{text}: no CPU limit, and processes a job detaches "
                       "outlive it", None, **data)
    return ok(text, **data)


# --- extensions: what <state>/extensions/state.json says of each ---------------------------
# A step's longest normal run: a handler's timeout_seconds (from its manifest) plus this, and
# for the steps that fetch the package, FETCH_SECONDS.
STEP_GRACE_SECONDS = 60.0
FETCH_SECONDS = 600.0
DEFAULT_HANDLER_TIMEOUT = 300.0
_CODE = re.compile(r"^(E\d{4}): ")


@dataclass
class ExtensionVerdict:
    """One extension's line of the 'extensions' check."""

    name: str
    result: str  # ok, warning or error
    text: str
    code: str | None = None
    fix: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


def _machine_name(ctx: AgentContext) -> str:
    if ctx.registration is not None:
        return ctx.registration.name
    try:
        reg = ctx.state.registration()
    except CorruptFile:
        reg = None
    return reg.name if reg is not None else socket.gethostname()


def _step_limit(state_root: Path, name: str, version: str | None, step: str | None) -> float:
    """How long ``step`` may normally take: the handler's timeout_seconds from the unpacked
    manifest (in either place the agent keeps packages) plus a grace, else the defaults."""
    if step in (None, "download", "verify", "unpack") or version is None:
        return FETCH_SECONDS
    timeout = DEFAULT_HANDLER_TIMEOUT
    for root in (state_root / "extensions", state_root.parent / f"{state_root.name}-extensions"):
        path = root / name / version / "outpost-extension.json"
        try:
            manifest = json.loads(path.read_bytes())
        except (OSError, ValueError):
            continue
        handlers = manifest.get("handlers") if isinstance(manifest, dict) else None
        which = step if step != "rollback" else "enable"
        found = handlers.get(which) if isinstance(handlers, dict) else None
        if isinstance(found, dict) and isinstance(found.get("timeout_seconds"), (int, float)):
            timeout = float(found["timeout_seconds"])
        break
    return timeout + STEP_GRACE_SECONDS


def judge_extension(row: dict[str, Any], *, now: float, machine: str, state_root: Path,
                    agent_running: bool) -> ExtensionVerdict:
    """The verdict on one extension's record (the fields of its status report)."""
    name, state = str(row["name"]), str(row.get("state") or "NotInstalled")
    step, message = row.get("step"), str(row.get("message") or "")
    version = row.get("version") or row.get("target_version") or row.get("on_disk")
    failed = list(row.get("failed_versions") or [])
    age = max(0.0, now - float(row.get("changed_at") or now))
    found = _CODE.match(message)
    code = found.group(1) if found and found.group(1) in CATALOG else None
    retry = f"outpost extension retry {name} --machine {machine}"
    log_file = state_root / "logs" / "extensions" / f"{name}.log"
    data: dict[str, Any] = {"name": name, "state": state, "step": step, "version": version,
                            "message": message, "code": code, "since_seconds": round(age),
                            "failed_versions": failed,
                            "last_ready_version": row.get("last_ready_version")}
    at = f" at {version}" if version else ""
    said = f": {message}" if message else ""

    def verdict(result: str, text: str, key: str | None = None,
                fix: str | None = None) -> ExtensionVerdict:
        item = CATALOG.get(key) if key else None
        shown = item.code if item else key
        if name == "recovery" and result != OK and fix:
            # The hub's protection drives it (docs/recovery.md): its repair reinstalls it.
            fix += (f". For the recovery extension: 'outpost protect {machine} --repair' "
                    "reinstalls it; the points already taken stay")
        data.update(result=result, code=shown, fix=fix)
        return ExtensionVerdict(name, result, text, shown, fix, data)

    if state == "Ready":
        if code == "E9033":
            return verdict(WARNING, f"{name}: Ready{at}, rolled back{said}", code,
                           f"The failed version is not tried again here. Publish a fixed "
                           f"version and set it, or try the same one again: {retry}")
        if failed:
            return verdict(WARNING, f"{name}: Ready{at}; version(s) {', '.join(failed)} "
                           f"failed here and are not tried again{said}", code or "E9094",
                           f"Read {log_file}; once the cause is fixed: {retry}")
        return verdict(OK, f"{name}: Ready{at}")
    if state == "NotInstalled":
        return verdict(OK, f"{name}: not installed{said}")
    if state == "NotReady":
        if "enabled=false" in message:
            return verdict(OK, f"{name}: installed{at} and disabled, as its goal says")
        return verdict(WARNING, f"{name}: NotReady{at}{said}", code or "E9095",
                       f"Read {log_file}; fix what the enable handler warns about, then set "
                       f"the extension again (a new seq runs its enable again)")
    if state == "Failed":
        where = f" at step {step}" if step else ""
        text = f"{name}: Failed{where}{at}{said}"
        if code == "E9038":
            fix = (f"Upgrade the agent on this machine (run the install line of 'outpost "
                   f"machine install-line' again), then: {retry}")
        elif code == "E9030":
            fix = (f"The {step} handler hung and was killed at its timeout_seconds. Read "
                   f"{log_file}; fix the handler or raise its timeout_seconds and publish a "
                   f"new version, or once the cause is gone: {retry}")
        elif code == "E9040":
            fix = (f"Read {log_file}; remove the extension ('outpost extension remove {name} "
                   f"--machine {machine}', which works in every state) and set a version "
                   f"that works")
        else:
            fix = f"Read {log_file}; fix the cause, then: {retry}"
        return verdict(ERROR, text, code or "E9094", fix)
    # Installing or Transitioning: fine while the step may still be running.
    limit = _step_limit(state_root, name, version, step)
    where = f" at step {step}" if step else ""
    text = f"{name}: {state}{where}{at} for {age:.0f} s{said}"
    if not agent_running:
        return verdict(WARNING, text + " (the agent is not running: the step goes on when it "
                       "starts)", code or "E9096",
                       "Start the agent; it goes on from the step it was in.")
    if code is not None:  # a download or the hub's credentials, tried again later
        return verdict(WARNING, text, code, f"The agent tries again by itself; if it keeps "
                       f"failing, check its path to the hub above and read {log_file}")
    if age > limit:
        return verdict(WARNING, f"{text}; longer than the step may take ({limit:.0f} s)",
                       "E9096", f"Read {log_file}; remove the extension ('outpost extension "
                       f"remove', which works in every state) or, once the cause is fixed: "
                       f"{retry}")
    return verdict(OK, text)


def read_extension_states(state_root: Path) -> list[dict[str, Any]] | None:
    """The records of ``<state>/extensions/state.json`` as status reports, None when the file
    does not exist; OutpostError when it cannot be read."""
    from .extensions.store import Record, Store

    store = Store(state_root / "extensions")
    try:
        raw = json.loads(store.path.read_bytes())
        records = [Record.from_dict(dict(v)) for v in raw["extensions"].values()]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise OutpostError("ext_failed_here", f"{store.path} cannot be read ({exc}); the "
                           f"agent moves it aside when it starts and installs what its "
                           f"goals want again", name="(all)", step="none") from exc
    # The version on disk too, installed or not yet (the report shows only an installed one).
    from outpost.protocol.extreaders import wire

    return [wire(r.status()) | {"on_disk": r.version} for r in records]


@checks.add("extensions", "Extensions are Ready (EX-5, EX-8)",
            "each extension in <state>/extensions/state.json: its state, step, code and fix",
            scenarios=("EX-4", "EX-5", "EX-8"))
def extensions(ctx: AgentContext) -> Outcome:
    rows = read_extension_states(ctx.state.root)
    if not rows:
        return ok("no extension on this machine", extensions=[])
    running = ctx.status is not None or ctx.state.running_pid() is not None
    machine = _machine_name(ctx)
    now = time.time()
    found = [judge_extension(r, now=now, machine=machine, state_root=ctx.state.root,
                             agent_running=running) for r in sorted(rows,
                                                                    key=lambda r: r["name"])]
    data = {"extensions": [v.data for v in found]}
    text = "; ".join(v.text for v in found)
    for level in (ERROR, WARNING):
        bad = [v for v in found if v.result == level]
        if bad:
            fix = " | ".join(f"{v.name}: {v.fix}" for v in bad) if len(bad) > 1 \
                else bad[0].fix
            return problem(level, bad[0].code or "E9094", text, fix, **data)
    return ok(text, **data)


# --- modules: the daemon's status, else <state>/modules/supervisor.json -----------------------
def read_module_states(ctx: AgentContext) -> dict[str, Any] | None:
    """What the running agent says of its deployment and modules; when it does not run (or
    never loaded its modules), what the supervisor's state file last recorded (states are
    then unknown: only whether each recorded process is still alive). None: nothing."""
    if ctx.status is not None and ctx.status.get("modules") is not None:
        return dict(ctx.status["modules"]) | {"live": True}
    from .state import read_checked

    try:
        saved = read_checked(ctx.state.root / "modules" / "supervisor.json")
    except (FileNotFoundError, CorruptFile):
        return None
    doc = saved.get("doc") or {}
    rows = []
    for name in ((doc.get("manifest") or {}).get("modules") or {}):
        record = (saved.get("modules") or {}).get(name) or {}
        pid = record.get("pid")
        alive = isinstance(pid, int) and psutil.pid_exists(pid)
        rows.append({"name": name, "state": "running" if alive else "stopped", "pid": pid
                     if alive else None, "restart_count": record.get("restarts", 0),
                     "reason": None if alive else "not running (no agent watches it)",
                     "code": None})
    return {"deployment": doc.get("deployment"), "version": doc.get("version", 0),
            "modules": rows, "live": False}


def judge_modules(info: dict[str, Any]) -> Outcome:
    """Failed, backoff and unhealthy modules, each with its reason and the fix."""
    rows = sorted(info.get("modules") or [], key=lambda r: r["name"])
    if not rows:
        return ok("no module on this machine", modules=[])
    text = "; ".join(f"{r['name']} {r['state']}" for r in rows)
    bad = [r for r in rows if r["state"] in ("failed", "backoff", "unhealthy")]
    if not info.get("live"):
        text += " (the agent does not run: these are the last recorded)"
    if not bad:
        return ok(text, modules=rows)
    first = bad[0]
    fixes = []
    for r in bad:
        fix = (f"read its log ('outpost agent logs {r['name']}'), fix the cause, then "
               f"'outpost agent restart {r['name']}'")
        if r.get("code") == "E9166":
            fix = "stop the process holding the port (named above) or give the module " \
                  "another port; " + fix
        elif r.get("code") == "E9165":
            fix = "check the package name and version in the deployment and that it is " \
                  "published to this account"
        fixes.append(f"{r['name']}: {r.get('reason') or r['state']} -> {fix}")
    level = ERROR if any(r["state"] == "failed" for r in bad) else WARNING
    return problem(level, first.get("code") or "E9169", text, " | ".join(fixes), modules=rows)


@checks.add("modules", "Modules run as the deployment says (ED-3, ED-5, ED-6)",
            "each module the running agent (or the supervisor's state file) knows: state, "
            "reason, code", scenarios=("ED-3", "ED-5", "ED-6"))
def modules(ctx: AgentContext) -> Outcome:
    info = read_module_states(ctx)
    if info is None:
        return ok("no module on this machine", modules=[])
    return judge_modules(info)


@checks.add("deployment", "A deployment targets this machine (ED-11)",
            "the deployment the agent applied, or why it has none (the hub unreachable: "
            "this check is then skipped, naming the check that failed)",
            needs=("tcp",), scenarios=("ED-11",))
def deployment(ctx: AgentContext) -> Outcome:
    info = read_module_states(ctx)
    if info is not None and info.get("fetch_error"):
        return error("deployment_fetch_failed", "The agent could not fetch its deployment: "
                     f"{info['fetch_error']}")
    if info is not None and info.get("deployment"):
        return ok(f"deployment {info['deployment']} version {info['version']}",
                  deployment=info["deployment"])
    # No deployment is no fault (a machine may run none): the line says why (ED-11).
    if info is not None:
        return ok("no deployment: none targets this machine or its group (the hub said so)",
                  deployment=None, why="none_targets")
    if ctx.status is None:
        return ok("no deployment: never fetched (the agent is not running)",
                  deployment=None, why="never_fetched")
    return ok("no deployment: the hub has named none for this machine (none targets it or "
              "its group)", deployment=None, why="none_targets")


def run(ctx: AgentContext,
        on_result: Callable[[Result], None] | None = None) -> list[Result]:
    """Every agent check in order (blocking; the CLI's entry point)."""
    return asyncio.run(run_checks(checks.checks, ctx, on_result))
