"""The module supervisor (agent/modules/supervisor.py) through its one seam to the hub (a
fake ``ModuleChannel``), with real package archives, REAL module processes (shell scripts),
real signals (kill -9), real sockets (a taken port), the real module user and the machine's
real control groups where it has them.

Timings are measured with small backoff numbers (0.2 s base): a kill -9 must be acted on
within a second, and each restart must come after its wait, not before.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import pwd
import signal
import socket
import subprocess
import tarfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from outpost.agent import cgroups
from outpost.agent.modules.channel import package_refused
from outpost.agent.modules.procs import proc_stat
from outpost.agent.modules.supervisor import Supervisor
from outpost.protocol.extpackage import digest
from outpost.protocol.modreaders import DeploymentDoc, ModulesReport
from outpost.protocol.modules import DeploymentManifest
from tests.support import shared_dir

ROOT = os.geteuid() == 0
SH = "/bin/sh"
FAST = {"base_seconds": 0.2, "cap_seconds": 0.8, "reset_after_seconds": 30,
        "max_restarts": 3}


# --- packages and the fake hub ---------------------------------------------------------------
def module_package(name: str, version: str, script: str) -> bytes:
    buffer = io.BytesIO()
    members = {
        "outpost-module.json": (json.dumps({"name": name, "version": version,
                                            "run": {"run": "bin/run"}}).encode(), 0o644),
        "bin/run": (f"#!/bin/sh\n{script}\n".encode(), 0o755),
    }
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path, (content, mode) in members.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(content), mode
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


@dataclass
class FakeChannel:
    packages: dict[tuple[str, str], bytes] = field(default_factory=dict)
    refused: dict[tuple[str, str], int] = field(default_factory=dict)
    reports: list[ModulesReport] = field(default_factory=list)
    doc: DeploymentDoc | None = None

    async def fetch_deployment(self) -> DeploymentDoc:
        assert self.doc is not None
        return self.doc

    async def fetch_package(self, name: str, version: str) -> tuple[bytes, str | None]:
        if (name, version) in self.refused:  # as HttpChannel raises it
            raise package_refused("", name, version, self.refused[(name, version)])
        data = self.packages[(name, version)]
        return data, digest(data)

    async def report(self, report: ModulesReport) -> None:
        self.reports.append(report)


def deployment(modules: dict[str, Any], etag: str = "e1") -> DeploymentDoc:
    """As the agent reads it: checked by the hub's model, then read without pydantic."""
    manifest = DeploymentManifest.model_validate({"modules": modules}).model_dump(mode="json")
    return DeploymentDoc.read({"etag": etag, "deployment": "d", "version": 1,
                               "manifest": manifest})


def sh(script: str, **spec: Any) -> dict[str, Any]:
    return {"command": [SH, "-c", script], **spec}


# --- the machine -----------------------------------------------------------------------------
@dataclass
class Machine:
    state: Path
    shared: Path
    hierarchy: cgroups.Hierarchy | None
    channel: FakeChannel = field(default_factory=FakeChannel)
    made: list[Supervisor] = field(default_factory=list)

    def supervisor(self) -> Supervisor:
        sup = Supervisor(self.state, self.channel, self.shared / "hub.sock",
                         hierarchy=self.hierarchy, root=self.shared / "tree")
        self.made.append(sup)
        return sup


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Machine]:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    hierarchy: cgroups.Hierarchy | None
    try:
        hierarchy = cgroups.detect(f"mod-test-{uuid.uuid4().hex}")
    except (cgroups.Unavailable, PermissionError):
        hierarchy = None
    with shared_dir() as shared:
        (shared / "tree").mkdir(mode=0o711)
        yield Machine(state, shared, hierarchy)
        if hierarchy is not None:
            for base in set(hierarchy.bases.values()):
                for group in base.glob("mod-*"):
                    with contextlib.suppress(OSError):
                        cgroups.Group(hierarchy.version, {"memory": group, "pids": group,
                                                          "cpu": group}).empty()
                        group.rmdir()
                with contextlib.suppress(OSError):
                    base.rmdir()


def run(machine: Machine, body: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        try:
            await asyncio.wait_for(body(), 60)
        finally:
            for sup in reversed(machine.made):
                await sup.stop_all()
    asyncio.run(main())


async def until(check: Callable[[], Any], timeout: float = 5.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)


def status(sup: Supervisor, name: str) -> Any:
    return {s.name: s for s in sup.statuses()}[name]


def running_pid(sup: Supervisor, name: str, not_pid: int | None = None) -> Any:
    s = status(sup, name)
    return s.pid if s.state == "running" and s.pid and s.pid != not_pid else None


def gone(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/status")
    try:
        return "State:\tZ" in stat.read_text()
    except OSError:
        return True


# --- start, order, user, limits --------------------------------------------------------------
def test_start_order_waits_for_a_healthy_lower_order(machine: Machine) -> None:
    trace, ready = machine.shared / "trace", machine.shared / "ready"

    async def body() -> None:
        sup = machine.supervisor()
        await sup.apply(deployment({
            "a": sh(f'echo "a $(id -un) $OUTPOST_MODULE_NAME $OUTPOST_MODULE_SOCKET $X" '
                    f'>> {trace}; exec sleep 300', env={"X": "x1"}, order=0,
                    health={"command": [SH, "-c", f"test -f {ready}"],
                            "interval_seconds": 0.1, "failures": 100}),
            "b": sh(f'echo "b $(id -un)" >> {trace}; cat /proc/self/cgroup >> {trace}; '
                    f'echo end >> {trace}; exec sleep 300', order=1),
        }))
        await until(lambda: trace.exists(), what="a started")
        await asyncio.sleep(0.5)
        assert status(sup, "a").state == "starting"  # its probe has not passed yet
        b = status(sup, "b")
        assert b.state == "starting" and "waiting for the modules of a lower order: a" in (
            b.reason or "")
        assert b.pid is None
        ready.touch()
        await until(lambda: running_pid(sup, "b"), what="b running once a is healthy")
        assert status(sup, "a").healthy is True
        # Everything b writes, its control groups included (read only once it is all there).
        await until(lambda: trace.read_text().endswith("end\n"), what="b wrote")
        lines = trace.read_text().splitlines()
        user = "outpost-mod" if ROOT else pwd.getpwuid(os.getuid()).pw_name
        assert lines[0] == f"a {user} a {machine.shared / 'hub.sock'} x1"
        assert lines[1] == f"b {user}"
        if machine.hierarchy is not None:
            assert any(line.endswith("/mod-b") for line in lines[2:] if ":memory:" in line
                       or line.startswith("0::"))
    run(machine, body)


# --- kill -9, backoff, failed ----------------------------------------------------------------
def test_kill9_is_seen_within_a_second_and_backoff_doubles_then_failed(
        machine: Machine) -> None:
    async def body() -> None:
        sup = machine.supervisor()
        await sup.apply(deployment({"m": sh("exec sleep 300", backoff=FAST)}))
        pid = await until(lambda: running_pid(sup, "m"), what="m running")
        waits = []
        for expected in (0.2, 0.4, 0.8):
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            await until(lambda: status(sup, "m").state == "backoff", 1.0, "kill -9 seen")
            seen = time.monotonic() - killed
            assert seen < 1.0
            s = status(sup, "m")
            assert s.exit_code == 137 and s.next_try_at is not None
            new = await until(lambda p=pid: running_pid(sup, "m", p), 3.0, "restarted")
            waits.append(time.monotonic() - killed)
            assert expected <= waits[-1] < expected + 0.5, waits
            pid = new
        assert status(sup, "m").restart_count == 3
        os.kill(pid, signal.SIGKILL)
        await until(lambda: status(sup, "m").state == "failed", 1.0, "failed")
        s = status(sup, "m")
        assert s.code == "E9169" and "ended 4 times in a row" in (s.reason or "")
        await asyncio.sleep(1.0)
        assert status(sup, "m").state == "failed" and status(sup, "m").pid is None
        # The next deployment clears failed.
        await sup.apply(deployment({"m": sh("exec sleep 300", backoff=FAST)}, etag="e2"))
        await until(lambda: running_pid(sup, "m"), what="running after a new deployment")
        assert status(sup, "m").restart_count == 0
    run(machine, body)


def test_a_run_longer_than_reset_after_clears_the_count(machine: Machine) -> None:
    async def body() -> None:
        sup = machine.supervisor()
        spec = sh("exec sleep 300", backoff={**FAST, "reset_after_seconds": 0.6,
                                             "max_restarts": 1})
        await sup.apply(deployment({"m": spec}))
        pid = await until(lambda: running_pid(sup, "m"))
        os.kill(pid, signal.SIGKILL)
        pid = await until(lambda p=pid: running_pid(sup, "m", p), what="restart 1")
        assert status(sup, "m").restart_count == 1
        await asyncio.sleep(0.8)  # longer than reset_after
        os.kill(pid, signal.SIGKILL)
        await until(lambda p=pid: running_pid(sup, "m", p), what="restarted, not failed")
        assert status(sup, "m").restart_count == 1
    run(machine, body)


def test_restart_policies_on_exit(machine: Machine) -> None:
    async def body() -> None:
        sup = machine.supervisor()
        await sup.apply(deployment({
            "clean": sh("exit 0", restart_policy="on-failure", backoff=FAST),
            "broken": sh("exit 3", restart_policy="on-failure", backoff=FAST),
            "once": sh("exit 4", restart_policy="never", backoff=FAST),
            "always": sh("exit 0", restart_policy="always", backoff=FAST),
        }))
        await until(lambda: status(sup, "clean").state == "stopped", what="clean stopped")
        await until(lambda: status(sup, "once").state == "failed", what="once failed")
        await until(lambda: status(sup, "broken").state == "failed", what="broken failed")
        await until(lambda: status(sup, "always").state == "failed", what="always failed")
        clean = status(sup, "clean")
        assert clean.exit_code == 0 and clean.restart_count == 0
        once = status(sup, "once")
        assert once.exit_code == 4 and once.restart_count == 0
        assert "restart policy never" in (once.reason or "")
        assert status(sup, "broken").restart_count == 3
        assert status(sup, "broken").exit_code == 3
        assert status(sup, "always").restart_count == 3
    run(machine, body)


# --- health ----------------------------------------------------------------------------------
def test_a_failing_probe_makes_unhealthy_and_on_unhealthy_restarts(machine: Machine) -> None:
    async def body() -> None:
        sup = machine.supervisor()
        probe = {"command": [SH, "-c", "echo not yet; exit 1"], "interval_seconds": 0.1,
                 "failures": 2}
        await sup.apply(deployment({
            "keep": sh("exec sleep 300", health=probe, backoff=FAST),
            "cycle": sh("exec sleep 300", health=probe, restart_policy="on-unhealthy",
                        backoff=FAST),
        }))
        await until(lambda: status(sup, "keep").state == "unhealthy", what="unhealthy")
        keep = status(sup, "keep")
        assert keep.code == "E9170" and keep.healthy is False
        assert "exited with 1: not yet" in (keep.reason or "")
        first = keep.pid
        assert first is not None and not gone(first)
        await until(lambda: status(sup, "cycle").restart_count >= 1, what="cycle restarted")
        assert status(sup, "keep").pid == first  # 'always' does not restart an unhealthy one
        assert status(sup, "keep").restart_count == 0
    run(machine, body)


def test_an_http_probe_on_loopback(machine: Machine) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    server.close()
    script = (f"exec python3 -c 'import http.server as h; "
              f"h.HTTPServer((\"127.0.0.1\", {port}), h.SimpleHTTPRequestHandler)"
              f".serve_forever()'")

    async def body() -> None:
        sup = machine.supervisor()
        await sup.apply(deployment({
            "web": sh(script, health={"http": f"http://127.0.0.1:{port}/",
                                      "interval_seconds": 0.1}),
            "dead": sh("exec sleep 300", health={"http": f"http://127.0.0.1:{port}/nope",
                                                 "interval_seconds": 0.1, "failures": 1}),
        }))
        await until(lambda: status(sup, "web").healthy is True, what="web healthy")
        await until(lambda: status(sup, "dead").state == "unhealthy", what="dead unhealthy")
        assert "answered 404" in (status(sup, "dead").reason or "")
    run(machine, body)


# --- ED-5, ED-6 ------------------------------------------------------------------------------
def test_a_taken_port_fails_the_start_naming_the_holder(machine: Machine) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]

    async def body() -> None:
        sup = machine.supervisor()
        await sup.apply(deployment({"m": sh("exec sleep 300", ports=[port],
                                            backoff={**FAST, "max_restarts": 1})}))
        await until(lambda: status(sup, "m").state == "backoff", what="backoff")
        s = status(sup, "m")
        assert s.code == "E9166" and s.pid is None
        assert f"Bind for 0.0.0.0:{port} failed: port is already allocated" in (s.reason or "")
        assert f"(pid {os.getpid()})" in (s.reason or "")
        await until(lambda: status(sup, "m").state == "failed", what="failed")
        taken.close()
        await sup.restart("m")
        await until(lambda: running_pid(sup, "m"), what="runs once the port is free")
    try:
        run(machine, body)
    finally:
        taken.close()


def test_a_refused_package_says_the_status_and_points_at_the_package(
        machine: Machine) -> None:
    machine.channel.refused[("secret", "1.0.0")] = 403
    data = module_package("hello", "2.0.0", 'echo "hello from $(pwd)"; exec sleep 300')
    machine.channel.packages[("hello", "2.0.0")] = data

    async def body() -> None:
        sup = machine.supervisor()
        await sup.apply(deployment({
            "m": {"package": {"name": "secret", "version": "1.0.0"},
                  "backoff": {**FAST, "max_restarts": 0}},
            "h": {"package": {"name": "hello", "version": "2.0.0", "sha256": digest(data)}},
        }))
        await until(lambda: status(sup, "m").state == "failed", what="failed")
        s = status(sup, "m")
        assert "returned 403" in (s.reason or "")
        assert "secret 1.0.0 of module m" in (s.reason or "")
        assert "credentials the deployment manifest" in (s.reason or "")
        assert s.code == "E9165"
        await until(lambda: running_pid(sup, "h"), what="h running")
        assert status(sup, "h").version == "2.0.0"
        await until(lambda: "hello from" in sup.log_path("h").read_text(), what="h's log")
    run(machine, body)


# --- stopped, removed, restart ---------------------------------------------------------------
def test_desired_stopped_then_removed(machine: Machine) -> None:
    # A module that ignores TERM is killed at its stop timeout, with its children.
    script = "trap '' TERM; sleep 300 & echo $! > {f}; wait"

    async def body() -> None:
        sup = machine.supervisor()
        child = machine.shared / "child"
        spec = sh(script.format(f=child), stop_timeout_seconds=0.3)
        await sup.apply(deployment({"m": spec, "n": sh("exec sleep 300")}))
        pid = await until(lambda: running_pid(sup, "m"))
        await until(lambda: child.exists() and child.read_text().strip())
        kid = int(child.read_text())
        assert sup.owner_of(kid) == "m"
        stopped = time.monotonic()
        await sup.apply(deployment({"m": {**spec, "status": "stopped"},
                                    "n": sh("exec sleep 300")}, etag="e2"))
        assert 0.25 < time.monotonic() - stopped < 3
        assert status(sup, "m").state == "stopped"
        await until(lambda: gone(pid) and gone(kid), 2, "leader and child gone")
        n = status(sup, "n").pid
        assert n is not None
        await sup.apply(deployment({}, etag="e3"))
        assert sup.statuses() == []
        await until(lambda: gone(n), 2, "removed module's process gone")
    run(machine, body)


def test_restart_one_module(machine: Machine) -> None:
    async def body() -> None:
        sup = machine.supervisor()
        await sup.apply(deployment({"m": sh("exec sleep 300")}))
        pid = await until(lambda: running_pid(sup, "m"))
        await sup.restart("m")
        await until(lambda: running_pid(sup, "m", pid), what="a new process")
        assert gone(pid)
        with pytest.raises(Exception) as exc:
            await sup.restart("nope")
        assert getattr(exc.value, "code", "") == "E9172"
    run(machine, body)


# --- adoption --------------------------------------------------------------------------------
def test_a_new_supervisor_adopts_running_modules_and_sees_a_later_kill(
        machine: Machine) -> None:
    async def body() -> None:
        first = machine.supervisor()
        await first.apply(deployment({"a": sh("exec sleep 300", backoff=FAST),
                                      "b": sh("exec sleep 300", backoff=FAST, order=1)}))
        a = await until(lambda: running_pid(first, "a"))
        b = await until(lambda: running_pid(first, "b"))
        await first.close()  # the agent stops: its modules do not
        machine.made.remove(first)
        assert not gone(a) and not gone(b)
        second = machine.supervisor()
        await second.start()
        assert status(second, "a").pid == a and status(second, "b").pid == b
        assert status(second, "a").state == "running"
        await asyncio.sleep(0.3)
        assert status(second, "a").pid == a  # no second copy was started
        started = [p for p in os.listdir("/proc") if p.isdigit() and proc_stat(int(p))
                   and proc_stat(int(p))[2] in (a, b)]  # type: ignore[index]
        assert sorted(int(p) for p in started) == sorted([a, b])
        killed = time.monotonic()
        os.kill(a, signal.SIGKILL)
        await until(lambda: status(second, "a").state == "backoff", 1.0, "kill seen")
        assert time.monotonic() - killed < 1.0
        assert status(second, "a").exit_code is None  # not its child: the status is unknown
        await until(lambda: running_pid(second, "a", a), what="restarted")
        # A module whose spec changed while no agent ran is started afresh.
        await second.close()
        machine.made.remove(second)
        third = machine.supervisor()
        await third.start()
        assert status(third, "b").pid == b
        await third.apply(deployment({"a": sh("exec sleep 300", backoff=FAST),
                                      "b": sh("exec sleep 301", order=1)}, etag="e2"))
        await until(lambda: running_pid(third, "b", b), what="b replaced")
        assert gone(b)
    run(machine, body)


# --- owner_of --------------------------------------------------------------------------------
def test_owner_of_a_child_and_not_of_a_foreign_process(machine: Machine) -> None:
    kids = machine.shared / "kids"
    # A child, a child in a session of its own, and an orphan in a session of its own
    # (its parent gone: only the control group tells whose it is).
    script = (f"sleep 300 & echo $! >> {kids}; setsid sleep 300 & echo $! >> {kids}; "
              f"(setsid sleep 300 & echo $! >> {kids}); exec sleep 300")

    async def body() -> None:
        sup = machine.supervisor()
        await sup.apply(deployment({"m": sh(script)}))
        leader = await until(lambda: running_pid(sup, "m"))
        await until(lambda: kids.exists() and len(kids.read_text().split()) == 3)
        child, escaped, orphan = (int(p) for p in kids.read_text().split())
        await until(lambda: proc_stat(escaped) and proc_stat(escaped)[2] == escaped,  # type: ignore[index]
                    what="setsid done")
        assert sup.owner_of(leader) == "m"
        assert sup.owner_of(child) == "m"
        assert sup.owner_of(escaped) == "m"  # its own session: found by cgroup or parent
        await until(lambda: proc_stat(orphan) and proc_stat(orphan)[2] == orphan  # type: ignore[index]
                    and proc_stat(orphan)[0] != leader, what="orphaned")  # type: ignore[index]
        if machine.hierarchy is not None:
            assert sup.owner_of(orphan) == "m"
        # A process of the test's (another user when root) calling itself the module.
        foreign = subprocess.Popen(["/bin/bash", "-c", "exec -a m sleep 300"],
                                   start_new_session=True)
        try:
            assert sup.owner_of(foreign.pid) is None
            assert sup.owner_of(os.getpid()) is None
            assert sup.owner_of(999_999_999) is None
        finally:
            foreign.kill()
            foreign.wait()
    run(machine, body)


# --- dns -------------------------------------------------------------------------------------
@pytest.mark.skipif(not ROOT, reason="a module's own resolv.conf needs a root agent")
def test_dns_as_root_gives_the_module_its_own_resolv_conf(machine: Machine) -> None:
    before = Path("/etc/resolv.conf").read_text()

    async def body() -> None:
        sup = machine.supervisor()
        await sup.apply(deployment({"m": sh("cat /etc/resolv.conf; exec sleep 300",
                                            dns=["192.0.2.53", "2001:db8::53"])}))
        await until(lambda: running_pid(sup, "m"))
        await until(lambda: "nameserver 2001:db8::53" in sup.log_path("m").read_text(),
                    what="the module printed its resolv.conf")
        assert "nameserver 192.0.2.53" in sup.log_path("m").read_text()
        assert Path("/etc/resolv.conf").read_text() == before
    run(machine, body)


def test_dns_refused_by_an_agent_that_is_not_root(machine: Machine,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import outpost.agent.modules.supervisor as supervisor_mod

    async def body() -> None:
        sup = machine.supervisor()
        monkeypatch.setattr(supervisor_mod.os, "geteuid", lambda: 1000)
        await sup.apply(deployment({"m": sh("exec sleep 300", dns=["192.0.2.53"])}))
        await until(lambda: status(sup, "m").state == "failed")
        assert status(sup, "m").code == "E9168"
        assert status(sup, "m").restart_count == 0
    run(machine, body)


def test_the_log_is_bounded(machine: Machine) -> None:
    script = "i=0; while [ $i -lt 4000 ]; do echo line $i; i=$((i+1)); done; exec sleep 300"

    async def body() -> None:
        sup = machine.supervisor()
        sup.log_max_bytes = 4096
        await sup.apply(deployment({"m": sh(script)}))
        await until(lambda: sup.log_path("m").with_name("m.log.1").exists(), 5, "rotated")
        await asyncio.sleep(0.1)
        assert sup.log_path("m").stat().st_size < 40_000
    run(machine, body)


# --- the daemon's side: fetch on a new etag, batched reports, restart over the socket ----------
def test_the_hook_fetches_on_a_new_etag_reports_and_restarts_on_request(
        machine: Machine) -> None:
    from outpost.agent.modules import hook

    async def body() -> None:
        machine.channel.doc = deployment({"m": sh("exec sleep 300")}, etag="e7")
        modules = hook.Modules(machine.state, None, channel=machine.channel,
                               hierarchy=machine.hierarchy,
                               socket_path=machine.shared / "hub.sock")
        modules.supervisor.runtime._root = machine.shared / "tree"
        machine.made.append(modules.supervisor)
        tasks = [asyncio.create_task(modules.run()), asyncio.create_task(modules.report_loop()),
                 asyncio.create_task(modules.control())]
        try:
            modules.note_etag("e7")
            pid = await until(lambda: "m" in {s.name for s in modules.supervisor.statuses()}
                              and running_pid(modules.supervisor, "m"), what="applied")
            # The message hub listens where the module was told to connect.
            assert modules.status()["socket"] == str(machine.shared / "hub.sock")
            assert (machine.shared / "hub.sock").is_socket()
            assert modules.supervisor.module_socket == machine.shared / "hub.sock"
            report = await until(lambda: [r for r in machine.channel.reports
                                          if r.modules and r.modules[0].state == "running"],
                                 3, "a report")
            assert report[-1].etag == "e7" and report[-1].deployment == "d"
            assert len(machine.channel.reports) <= 3  # batched, not one per change
            assert modules.status()["modules"][0]["pid"] == pid
            await until(lambda: hook.control_path(machine.state).exists(), what="socket")
            answer = await asyncio.to_thread(hook.ask_restart, machine.state, "m")
            assert answer == {"ok": True}
            await until(lambda: running_pid(modules.supervisor, "m", pid), what="restarted")
            answer = await asyncio.to_thread(hook.ask_restart, machine.state, "nope")
            assert answer["ok"] is False and answer["error"]["code"] == "E9172"
            # The same etag again fetches nothing; a deployment that names nothing removes.
            machine.channel.doc = DeploymentDoc(etag="e8")
            modules.note_etag("e8")
            await until(lambda: modules.supervisor.statuses() == [], what="removed")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await modules.messages.close()
    run(machine, body)


# --- outpost check and the logs --------------------------------------------------------------
def test_the_modules_check_names_failed_ones_with_reason_and_fix() -> None:
    from outpost.agent.checks import judge_modules

    good = judge_modules({"live": True, "modules": [
        {"name": "a", "state": "running", "reason": None, "code": None}]})
    assert good.result == "ok"
    bad = judge_modules({"live": True, "modules": [
        {"name": "a", "state": "running", "reason": None, "code": None},
        {"name": "b", "state": "backoff", "code": "E9166",
         "reason": "Bind for 0.0.0.0:80 failed: port is already allocated. It is held by "
                   "nginx (pid 12)."},
        {"name": "c", "state": "failed", "code": "E9165", "reason": "... returned 403 ..."}]})
    assert bad.result == "error"
    assert "nginx (pid 12)" in (bad.fix or "") and "returned 403" in (bad.fix or "")
    assert "outpost agent restart b" in (bad.fix or "")


def test_a_module_log_since_and_follow_across_rotation(tmp_path: Path) -> None:
    from outpost.agent.modules import logview

    assert logview.path(tmp_path, "../etc") is None
    path = logview.path(tmp_path, "m")
    assert path is not None
    assert logview.read(path) is None
    path.parent.mkdir(parents=True)
    old = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600))
    new = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
    path.with_name("m.log.1").write_text(f"--- {old} outpost: starting m\nold line\n")
    path.write_text(f"--- {new} outpost: starting m\nnew line\n")
    assert logview.read(path) == [f"--- {old} outpost: starting m", "old line",
                                  f"--- {new} outpost: starting m", "new line"]
    assert logview.read(path, time.time() - 600) == [f"--- {old} outpost: starting m",
                                                     "old line", f"--- {new} outpost: "
                                                     "starting m", "new line"][0:4]
    assert logview.read(path, time.time() - 30)[0] == f"--- {new} outpost: starting m"
    lines = logview.follow(path, 0.01)
    with open(path, "a") as fh:
        fh.write("later\n")
    assert next(lines) == "later"
    os.truncate(path, 0)  # rotated
    with open(path, "a") as fh:
        fh.write("after rotation\n")
    assert next(lines) == "after rotation"
