"""Modules end to end: a real hub process, real agent processes running real module
processes, and each fault made for real (kill -9, a probe that fails, a port held, a
package refused, the agent restarting)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import Agent, Hub, registered_agent, run_cli, stop_process, wait_until


def _json(done: Any) -> Any:
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def started() -> Iterator[list[Agent]]:
    """Agents started by a test; stopped after it, and their modules killed."""
    agents: list[Agent] = []
    yield agents
    for agent in agents:
        agent.stop()
        pids = []
        status = agent.state_dir / "modules" / "supervisor.json"
        if status.exists():
            try:
                body = json.loads(status.read_text())
                pids = [r["pid"] for r in (body.get("data", body).get("modules") or {}
                                           ).values()]
            except (ValueError, AttributeError, KeyError):
                pass
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _agent(hub: Hub, tmp: Path, started: list[Agent], name: str, group: str,
           **config: Any) -> Agent:
    agent = registered_agent(hub, tmp, name, group, **config)
    started.append(agent.start())
    wait_until(lambda: name in hub.machines() and agent.status() is not None, 20,
               what=f"agent {name}")
    return agent


def _deploy(hub: Hub, tmp: Path, name: str, body: str, *target: str) -> dict[str, Any]:
    path = tmp / f"{name}.yaml"
    path.write_text("schema_version: 1\n" + body)
    return _json(hub.cli("deployment", "create", name, str(path), *target, "--json"))


def _rollout(hub: Hub, name: str) -> dict[str, Any]:
    return _json(hub.cli("deployment", "rollout", name, "--json"))


def _mods(agent: Agent) -> dict[str, dict[str, Any]]:
    status = agent.status() or {}
    mods = (status.get("modules") or {}).get("modules") or []
    return {m["name"]: m for m in mods}


def _wait_state(agent: Agent, module: str, state: str, timeout: float = 20) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        m = _mods(agent).get(module)
        return m if m is not None and m["state"] == state else None
    found: dict[str, Any] = wait_until(check, timeout, 0.02,
                                       f"{module} {state}: {agent.status()}")
    return found


SLEEP = '    command: ["/bin/sleep", "3600"]\n'


def test_deploy_to_a_group_rollout_wait_and_status_agree(hub: Hub, tmp_path: Path,
                                                         started: list[Agent]) -> None:
    from tests.deploybuild import module_package

    archive = tmp_path / "pkg.tar.gz"
    archive.write_bytes(module_package("pkg", "1.0.0"))
    assert hub.cli("module", "publish", str(archive)).returncode == 0
    agent = _agent(hub, tmp_path, started, "g1", "edge")
    _deploy(hub, tmp_path, "main", "modules:\n  s:\n" + SLEEP
            + "  p:\n    package: {name: pkg}\n", "--group", "edge")
    waited = _json(hub.cli("deployment", "rollout", "main", "--wait", "30", "--json"))
    assert waited["complete"] is True, waited
    machine = waited["machines"][0]
    assert (machine["machine"], machine["status"]) == ("g1", "applied"), waited
    rows = {x["name"]: x for x in machine["modules"]}
    assert {n: x["state"] for n, x in rows.items()} == {"s": "running", "p": "running"}
    assert rows["p"]["version"] == "1.0.0"
    for row in rows.values():
        assert row["pid"] and os.path.exists(f"/proc/{row['pid']}")
    if os.geteuid() == 0:  # a root agent runs the modules as the unprivileged outpost-mod
        import pwd

        owner = os.stat(f"/proc/{rows['p']['pid']}").st_uid
        assert pwd.getpwuid(owner).pw_name == "outpost-mod"
    shown = _json(hub.cli("machine", "show", "g1", "--json"))["deployment"]
    assert (shown["name"], shown["reason"], shown["modules"]) == ("main", None,
                                                                 {"running": 2})
    local = _json(run_cli("agent", "status", "--state-dir", str(agent.state_dir), "--json"))
    mods = {m["name"]: m for m in local["modules"]["modules"]}
    assert {n: (m["state"], m["pid"]) for n, m in mods.items()} == {
        n: ("running", x["pid"]) for n, x in rows.items()}, local["modules"]
    # A package downloaded, checked and unpacked, and still no pydantic in the agent (its
    # memory budget: docs/architecture.md).
    assert agent.proc is not None
    assert "_pydantic_core" not in Path(f"/proc/{agent.proc.pid}/maps").read_text()


def _kill_and_see(agent: Agent, module: str, pid: int, state: str) -> tuple[float, dict[str, Any]]:
    """kill -9 the module's process; the time until the agent reports it ``state``."""
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()

    def seen() -> dict[str, Any] | None:
        m = _mods(agent).get(module)
        return m if m is not None and m["pid"] != pid and m["state"] == state else None
    found: dict[str, Any] = wait_until(seen, 10, 0.01, f"{module} {state} after kill -9")
    return time.monotonic() - killed, found


def _running_again(agent: Agent, module: str, old: int) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        m = _mods(agent).get(module)
        return m if m and m["state"] == "running" and m["pid"] not in (None, old) else None
    found: dict[str, Any] = wait_until(check, 10, 0.01, f"{module} running again")
    return found


def test_kill_9_backs_off_doubling_then_failed_until_restarted(
        module_sqlite_hub: Hub, tmp_path: Path, started: list[Agent]) -> None:
    hub = module_sqlite_hub
    agent = _agent(hub, tmp_path, started, "k1", "kill")
    text = ("modules:\n  crash:\n" + SLEEP
            + "    backoff: {base_seconds: 0.2, cap_seconds: 1, max_restarts: 4}\n"
            + "  once:\n" + SLEEP + "    backoff: {max_restarts: 0}\n")
    _deploy(hub, tmp_path, "kill", text, "--group", "kill")
    pid = _wait_state(agent, "crash", "running")["pid"]
    gaps = []
    for count in range(1, 5):
        took, m = _kill_and_see(agent, "crash", pid, "backoff")
        assert took < 1.0, took
        assert (m["exit_code"], m["restart_count"]) == (137, count), m
        seen = time.monotonic()
        pid = _running_again(agent, "crash", pid)["pid"]
        gaps.append(time.monotonic() - seen)
    for wait, gap in zip((0.2, 0.4, 0.8, 1.0), gaps, strict=True):
        assert wait - 0.05 <= gap <= wait + 0.6, gaps
    assert gaps[1] > 1.5 * gaps[0] and gaps[2] > 1.5 * gaps[1], gaps
    took, m = _kill_and_see(agent, "crash", pid, "failed")
    assert took < 1.0 and m["code"] == "E9169" and m["exit_code"] == 137, m
    assert "5 times in a row" in m["reason"] and "SIGKILL" in m["reason"], m
    rolled = wait_until(lambda: (r := _rollout(hub, "kill"))["machines"][0]["modules"][0][
        "state"] == "failed" and r, 10, 0.1, "rollout failed")
    row = rolled["machines"][0]
    assert row["status"] == "failing" and row["modules"][0]["restart_count"] == 4, row
    once = _wait_state(agent, "once", "running")["pid"]
    took, m = _kill_and_see(agent, "once", once, "failed")
    assert took < 1.0 and m["code"] == "E9169", m
    table = hub.cli("deployment", "rollout", "kill").stdout
    for said in ("crash=failed (exit 137", "(SIGKILL)) restarts=4", "(E9169)"):
        assert said in table, table
    # ED-3: `outpost agent restart MODULE` clears that module only...
    done = run_cli("agent", "restart", "once", "--state-dir", str(agent.state_dir))
    assert done.returncode == 0, done.stdout + done.stderr
    m = _wait_state(agent, "once", "running")
    assert m["restart_count"] == 0 and m["code"] is None, m
    kept = m["pid"]
    assert _mods(agent)["crash"]["state"] == "failed"
    # ... and a new deployment clears every failed one, leaving the running ones be.
    _deploy(hub, tmp_path, "kill", text, "--group", "kill")
    m = _wait_state(agent, "crash", "running")
    assert m["restart_count"] == 0 and m["code"] is None, m
    assert _mods(agent)["once"]["pid"] == kept


def test_failing_probes_make_modules_unhealthy_and_on_unhealthy_restarts(
        module_sqlite_hub: Hub, tmp_path: Path, started: list[Agent]) -> None:
    from tests.support import free_port

    hub = module_sqlite_hub
    agent = _agent(hub, tmp_path, started, "h1", "health")
    port = free_port()
    _deploy(hub, tmp_path, "health", "modules:\n  web:\n" + SLEEP
            + f"    health: {{http: 'http://127.0.0.1:{port}/', interval_seconds: 0.2, "
            "failures: 2, timeout_seconds: 1}\n"
            "  cmd:\n" + SLEEP + "    restart_policy: on-unhealthy\n"
            "    backoff: {base_seconds: 1, cap_seconds: 1}\n"
            "    health: {command: ['/bin/sh', '-c', 'echo probe says no; exit 1'], "
            "interval_seconds: 0.2, failures: 2}\n", "--group", "health")
    web = _wait_state(agent, "web", "unhealthy")
    assert web["code"] == "E9170" and str(port) in web["reason"], web
    first = wait_until(lambda: _mods(agent).get("cmd", {}).get("pid"), 10, 0.02, "cmd pid")
    m = wait_until(lambda: (x := _mods(agent)["cmd"])["state"] == "backoff" and x, 10, 0.02,
                   "cmd stopped for its probe")  # its backoff: 1 s before the restart
    # 1, or 2 when a loaded machine let the restart fail its probe again between two looks.
    assert m["restart_count"] >= 1 and m["code"] == "E9170", m
    assert "probe says no" in (m["reason"] or ""), m
    assert not os.path.exists(f"/proc/{first}") or _stat_state(first) == "Z"
    wait_until(lambda: _mods(agent)["cmd"]["pid"] not in (None, first), 10, 0.02,
               "cmd started again")
    assert _mods(agent)["web"]["restart_count"] == 0  # policy always: left running


def _stat_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_a_port_in_use_names_its_holder_in_rollout_and_check(
        module_sqlite_hub: Hub, tmp_path: Path, started: list[Agent]) -> None:
    import socket

    hub = module_sqlite_hub
    agent = _agent(hub, tmp_path, started, "p1", "ports")
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("0.0.0.0", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        _deploy(hub, tmp_path, "ports", "modules:\n  srv:\n" + SLEEP + f"    ports: [{port}]\n"
                "    backoff: {base_seconds: 5, cap_seconds: 5}\n", "--group", "ports")
        text = f"Bind for 0.0.0.0:{port} failed: port is already allocated"
        m = wait_until(lambda: (x := _mods(agent).get("srv")) and x["state"] == "backoff"
                       and x, 20, 0.05, "srv backoff")
        assert text in m["reason"] and f"pid {os.getpid()}" in m["reason"], m
        assert m["code"] == "E9166"
        rolled = wait_until(lambda: (r := _rollout(hub, "ports"))["machines"][0]["modules"]
                            and r, 10, 0.1, "rollout")
        assert text in rolled["machines"][0]["modules"][0]["reason"]
        checked = run_cli("check", "--state-dir", str(agent.state_dir), "--json")
        assert text in checked.stdout and "E9166" in checked.stdout, checked.stdout
    finally:
        holder.close()


def test_a_refused_package_says_403_and_points_at_package_and_credentials(
        module_sqlite_hub: Hub, tmp_path: Path, started: list[Agent]) -> None:
    """The agent's own channel asks for a package its deployment does not name."""
    import asyncio

    from outpost.agent.modules.channel import HttpChannel
    from outpost.agent.registration import client_for
    from outpost.agent.state import StateDir
    from outpost.agent.transport import Clock
    from outpost.protocol.errors import OutpostError
    from tests.deploybuild import module_package

    hub = module_sqlite_hub
    archive = tmp_path / "secret.tar.gz"
    archive.write_bytes(module_package("secret", "1.0.0"))
    assert hub.cli("module", "publish", str(archive)).returncode == 0
    agent = registered_agent(hub, tmp_path, "r1", "refused")
    state = StateDir(agent.state_dir)
    reg = state.registration()
    assert reg is not None

    async def fetch() -> OutpostError:
        client = client_for(state, reg, Clock())
        try:
            await HttpChannel(client).fetch_package("secret", "1.0.0")
        except OutpostError as exc:
            return exc
        finally:
            await client.aclose()
        raise AssertionError("the hub gave the package")
    refused = asyncio.run(fetch())
    assert refused.details["status"] == 403, refused.details
    assert "returned 403" in refused.message and "secret 1.0.0" in refused.message
    assert "credentials" in refused.message and "package" in refused.message

    # The agent's supervisor over that channel: the module waits its backoff, its reason
    # naming it, the package and the status (what rollout and `outpost check` then show).
    async def supervised() -> Any:
        from outpost.agent.modules.supervisor import Supervisor
        from outpost.protocol.modreaders import DeploymentDoc

        client = client_for(state, reg, Clock())
        sup = Supervisor(agent.state_dir, HttpChannel(client), tmp_path / "hub.sock")
        try:
            await sup.start()
            await sup.apply(DeploymentDoc.read({
                "deployment": "stale", "version": 1, "etag": "e", "manifest": {"modules": {
                    "sec": {"package": {"name": "secret", "version": "1.0.0"},
                            "backoff": {"base_seconds": 5}}}}}))
            for _ in range(200):
                found = {m.name: m for m in sup.statuses()}["sec"]
                if found.state == "backoff":
                    return found
                await asyncio.sleep(0.05)
            raise AssertionError(f"no backoff: {found}")
        finally:
            await sup.close()
            await client.aclose()
    module = asyncio.run(supervised())
    assert module.code == "E9165" and "of module sec" in (module.reason or ""), module
    assert "returned 403" in (module.reason or "") and "credentials" in (module.reason or "")


def test_no_deployment_is_explained_and_dns_reaches_the_module(
        module_sqlite_hub: Hub, tmp_path: Path, started: list[Agent]) -> None:
    hub = module_sqlite_hub
    idle = registered_agent(hub, tmp_path, "n1", "nodeploy")
    never = _json(hub.cli("machine", "show", "n1", "--json"))["deployment"]
    assert never["reason"]["code"] == "E9158", never
    offline = run_cli("check", "--state-dir", str(idle.state_dir), "--json")
    deployment = {c["id"]: c for c in json.loads(offline.stdout)["checks"]}["deployment"]
    assert "never fetched" in deployment["details"], deployment
    started.append(idle.start())
    wait_until(lambda: idle.status() is not None, 20, what="agent n1")
    time.sleep(1.5)  # a few heartbeats: the hub has named no deployment
    checked = run_cli("check", "--state-dir", str(idle.state_dir), "--json")
    assert "none targets" in checked.stdout, checked.stdout
    shown = hub.cli("machine", "show", "n1")
    assert "No deployment targets this machine. (E9158)" in shown.stdout, shown.stdout

    agent = _agent(hub, tmp_path, started, "d1", "dns")
    _deploy(hub, tmp_path, "dns", "modules:\n  resolver:\n"
            "    command: ['/bin/sh', '-c', 'cat /etc/resolv.conf; exec sleep 3600']\n"
            "    dns: ['192.0.2.53', '198.51.100.53']\n", "--group", "dns")
    _wait_state(agent, "resolver", "running")
    logged = wait_until(lambda: "nameserver 198.51.100.53" in (
        t := (agent.state_dir / "logs" / "modules" / "resolver.log").read_text()) and t,
        10, 0.05, "the module's resolv.conf")
    assert "nameserver 192.0.2.53" in logged
    assert "192.0.2.53" not in Path("/etc/resolv.conf").read_text()


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill9"])
def test_the_agent_restarting_keeps_healthy_modules(
        module_sqlite_hub: Hub, tmp_path: Path, started: list[Agent], how: int) -> None:
    hub = module_sqlite_hub
    group = f"adopt{int(how)}"
    agent = _agent(hub, tmp_path, started, f"a{int(how)}", group)
    _deploy(hub, tmp_path, group, "modules:\n  keep:\n" + SLEEP
            + "    backoff: {base_seconds: 0.2}\n", "--group", group)
    pid = _wait_state(agent, "keep", "running")["pid"]
    agent.stop(how)
    agent.start()
    wait_until(lambda: agent.status() is not None, 20, what="agent back")
    m = _wait_state(agent, "keep", "running")
    assert m["pid"] == pid, m
    time.sleep(1.5)
    rolled = _rollout(hub, group)["machines"][0]
    assert rolled["status"] == "applied" and rolled["modules"][0]["pid"] == pid, rolled
    took, m = _kill_and_see(agent, "keep", pid, "backoff")
    assert took < 1.0, took
    _running_again(agent, "keep", pid)


def test_logs_restart_one_module_and_the_bundle(
        module_sqlite_hub: Hub, tmp_path: Path, started: list[Agent]) -> None:
    import tarfile

    hub = module_sqlite_hub
    agent = _agent(hub, tmp_path, started, "l1", "logs")
    _deploy(hub, tmp_path, "logs", "modules:\n  talk:\n"
            "    command: ['/bin/sh', '-c', 'for i in 1 2 3 4 5; do echo line-$i; done; "
            "exec sleep 3600']\n  quiet:\n" + SLEEP, "--group", "logs")
    talk = _wait_state(agent, "talk", "running")
    quiet = _wait_state(agent, "quiet", "running")
    sd = ("--state-dir", str(agent.state_dir))
    wait_until(lambda: "line-5" in run_cli("agent", "logs", "talk", *sd).stdout, 10, 0.1,
               "the module's lines")
    tail = run_cli("agent", "logs", "talk", "--tail", "2", *sd)
    assert tail.returncode == 0 and tail.stdout.split() == ["line-4", "line-5"], tail.stdout
    follow = subprocess.Popen([*_cli(), "agent", "logs", "talk", "-f", *sd],
                              stdout=subprocess.PIPE, text=True)
    try:
        done = run_cli("agent", "restart", "talk", *sd)
        assert done.returncode == 0, done.stderr
        again = wait_until(lambda: (m := _mods(agent)["talk"])["pid"] != talk["pid"]
                           and m["state"] == "running" and m, 10, 0.02, "talk restarted")
        assert again["pid"] and _mods(agent)["quiet"]["pid"] == quiet["pid"]
        seen = ""
        assert follow.stdout is not None
        deadline = time.monotonic() + 10
        while seen.count("line-5") < 2 and time.monotonic() < deadline:
            seen += follow.stdout.readline()
        assert seen.count("line-5") >= 2, seen
    finally:
        stop_process(follow)
        assert follow.stdout is not None
        follow.stdout.close()
    out = tmp_path / "bundle.tar.gz"
    made = run_cli("agent", "support-bundle", "--no-checks", "-o", str(out), *sd)
    assert made.returncode == 0, made.stderr
    with tarfile.open(out) as archive:
        names = archive.getnames()
        text = {n: archive.extractfile(n).read().decode(errors="replace")  # type: ignore
                for n in names if archive.getmember(n).isfile()}
    joined = "\n".join(f"{n}:{t}" for n, t in text.items())
    assert any("modules.json" in n for n in names), names
    assert "line-5" in joined and '"talk"' in joined, names


def _cli() -> list[str]:
    from tests.support import OUTPOST
    return list(OUTPOST)


def test_stopped_removed_order_and_priority(
        module_sqlite_hub: Hub, tmp_path: Path, started: list[Agent]) -> None:
    hub = module_sqlite_hub
    agent = _agent(hub, tmp_path, started, "o1", "order")
    _deploy(hub, tmp_path, "order", "modules:\n"
            "  first:\n    command: ['/bin/sh', '-c', 'sleep 1; exec sleep 3600']\n"
            "    health: {command: ['/bin/sh', '-c', 'test -e /proc/self'], "
            "interval_seconds: 0.5}\n"
            "  second:\n" + SLEEP + "    order: 1\n"
            "  idle:\n" + SLEEP + "    status: stopped\n", "--group", "order")
    second = _wait_state(agent, "second", "running")
    first = _mods(agent)["first"]
    assert first["state"] == "running" and first["last_start_at"] + 0.4 <= second[
        "last_start_at"], (first, second)
    idle = _mods(agent)["idle"]
    assert idle["state"] == "stopped" and idle["pid"] is None, idle
    # A higher priority deployment on the machine wins; show says which.
    _deploy(hub, tmp_path, "better", "modules:\n  first:\n" + SLEEP, "--machine", "o1",
            "--priority", "10")
    wait_until(lambda: set(_mods(agent)) == {"first"}, 20, 0.05, "second removed")
    shown = _json(hub.cli("deployment", "show", "order", "--json"))
    assert [(m["machine"], m["winner"]) for m in shown["machines"]] == [("o1", "better")]
    assert "better (priority 10)" in hub.cli("deployment", "show", "order").stdout
    assert not os.path.exists(f"/proc/{second['pid']}") or _stat_state(second["pid"]) == "Z"
    assert _json(hub.cli("machine", "show", "o1", "--json"))["deployment"]["name"] == "better"
