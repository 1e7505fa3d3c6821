"""The agent's extension reconciler (agent/extensions/reconcile.py) through its one seam to
the hub (a fake ``HubChannel``), with real package archives built here, real handler
processes, real timeouts, the real extension user and the machine's real control groups
(cgroup v1 here, v2 elsewhere).

Every handler of the packages built here appends a line to a trace file (handler, version,
uid, memory cgroup), so a test reads what ran, in which order, as whom and where.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import pwd
import sys
import tarfile
import time
import uuid
import functools
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from nacl.public import SealedBox
from nacl.signing import SigningKey

from outpost.agent import cgroups, procgroup
from outpost.agent.extensions.reconcile import Reconciler
from outpost.agent.extensions.runtime import Runtime
from outpost.agent.extensions.store import Store
from outpost.protocol.errors import TransportError
from outpost.protocol.extreaders import (
    MANIFEST_NAME, ExtensionGoal, ExtensionGoals, ExtensionStatus, ExtensionStatusReport,
)
from outpost.protocol.extpackage import digest
from tests.support import shared_dir

NAME = "demo"
OK = 'status success 0 "all good"'
FAIL = 'echo "it broke" >&2; exit 3'
HANG = "sleep 300 & echo $! >> {pids}; sleep 300"


# --- packages ------------------------------------------------------------------------------
def build(version: str, trace: Path, bodies: dict[str, str] | None = None, *,
          name: str = NAME, timeout: float = 30, limits: dict[str, Any] | None = None,
          min_agent: str = "0.0.0") -> bytes:
    """A package whose handlers each record themselves in ``trace`` and then run their body
    (default: write a success status)."""
    bodies = bodies or {}
    files: dict[str, tuple[bytes, int]] = {}
    handlers = {}
    for handler in ("install", "enable", "disable", "update", "uninstall"):
        body = bodies.get(handler, OK).replace("{pids}", str(trace.with_suffix(".pids")))
        script = (
            "#!/bin/sh\n"
            "status() { printf '{\"status\":\"%s\",\"code\":%s,\"message\":\"%s\"}' "
            "\"$1\" \"$2\" \"$3\" > \"$OUTPOST_EXT_STATUS_DIR/$OUTPOST_EXT_SEQ.status\"; }\n"
            f"echo \"{handler} $OUTPOST_EXT_VERSION $(id -u) "
            "$(grep -E ':memory:|^0::' /proc/self/cgroup | head -1 | cut -d: -f3)"
            f"\" >> {trace}\n"
            f"echo \"the {handler} handler of $OUTPOST_EXT_VERSION prints this\"\n"
            f"{body}\n")
        files[f"bin/{handler}"] = (script.encode(), 0o755)
        handlers[handler] = {"run": f"bin/{handler}", "timeout_seconds": timeout}
    manifest = {"name": name, "version": version, "handlers": handlers,
                "limits": limits or {}, "min_agent_version": min_agent}
    files[MANIFEST_NAME] = (json.dumps(manifest).encode(), 0o644)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for path, (data, mode) in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def seal(key: SigningKey, value: dict[str, Any]) -> str:
    box = SealedBox(key.verify_key.to_curve25519_public_key())
    return base64.b64encode(box.encrypt(json.dumps(value).encode())).decode()


# --- the fake hub --------------------------------------------------------------------------
@dataclass
class FakeHub:
    """The hub as the reconciler sees it: goals, packages, and the reports it got."""

    packages: dict[tuple[str, str], bytes] = field(default_factory=dict)
    reports: list[ExtensionStatusReport] = field(default_factory=list)
    down: bool = False
    fetched: list[tuple[str, str]] = field(default_factory=list)
    goals: ExtensionGoals = field(default_factory=lambda: ExtensionGoals(etag="0"))

    async def fetch_goals(self) -> ExtensionGoals:
        return self.goals

    async def fetch_package(self, name: str, version: str) -> bytes:
        if self.down:
            raise TransportError("refused", "https://hub.test", "connection refused")
        self.fetched.append((name, version))
        return self.packages[(name, version)]

    async def report(self, report: ExtensionStatusReport) -> None:
        self.reports.append(report)

    def seen(self, name: str = NAME) -> list[ExtensionStatus]:
        return [s for r in self.reports for s in r.extensions if s.name == name]


@dataclass
class Machine:
    """One agent's extension side: its state directory, tree, trace, hub and key."""

    state: Path
    tree: Path
    trace: Path
    hub: FakeHub
    key: SigningKey
    hierarchy: cgroups.Hierarchy | None
    reconciler: Reconciler | None = None

    def start(self) -> Reconciler:
        runtime = Runtime(self.state, cgroups.Limits(memory_mb=200, cpus=0.5, processes=64),
                          self.hierarchy, "no cgroups in this test", root=self.tree)
        self.reconciler = Reconciler(Store(self.state / "extensions"), runtime, self.hub,
                                     self.key)
        return self.reconciler

    def publish(self, version: str, bodies: dict[str, str] | None = None,
                **kwargs: Any) -> str:
        data = build(version, self.trace, bodies, **kwargs)
        self.hub.packages[(kwargs.get("name", NAME), version)] = data
        return digest(data)

    def goal(self, version: str, *, seq: int = 1, retry: int = 0, enabled: bool = True,
             settings: dict[str, Any] | None = None, protected: dict[str, Any] | None = None,
             sha256: str | None = None, name: str = NAME) -> ExtensionGoal:
        data = self.hub.packages[(name, version)]
        return ExtensionGoal(name=name, version=version, sha256=sha256 or digest(data),
                             size=len(data), enabled=enabled, seq=seq, retry=retry,
                             settings=settings or {},
                             protected=seal(self.key, protected) if protected else None)

    def ran(self) -> list[tuple[str, str]]:
        """(handler, version) for each handler run so far, in order."""
        if not self.trace.exists():
            return []
        return [(line.split()[0], line.split()[1])
                for line in self.trace.read_text().splitlines()]

    def trace_lines(self) -> list[list[str]]:
        return [line.split() for line in self.trace.read_text().splitlines()]

    def record(self, name: str = NAME) -> Any:
        assert self.reconciler is not None
        return self.reconciler.store.records.get(name)


async def converge(machine: Machine, *goals: ExtensionGoal, etag: str | None = None,
                   timeout: float = 60) -> Reconciler:
    """Hand the reconciler these goals and wait until it has done all it will."""
    reconciler = machine.reconciler or machine.start()
    reconciler.apply(ExtensionGoals(etag=etag or uuid.uuid4().hex, goals=list(goals)))
    await asyncio.wait_for(reconciler.idle.wait(), timeout)
    return reconciler


async def reported(machine: Machine, reconciler: Reconciler) -> None:
    """Let the reporter send what it holds."""
    task = asyncio.create_task(reconciler.reporter.run())
    deadline = time.monotonic() + 10
    while reconciler.reporter.dirty.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Machine]:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    hierarchy: cgroups.Hierarchy | None
    try:
        hierarchy = cgroups.detect(f"ext-test-{uuid.uuid4().hex}")
    except (cgroups.Unavailable, PermissionError):
        hierarchy = None
    with shared_dir() as shared:
        tree = shared / "tree"
        tree.mkdir(mode=0o711)
        machine = Machine(state, tree, shared / "trace", FakeHub(), SigningKey.generate(),
                          hierarchy)
        try:
            yield machine
        finally:
            pids = machine.trace.with_suffix(".pids")
            if pids.exists():
                for pid in pids.read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), 9)
            if hierarchy is not None:
                for base in set(hierarchy.bases.values()):
                    for group in base.glob("ext-*"):
                        with contextlib.suppress(OSError):
                            cgroups.Group(hierarchy.version, {"memory": group, "pids": group,
                                                              "cpu": group}).empty()
                            group.rmdir()
                    with contextlib.suppress(OSError):
                        base.rmdir()


def in_loop(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run the test's coroutine in one event loop (the reconciler's events live in one),
    closing the reconciler (its workers, their handlers) at the end."""
    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        async def body() -> None:
            machine: Machine = kwargs["machine"]
            try:
                await test(*args, **kwargs)
            finally:
                if machine.reconciler is not None:
                    await machine.reconciler.close()
        asyncio.run(body())
    return wrapper


# --- install, enable, settings -------------------------------------------------------------
@in_loop
async def test_install_and_enable_reach_ready_as_the_extension_user_in_its_cgroup(
        machine: Machine) -> None:
    machine.publish("1.0.0", limits={"memory_mb": 96, "processes": 40})

    r = await converge(machine, machine.goal("1.0.0", settings={"paths": ["/etc"]}))
    await reported(machine, r)
    rec = machine.record()
    assert (rec.state, rec.version, rec.stage, rec.last_ready) == \
        ("Ready", "1.0.0", "installed", "1.0.0"), rec.message
    assert machine.ran() == [("install", "1.0.0"), ("enable", "1.0.0")]
    last = machine.hub.seen()[-1]
    assert (last.state, last.version, last.step) == ("Ready", "1.0.0", None)
    # The package is unpacked in its own version directory, the settings beside it.
    assert (machine.tree / NAME / "1.0.0" / MANIFEST_NAME).is_file()
    settings = machine.tree / NAME / "config" / "1.settings.json"
    assert json.loads(settings.read_text()) == {"paths": ["/etc"]}
    # Persisted: state.json in the state directory says the same.
    saved = json.loads((machine.state / "extensions" / "state.json").read_text())
    assert saved["extensions"][NAME]["state"] == "Ready"
    # The handler's output is in the extension's own log.
    text = (machine.state / "logs" / "extensions" / f"{NAME}.log").read_text()
    assert "enable: the enable handler of 1.0.0 prints this" in text
    for _handler, _version, uid, cgroup in machine.trace_lines():
        if os.geteuid() == 0:
            assert int(uid) == pwd.getpwnam("outpost-ext").pw_uid
        if machine.hierarchy is not None:
            assert cgroup.endswith(f"/ext-{NAME}"), cgroup
    if machine.hierarchy is not None:
        group = r.runtime.group(NAME)
        assert group is not None
        memory = group.dirs["memory"]
        limit = (memory / "memory.limit_in_bytes") if machine.hierarchy.version == 1 \
            else (memory / "memory.max")
        assert int(limit.read_text()) == 96 * 2**20
        assert (group.dirs["pids"] / "pids.max").read_text().strip() == "40"
        cpu = group.dirs["cpu"]
        quota = cpu / "cpu.cfs_quota_us" if machine.hierarchy.version == 1 else cpu / "cpu.max"
        assert quota.read_text().split()[0] == "50000"  # the agent's default: 0.5 CPU


@in_loop
async def test_the_handler_environment_holds_only_what_it_should(machine: Machine) -> None:
    dump = machine.trace.with_name("env")
    machine.publish("1.0.0", {"enable": f"env | sort > {dump}; {OK}"})
    os.environ["OUTPOST_TEST_SECRET_VARIABLE"] = "must-not-leak"
    try:
        await converge(machine, machine.goal("1.0.0", seq=7))
    finally:
        del os.environ["OUTPOST_TEST_SECRET_VARIABLE"]
    env = dict(line.split("=", 1) for line in dump.read_text().splitlines())
    tree = machine.tree / NAME
    assert env.pop("OUTPOST_EXT_NAME") == NAME
    assert env.pop("OUTPOST_EXT_VERSION") == "1.0.0"
    assert env.pop("OUTPOST_EXT_HANDLER") == "enable"
    assert env.pop("OUTPOST_EXT_SEQ") == "7"
    assert env.pop("OUTPOST_EXT_CONFIG_DIR") == str(tree / "config")
    assert env.pop("OUTPOST_EXT_STATUS_DIR") == str(tree / "status")
    assert env.pop("OUTPOST_EXT_LOG_DIR") == str(tree / "logs")
    assert env.pop("OUTPOST_EXT_DATA_DIR") == str(tree / "data")
    assert (tree / "data").is_dir()
    assert env.pop("PATH") == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert env.pop("OUTPOST_AGENT_PYTHON") == sys.executable
    # What the shell adds by itself, and nothing of the agent's environment.
    assert set(env) <= {"PWD", "SHLVL", "_", "OLDPWD"}, env


@in_loop
async def test_protected_settings_reach_the_handler_on_stdin_and_no_file(machine: Machine) -> None:
    got = machine.trace.with_name("stdin")
    secret = f"s3cret-{uuid.uuid4().hex}"
    # The handler echoes its stdin to its output as well: the log must not keep it.
    machine.publish("1.0.0", {"enable": f"tee {got}; echo; {OK}"})
    await converge(machine, machine.goal("1.0.0", settings={"repo": "rest:https://hub"},
                                         protected={"password": secret}))
    assert machine.record().state == "Ready"
    assert json.loads(got.read_text()) == {"settings": {"repo": "rest:https://hub"},
                                           "protected": {"password": secret}}
    got.unlink()
    for root in (machine.state, machine.tree):
        for path in root.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
    log = (machine.state / "logs" / "extensions" / f"{NAME}.log").read_text()
    assert "[redacted]" in log and "rest:https://hub" in log


@in_loop
async def test_protected_settings_sealed_to_another_machine_fail_saying_so(
        machine: Machine) -> None:
    machine.publish("1.0.0")
    goal = machine.goal("1.0.0")
    goal.protected = seal(SigningKey.generate(), {"password": "x"})
    await converge(machine, goal)
    rec = machine.record()
    assert rec.state == "Failed" and rec.message.startswith("E9036:"), rec.message


@in_loop
async def test_settings_changed_run_enable_again(machine: Machine) -> None:
    machine.publish("1.0.0")
    await converge(machine, machine.goal("1.0.0", seq=1))
    await converge(machine, machine.goal("1.0.0", seq=2, settings={"a": 1}))
    assert machine.ran() == [("install", "1.0.0"), ("enable", "1.0.0"), ("enable", "1.0.0")]
    assert machine.record().enabled_seq == 2
    # The same goals again: nothing runs.
    await converge(machine, machine.goal("1.0.0", seq=2, settings={"a": 1}))
    assert len(machine.ran()) == 3


@in_loop
async def test_a_disabled_goal_runs_disable_and_shows_not_ready(machine: Machine) -> None:
    machine.publish("1.0.0")
    await converge(machine, machine.goal("1.0.0"))
    await converge(machine, machine.goal("1.0.0", enabled=False))
    rec = machine.record()
    assert machine.ran()[-1] == ("disable", "1.0.0")
    assert rec.state == "NotReady" and "enabled=false" in rec.message


@in_loop
async def test_a_warning_status_shows_not_ready_with_its_message(machine: Machine) -> None:
    machine.publish("1.0.0", {"enable": 'status warning 12 "disk almost full"'})
    await converge(machine, machine.goal("1.0.0"))
    rec = machine.record()
    assert (rec.state, rec.message, rec.code) == ("NotReady", "disk almost full", 12)


# --- failures of a handler -----------------------------------------------------------------
@in_loop
async def test_a_hung_enable_is_killed_at_its_timeout_with_its_whole_group(
        machine: Machine) -> None:
    machine.publish("1.0.0", {"enable": HANG}, timeout=1.5)
    started = time.monotonic()
    await converge(machine, machine.goal("1.0.0"))
    took = time.monotonic() - started
    rec = machine.record()
    assert (rec.state, rec.step) == ("Failed", "enable")
    assert rec.message.startswith("E9030: the enable handler hung"), rec.message
    assert "after 1.5 s" in rec.message
    assert 1.5 <= took < 15
    pids = [int(p) for p in machine.trace.with_suffix(".pids").read_text().split()]
    assert pids and all(procgroup.state(pid) in (None, "Z") for pid in pids)
    if machine.hierarchy is not None:
        group = machine.reconciler.runtime.group(NAME)  # type: ignore[union-attr]
        assert group is not None and group.members() == []
    # Failed versions are not tried again by the same goals...
    assert rec.failed == {"1.0.0": 0}
    await converge(machine, machine.goal("1.0.0"))
    assert machine.ran() == [("install", "1.0.0"), ("enable", "1.0.0")]
    # ...until 'retry' grows.
    await converge(machine, machine.goal("1.0.0", retry=1))
    assert machine.ran()[-1] == ("enable", "1.0.0") and len(machine.ran()) == 3


@in_loop
async def test_a_malformed_status_file_is_an_error_naming_the_file(machine: Machine) -> None:
    machine.publish("1.0.0", {"enable": 'echo "{not json" > '
                                        '"$OUTPOST_EXT_STATUS_DIR/$OUTPOST_EXT_SEQ.status"'})
    await converge(machine, machine.goal("1.0.0", seq=4))
    rec = machine.record()
    status_file = machine.tree / NAME / "status" / "4.status"
    assert (rec.state, rec.step) == ("Failed", "enable")
    assert rec.message.startswith(f"E9032: {status_file} is not JSON"), rec.message


@in_loop
async def test_a_status_file_with_a_wrong_field_names_it(machine: Machine) -> None:
    machine.publish("1.0.0", {"enable": 'echo \'{"status": "fine"}\' > '
                                        '"$OUTPOST_EXT_STATUS_DIR/$OUTPOST_EXT_SEQ.status"'})
    await converge(machine, machine.goal("1.0.0"))
    rec = machine.record()
    assert "1.status is not a status file: status:" in rec.message, rec.message


@in_loop
async def test_a_non_zero_exit_without_a_status_file_says_the_exit_code(machine: Machine) -> None:
    machine.publish("1.0.0", {"install": FAIL})
    await converge(machine, machine.goal("1.0.0"))
    rec = machine.record()
    assert (rec.state, rec.step) == ("Failed", "install")
    assert "exited with code 3 without a status file" in rec.message, rec.message
    assert rec.message.startswith("E9031:")
    assert machine.ran() == [("install", "1.0.0")]


@in_loop
async def test_an_error_status_carries_the_handlers_code_and_message(machine: Machine) -> None:
    machine.publish("1.0.0", {"enable": 'status error 151099 "agent not ready"'})
    await converge(machine, machine.goal("1.0.0"))
    rec = machine.record()
    assert (rec.state, rec.code) == ("Failed", 151099)
    assert "reported an error (its code 151099): agent not ready" in rec.message


@in_loop
async def test_an_enable_that_leaves_work_running_is_waited_for_through_its_status(
        machine: Machine) -> None:
    # Exit 0 with 'transitioning', then the work it left says success a moment later.
    later = ('(sleep 0.5; status success 0 "came up") > /dev/null 2>&1 & '
             'status transitioning 0 "starting"')
    machine.publish("1.0.0", {"enable": later})
    await converge(machine, machine.goal("1.0.0"))
    rec = machine.record()
    assert (rec.state, rec.message) == ("Ready", "came up")


# --- updates and rollback ------------------------------------------------------------------
@in_loop
async def test_an_update_runs_its_steps_in_order_and_drops_the_old_version(
        machine: Machine) -> None:
    machine.publish("1.0.0")
    machine.publish("2.0.0")
    await converge(machine, machine.goal("1.0.0"))
    kept = machine.tree / NAME / "data" / "cache"  # OUTPOST_EXT_DATA_DIR outlives versions
    kept.write_text("from 1.0.0")
    await converge(machine, machine.goal("2.0.0"))
    assert kept.read_text() == "from 1.0.0"
    assert machine.ran()[2:] == [("disable", "1.0.0"), ("update", "2.0.0"),
                                 ("uninstall", "1.0.0"), ("install", "2.0.0"),
                                 ("enable", "2.0.0")]
    rec = machine.record()
    assert (rec.state, rec.version, rec.last_ready) == ("Ready", "2.0.0", "2.0.0")
    assert not (machine.tree / NAME / "1.0.0").exists()
    assert (machine.tree / NAME / "2.0.0").is_dir()


@in_loop
async def test_a_broken_update_rolls_back_to_the_last_ready_and_is_not_retried(
        machine: Machine) -> None:
    machine.publish("1.0.0")
    machine.publish("2.0.0", {"enable": FAIL})

    r = await converge(machine, machine.goal("1.0.0"))
    await converge(machine, machine.goal("2.0.0"))
    await reported(machine, r)
    assert machine.ran()[2:] == [
        ("disable", "1.0.0"), ("update", "2.0.0"), ("uninstall", "1.0.0"),
        ("install", "2.0.0"), ("enable", "2.0.0"),
        # the rollback: undo the new version, put the old one back
        ("disable", "2.0.0"), ("uninstall", "2.0.0"), ("install", "1.0.0"),
        ("enable", "1.0.0")]
    rec = machine.record()
    assert (rec.state, rec.version, rec.failed) == ("Ready", "1.0.0", {"2.0.0": 0})
    assert rec.message.startswith("E9033: the update to 2.0.0 failed at step enable")
    assert "rolled back to 1.0.0" in rec.message
    assert not (machine.tree / NAME / "2.0.0").exists()
    last = machine.hub.seen()[-1]
    assert (last.state, last.version, last.failed_versions) == ("Ready", "1.0.0", ["2.0.0"])
    # The same goal again: 2.0.0 is not tried.
    count = len(machine.ran())
    await converge(machine, machine.goal("2.0.0"))
    assert len(machine.ran()) == count and machine.record().version == "1.0.0"
    # Retried by the operator: tried (and rolled back) once more.
    await converge(machine, machine.goal("2.0.0", retry=1))
    assert ("enable", "2.0.0") in machine.ran()[count:]
    assert machine.record().version == "1.0.0" and machine.record().failed == {"2.0.0": 1}


@in_loop
async def test_a_digest_mismatch_or_a_bad_archive_leave_the_installed_version_untouched(
        machine: Machine) -> None:
    machine.publish("1.0.0")
    machine.publish("2.0.0")
    await converge(machine, machine.goal("1.0.0"))
    before = sorted(p.name for p in (machine.tree / NAME).iterdir())
    r = await converge(machine, machine.goal("2.0.0", sha256="0" * 64))
    rec = machine.record()
    assert (rec.state, rec.version, rec.step) == ("Ready", "1.0.0", "verify")
    assert rec.message.startswith("E9001:"), rec.message
    assert r.retry_at is not None  # a damaged download is tried again later
    assert len(machine.ran()) == 2 and rec.failed == {}
    assert sorted(p.name for p in (machine.tree / NAME).iterdir()) == before
    # An archive that is not one, with a matching digest: this version is bad for good.
    machine.hub.packages[(NAME, "2.0.0")] = b"not a tar.gz"
    await converge(machine, machine.goal("2.0.0"))
    rec = machine.record()
    assert (rec.state, rec.version) == ("Ready", "1.0.0")
    assert "E9000" in rec.message and rec.failed == {"2.0.0": 0}
    assert sorted(p.name for p in (machine.tree / NAME).iterdir()) == before
    assert len(machine.ran()) == 2


@in_loop
async def test_a_hub_that_cannot_be_reached_leaves_a_retry(machine: Machine) -> None:
    machine.publish("1.0.0")
    machine.hub.down = True
    r = await converge(machine, machine.goal("1.0.0"))
    rec = machine.record()
    assert rec.step == "download" and rec.message.startswith("E9037:"), rec.message
    assert r.retry_at is not None and r.store.etag != r.goals_etag
    machine.hub.down = False
    r.retry_at = r.clock() - 1
    r.note_etag(r.store.etag)  # the next heartbeat: the retry is due
    assert r.wake.is_set()


@in_loop
async def test_an_agent_older_than_the_minimum_refuses_the_version(machine: Machine) -> None:
    machine.publish("1.0.0", min_agent="999.0")
    await converge(machine, machine.goal("1.0.0"))
    rec = machine.record()
    assert (rec.state, rec.step) == ("Failed", "verify")
    assert rec.message.startswith("E9038:") and "999.0" in rec.message
    assert machine.ran() == []


# --- removal -------------------------------------------------------------------------------
@in_loop
async def test_a_removed_goal_disables_uninstalls_and_deletes(machine: Machine) -> None:
    machine.publish("1.0.0")

    r = await converge(machine, machine.goal("1.0.0"))
    await converge(machine)
    await reported(machine, r)
    assert machine.ran() == [("install", "1.0.0"), ("enable", "1.0.0"),
                             ("disable", "1.0.0"), ("uninstall", "1.0.0")]
    assert machine.record() is None and not (machine.tree / NAME).exists()
    assert machine.hub.seen()[-1].state == "NotInstalled"
    saved = json.loads((machine.state / "extensions" / "state.json").read_text())
    assert saved["extensions"] == {}


@in_loop
async def test_a_hung_install_is_ended_and_uninstalled_when_its_goal_goes(
        machine: Machine) -> None:
    machine.publish("1.0.0", {"install": HANG}, timeout=300)
    pids_file = machine.trace.with_suffix(".pids")

    r = machine.start()
    r.apply(ExtensionGoals(etag="1", goals=[machine.goal("1.0.0")]))
    deadline = time.monotonic() + 20
    while not pids_file.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert machine.record().state == "Installing"
    started = time.monotonic()
    await converge(machine, etag="2")
    assert time.monotonic() - started < 15  # not the install's 300 s
    assert machine.ran() == [("install", "1.0.0"), ("uninstall", "1.0.0")]
    pids = [int(p) for p in pids_file.read_text().split()]
    assert all(procgroup.state(pid) in (None, "Z") for pid in pids)
    assert machine.record() is None and not (machine.tree / NAME).exists()


# --- restarts ------------------------------------------------------------------------------
@in_loop
async def test_an_agent_started_again_runs_no_step_that_succeeded(machine: Machine) -> None:
    machine.publish("1.0.0")
    await converge(machine, machine.goal("1.0.0"))
    await machine.reconciler.close()  # type: ignore[union-attr]
    machine.reconciler = None
    r = machine.start()
    assert r.wake.is_set()  # it looks at the goals once at start
    await converge(machine, machine.goal("1.0.0"))
    assert machine.ran() == [("install", "1.0.0"), ("enable", "1.0.0")]


@in_loop
async def test_an_agent_stopped_mid_update_goes_on_from_the_step_it_was_in(
        machine: Machine) -> None:
    machine.publish("1.0.0")
    machine.publish("2.0.0")
    await converge(machine, machine.goal("1.0.0"))
    await machine.reconciler.close()  # type: ignore[union-attr]
    # As if the agent had stopped after 'disable' and 'update' succeeded.
    path = machine.state / "extensions" / "state.json"
    saved = json.loads(path.read_text())
    build_dir = machine.tree / NAME / "2.0.0"
    import outpost.protocol.extpackage as extpackage
    extpackage.unpack(machine.hub.packages[(NAME, "2.0.0")], build_dir)
    saved["extensions"][NAME].update(
        enabled=False, state="Transitioning", step="uninstall",
        update={"old": "1.0.0", "new": "2.0.0",
                "done": ["disable", "started:update", "update", "started:uninstall"],
                "failed_step": None, "failure": "", "failure_code": None})
    path.write_text(json.dumps(saved))
    machine.reconciler = None
    before = len(machine.ran())
    await converge(machine, machine.goal("2.0.0"))
    assert machine.ran()[before:] == [("uninstall", "1.0.0"), ("install", "2.0.0"),
                                      ("enable", "2.0.0")]
    assert machine.record().version == "2.0.0" and machine.record().state == "Ready"


# --- who runs it ---------------------------------------------------------------------------
@pytest.mark.skipif(os.geteuid() != 0, reason="runs handlers as other users: needs root")
@in_loop
async def test_a_goal_that_names_a_user_runs_the_handlers_as_that_user(
        machine: Machine) -> None:
    machine.publish("1.0.0")
    goal = machine.goal("1.0.0")
    goal.run_as = "nobody"
    await converge(machine, goal)
    assert machine.record().state == "Ready"
    nobody = pwd.getpwnam("nobody").pw_uid
    assert {int(line[2]) for line in machine.trace_lines()} == {nobody}
    # Removed with the goal: the uninstall runs as the same user.
    await converge(machine)
    assert machine.ran()[-1] == ("uninstall", "1.0.0")
    assert int(machine.trace_lines()[-1][2]) == nobody


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root agent runs handlers as others")
@in_loop
async def test_a_user_the_machine_lacks_fails_the_step_naming_it(machine: Machine) -> None:
    machine.publish("1.0.0")
    goal = machine.goal("1.0.0")
    goal.run_as = "no-such-user-here"
    await converge(machine, goal)
    rec = machine.record()
    assert (rec.state, rec.step) == ("Failed", "install")
    assert rec.message.startswith("E9034: The user 'no-such-user-here'"), rec.message
    assert machine.ran() == []


# --- waking and reporting ------------------------------------------------------------------
@in_loop
async def test_only_a_new_etag_or_a_due_retry_wakes_the_reconciler(machine: Machine) -> None:
    machine.publish("1.0.0")
    r = machine.start()
    assert not r.wake.is_set()  # nothing known: nothing to go on with at start
    r.note_etag("")
    assert not r.wake.is_set()  # no goals on the hub, none here
    r.note_etag("e1")
    assert r.wake.is_set()
    r.wake.clear()
    await converge(machine, machine.goal("1.0.0"), etag="e1")
    assert r.store.etag == "e1"
    r.note_etag("e1")
    assert not r.wake.is_set()
    r.retry_at = r.clock() + 60
    r.note_etag("e1")
    assert not r.wake.is_set()  # a retry not yet due
    r.retry_at = r.clock() - 1
    r.note_etag("e1")
    assert r.wake.is_set() and r.retry_at is None


@in_loop
async def test_goals_the_agent_cannot_read_are_fetched_again_later(machine: Machine) -> None:
    """A hub of another version answering goals that do not fit (read without pydantic,
    protocol/extreaders.py): the reconciler goes on and tries again, it does not die."""
    from outpost.agent.extensions.channel import HttpChannel

    class Client:
        async def request(self, method: str, path: str, body: Any = None) -> Any:
            return {"etag": "e1", "goals": [{"name": "demo", "version": 1}]}

    r = machine.start()
    r.channel = HttpChannel(Client())  # type: ignore[arg-type]
    r.wake.set()
    task = asyncio.create_task(r.run())
    try:
        deadline = time.monotonic() + 10
        while r.retry_at is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert r.retry_at is not None and not task.done()
        assert r.goals_etag is None and r.workers == {}
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@in_loop
async def test_the_long_poll_sends_the_etag_last_told_or_else_that_of_the_goals_reconciled(
        machine: Machine) -> None:
    """So the agent's first poll, sent before any heartbeat answer, is woken by a change of
    its machine's own goal too (the hub ends a poll only when it carries an etag)."""
    machine.publish("1.0.0")
    r = machine.start()
    assert r.poll_etag == ""  # nothing reconciled: the hub's etag of no goals
    await converge(machine, machine.goal("1.0.0"), etag="e1")
    assert r.poll_etag == "e1"
    r.note_etag("e2")
    assert r.poll_etag == "e2"  # the hub's, as last heard
    again = machine.start()  # the agent started again: nothing heard yet
    assert again.poll_etag == "e1"


@in_loop
async def test_reports_are_coalesced_and_a_removal_is_told_once(machine: Machine) -> None:
    machine.publish("1.0.0")
    r = await converge(machine, machine.goal("1.0.0"))
    await reported(machine, r)
    # Many state changes, one report with the newest of each.
    assert len(machine.hub.reports) == 1
    [only] = machine.hub.reports[0].extensions
    assert (only.state, only.version) == ("Ready", "1.0.0")
    await converge(machine)
    await reported(machine, r)
    assert [s.state for s in machine.hub.reports[-1].extensions] == ["NotInstalled"]
    r.reporter.dirty.set()
    await reported(machine, r)
    assert machine.hub.reports[-1].extensions == []


# --- the support bundle --------------------------------------------------------------------
@in_loop
async def test_the_support_bundle_holds_the_states_and_logs_but_no_protected_value(
        machine: Machine, tmp_path: Path) -> None:
    from outpost.agent import bundle
    from outpost.agent.state import StateDir

    secret = f"bundle-secret-{uuid.uuid4().hex}"
    machine.publish("1.0.0", {"enable": f"cat; echo; {OK}"})
    await converge(machine, machine.goal("1.0.0", protected={"key": secret}))
    out = tmp_path / "bundle.tar.gz"
    bundle.write(StateDir(machine.state), out, None, {}, run_checks=False)
    with tarfile.open(out) as tar:
        members = {m.name.split("/", 1)[1]: tar.extractfile(m).read()  # type: ignore[union-attr]
                   for m in tar.getmembers() if m.isfile()}
    states = json.loads(members["extensions.json"])["extensions"]
    assert [(s["name"], s["state"], s["version"]) for s in states] == \
        [(NAME, "Ready", "1.0.0")]
    log = members[f"logs/extensions/{NAME}.log"].decode()
    assert "enable: --- success: all good" in log
    assert all(secret.encode() not in data for data in members.values())


@pytest.mark.parametrize(("done", "undo"), [
    # stopped while installing the new version: the new one is uninstalled, the old one
    # was uninstalled already
    (["disable", "started:update", "update", "started:uninstall", "uninstall",
      "started:install"], [("uninstall", "2.0.0")]),
    # stopped after the update handler: nothing of the new one to undo; the old one is
    # disabled already and still to uninstall
    (["disable", "started:update", "update"], [("uninstall", "1.0.0")]),
    # stopped in a rollback that had undone the new version and installed the old one
    # again: only the old one is left to uninstall
    (["disable", "started:update", "update", "started:uninstall", "uninstall",
      "started:install", "install", "started:enable", "started:undo:disable-new",
      "undo:disable-new", "started:undo:uninstall-new", "undo:uninstall-new",
      "started:undo:install-old", "undo:install-old"], [("uninstall", "1.0.0")]),
])
@in_loop
async def test_a_goal_removed_mid_update_undoes_each_version_as_far_as_it_got(
        machine: Machine, done: list[str], undo: list[tuple[str, str]]) -> None:
    from outpost.protocol import extpackage

    machine.publish("1.0.0")
    machine.publish("2.0.0")
    await converge(machine, machine.goal("1.0.0"))
    await machine.reconciler.close()  # type: ignore[union-attr]
    path = machine.state / "extensions" / "state.json"
    saved = json.loads(path.read_text())
    extpackage.unpack(machine.hub.packages[(NAME, "2.0.0")], machine.tree / NAME / "2.0.0")
    saved["extensions"][NAME].update(
        enabled=False, state="Transitioning", step="install",
        update={"old": "1.0.0", "new": "2.0.0", "done": done, "failed_step": None,
                "failure": "", "failure_code": None})
    path.write_text(json.dumps(saved))
    machine.reconciler = None
    before = len(machine.ran())
    await converge(machine)
    assert machine.ran()[before:] == undo
    assert machine.record() is None and not (machine.tree / NAME).exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="the handlers' user differs only under root")
@in_loop
async def test_an_agent_with_a_strict_umask_still_lets_the_extension_user_run_it(
        machine: Machine) -> None:
    machine.publish("1.0.0")
    old = os.umask(0o077)
    try:
        await converge(machine, machine.goal("1.0.0"))
    finally:
        os.umask(old)
    assert machine.record().state == "Ready", machine.record().message
    assert machine.ran() == [("install", "1.0.0"), ("enable", "1.0.0")]


@in_loop
async def test_a_service_left_by_enable_stays_in_the_group_until_the_extension_goes(
        machine: Machine) -> None:
    pids = machine.trace.with_suffix(".pids")
    machine.publish("1.0.0", {"enable": f"sleep 300 > /dev/null 2>&1 & echo $! >> {pids}; "
                                        f"{OK}"})
    started = time.monotonic()
    await converge(machine, machine.goal("1.0.0"))
    assert machine.record().state == "Ready"
    assert time.monotonic() - started < 10  # not held up by the service it left running
    [service] = [int(p) for p in pids.read_text().split()]
    assert procgroup.state(service) not in (None, "Z")
    if machine.hierarchy is not None:
        group = machine.reconciler.runtime.group(NAME)  # type: ignore[union-attr]
        assert group is not None and service in group.members()
    await converge(machine)  # removed: disable, then whatever is left in its group goes
    assert procgroup.state(service) in (None, "Z") or machine.hierarchy is None
