"""The desired state made real: each extension brought to its goal, one step at a time.

The daemon hands every heartbeat answer's ``extensions_etag`` to ``Reconciler.note_etag``;
when it differs from the etag of the goals last reconciled to the end (or a retry after a
failed download is due) the reconciler task wakes, fetches the goals and starts one worker
per extension whose goal or record needs work. Workers run beside heartbeats and jobs; a
goal that disappears cancels its extension's worker (ending the command it runs with its
process group) and uninstalls it, whatever state it was in.

A worker repeats: look at the extension's record (store.py) and its goal, take the one next
step, persist, report. So an agent started again goes on from the step it was in, and a goal
that changes while a step runs is seen at the next one. The steps:

- nothing installed: download, verify, unpack (Installing), then ``install``, then
  ``enable`` (Transitioning) -> Ready, or NotReady for a ``warning`` or an enabled=false goal;
- same version, new settings (``seq``): ``enable`` again;
- another version over a Ready one: the package is fetched first (the installed version
  stays as it is if that fails), then disable old -> ``update`` (new) -> uninstall old ->
  install new -> enable new. A failing step rolls back to the old version (undo what the new
  one did, install old again if it was uninstalled, enable it) and reports it Ready with why
  (EX-8);
- a version that failed (any command) goes into ``failed``, with the goal's ``retry`` at that
  time, and is not tried again until ``retry`` grows ('outpost extension retry').
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nacl.exceptions import CryptoError
from nacl.public import SealedBox
from nacl.signing import SigningKey

from outpost import __version__
from outpost.protocol import versions
from outpost.protocol.errors import OutpostError
from outpost.protocol.extreaders import (
    MANIFEST_NAME, ExtensionGoal, ExtensionGoals, ExtensionStatus, ExtensionStatusReport,
    HandlerName, Manifest, State, Step, read_lax, wire,
)
from outpost.protocol.readers import ReadError

from ..state import atomic_write
from . import handler
from .channel import HubChannel
from .outlog import ExtensionLog, log_dir, secret_values
from .runtime import Runtime
from .store import Record, Store, Update

log = logging.getLogger("outpost.agent.extensions")

RETRY_MIN = 5.0  # seconds before fetching goals or a package again after a failure
RETRY_MAX = 300.0
REPORT_RETRY_MAX = 60.0


class Transient(Exception):
    """A step that may work later (the hub unreachable, a package damaged on its way)."""


class StepFailed(Exception):
    """A step that failed for this version: ``message`` says why."""

    def __init__(self, step: Step, message: str, code: int | None = None,
                 state: State = "Failed") -> None:
        super().__init__(message)
        self.step, self.message, self.code, self.state = step, message, code, state


def coded(key: str, text: str, **details: Any) -> str:
    """A message with its catalog code, for 'outpost explain'."""
    return f"{OutpostError(key, text, **details).code}: {text}"


class Reporter:
    """The states to report, coalesced: the newest of each extension wins, and one POST
    carries them all. Removed extensions are reported NotInstalled once."""

    def __init__(self, channel: HubChannel | None) -> None:
        self.channel = channel
        self.current: dict[str, ExtensionStatus] = {}
        self.dirty = asyncio.Event()
        self.sent = 0

    def put(self, status: ExtensionStatus) -> None:
        self.current[status.name] = status
        self.dirty.set()

    async def run(self) -> None:
        delay = RETRY_MIN
        while True:
            await self.dirty.wait()
            self.dirty.clear()
            if self.channel is None:
                continue
            sending = dict(self.current)
            report = ExtensionStatusReport(extensions=list(sending.values())[:256])
            try:
                await self.channel.report(report)
            except OutpostError as exc:
                log.warning("extensions: the states could not be reported (%s %s); trying "
                            "again in %.0f s", exc.code, exc.message, delay)
                self.dirty.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, REPORT_RETRY_MAX)
                continue
            delay = RETRY_MIN
            self.sent += 1
            for name, status in sending.items():  # removals are told once
                if status.state == "NotInstalled" and self.current.get(name) is status:
                    del self.current[name]


class Reconciler:
    def __init__(self, store: Store, runtime: Runtime, channel: HubChannel | None,
                 key: SigningKey | None, *, log_max_bytes: int = 1024 * 1024,
                 agent_version: str = __version__,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.runtime = runtime
        self.channel = channel
        self.key = key
        self.log_max_bytes = log_max_bytes
        self.agent_version = agent_version
        self.clock = clock
        self.goals: dict[str, ExtensionGoal] = {}
        self.goals_etag: str | None = None  # of the goals being worked towards
        # The hub's etag last heard (a heartbeat or a long-poll): the long-poll sends it, and
        # the hub ends the poll early when the machine's goals no longer match it.
        self.told_etag: str | None = None
        self.workers: dict[str, asyncio.Task[None]] = {}
        self.wake = asyncio.Event()
        self.idle = asyncio.Event()  # no worker runs (tests and 'status' wait on it)
        self.idle.set()
        self.reporter = Reporter(channel)
        self.retry_at: float | None = None
        self.fetched_at: float | None = None  # the goals, last
        self._closing = False
        self._retry_delay = RETRY_MIN
        self._transient = False
        self._manifests: dict[tuple[str, str], Manifest] = {}
        self._generation: dict[str, int] = {}  # grows with each goals applied, per name
        # Credentials held by commands running now, per kind: (the credentials, how many
        # commands hold them). Asking the hub again rotates them, which would cut off a
        # command still using the old ones, so a command that starts while another holds
        # them shares those.
        self._held: dict[str, tuple[dict[str, Any], int]] = {}
        self._credential_lock = asyncio.Lock()
        store.load()
        for record in store.records.values():
            self.reporter.put(record.status())  # the hub hears the states after a restart
        if store.records:
            self.wake.set()  # a step cut short by a stop goes on without waiting for a change

    # --- driving -----------------------------------------------------------------------
    @property
    def poll_etag(self) -> str:
        """The etag the long-poll sends: the hub's last heard, or before any (the agent's
        first poll, which carries its first heartbeat) that of the goals last reconciled
        ("" for none), so the first poll too ends when the machine's own goal changes (or at
        once, when it differs already) rather than at the end of its hold."""
        return self.told_etag if self.told_etag is not None else self.store.etag

    def note_etag(self, etag: str) -> None:
        """A heartbeat's or a long-poll's etag: wake when it is new, or a retry is due."""
        self.told_etag = etag
        due = self.retry_at is not None and self.clock() >= self.retry_at
        if (etag != self.store.etag and etag != self.goals_etag) or due:
            self.retry_at = None if due else self.retry_at
            self.wake.set()

    async def run(self) -> None:
        """The reconciler task: fetch the goals each time it is woken, and work on them."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            assert self.channel is not None
            try:
                goals = await self.channel.fetch_goals()
            except OutpostError as exc:
                self._later(f"the goals could not be fetched ({exc.code} {exc.message})")
                continue
            except ReadError as exc:  # a hub of another version
                self._later(f"the goals the hub sent could not be read ({exc})")
                continue
            self.fetched_at = self.clock()
            self.apply(goals)

    def apply(self, goals: ExtensionGoals) -> None:
        """Work towards ``goals``: a worker for each extension that has work."""
        self.goals = {g.name: g for g in goals.goals}
        self.goals_etag = goals.etag
        self._transient = False
        names = set(self.goals) | set(self.store.records) | set(self.workers)
        for name in sorted(names):
            self._generation[name] = self._generation.get(name, 0) + 1
            running = self.workers.get(name)
            if running is not None and name not in self.goals:
                running.cancel()  # uninstall works in every state: end what runs first
                self._start(name, after=running)
            elif running is None:
                self._start(name)
        self._check_idle()

    def _start(self, name: str, after: asyncio.Task[None] | None = None) -> None:
        async def body() -> None:
            if after is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await after
            try:
                await self._converge(name)
            except asyncio.CancelledError:
                raise
            except Transient as exc:
                self._transient = True
                log.warning("extension %s: %s", name, exc)
            except OutpostError as exc:  # the machine's trouble (E9039), not the version's
                self._transient = True
                log.error("extension %s: %s %s Fix: %s", name, exc.code, exc.message, exc.fix)
            except Exception:
                log.exception("extension %s: the reconcile failed inside the agent", name)
                self._transient = True
            finally:
                if self.workers.get(name) is asyncio.current_task():
                    del self.workers[name]
                self._check_idle()

        self.idle.clear()
        self.workers[name] = asyncio.create_task(body(), name=f"extension-{name}")

    def _check_idle(self) -> None:
        if self.workers or self._closing:
            return
        if self._transient:
            self._later("a step will be tried again")
        elif self.goals_etag is not None and self.store.etag != self.goals_etag:
            self.store.etag = self.goals_etag
            self.store.save()
            self._retry_delay = RETRY_MIN
        self.idle.set()

    def _later(self, why: str) -> None:
        delay = self._retry_delay * random.uniform(0.8, 1.2)
        self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)
        self.retry_at = self.clock() + delay
        log.info("extensions: %s; trying again after about %.0f s", why, delay)

    async def close(self) -> None:
        self._closing = True  # work cut short is not work done: the etag stays as it was
        for task in self.workers.values():
            task.cancel()
        if self.workers:
            await asyncio.wait(list(self.workers.values()), timeout=10)
        await handler.close_all()
        self.runtime.close()

    # --- one extension -----------------------------------------------------------------
    def _set(self, rec: Record, state: State, step: Step | None, message: str = "",
             code: int | None = None, target: str | None = None) -> None:
        changed = (rec.state, rec.step, rec.message, rec.code) != (state, step, message, code)
        rec.state, rec.step, rec.message, rec.code = state, step, message, code
        rec.target = target
        if changed:
            rec.changed_at = self.clock()
            log.info("extension %s: %s%s%s", rec.name, state, f" ({step})" if step else "",
                     f": {message}" if message else "")
        self.store.save()
        self.reporter.put(rec.status())

    def _blocked(self, rec: Record, goal: ExtensionGoal, version: str) -> bool:
        """Whether ``version`` failed here and the operator has not asked to retry."""
        at = rec.failed.get(version)
        if at is None:
            return False
        if goal.retry > at:
            del rec.failed[version]
            self.store.save()
            return False
        return True

    def _fail(self, rec: Record, goal: ExtensionGoal, version: str, exc: StepFailed) -> None:
        rec.failed[version] = goal.retry
        self._set(rec, exc.state, exc.step, exc.message, exc.code, target=version)

    async def _converge(self, name: str) -> None:
        rec = self.store.records.get(name)
        if rec is not None and rec.state in ("Installing", "Transitioning"):
            # A step was under way when the agent stopped: what it left running goes
            # before the step runs again.
            await asyncio.to_thread(self.runtime.empty_group, name)
        while True:
            generation = self._generation.get(name)
            goal = self.goals.get(name)
            rec = self.store.records.get(name)
            if goal is None:
                if rec is not None:
                    await self._remove(rec)
                if self._generation.get(name) == generation:
                    return
                continue
            if rec is None:
                rec = self.store.records[name] = Record(name=name, seq=goal.seq)
            rec.seq, rec.run_as = goal.seq, goal.run_as
            if not await self._step(rec, goal) and self._generation.get(name) == generation:
                return

    async def _step(self, rec: Record, goal: ExtensionGoal) -> bool:
        """Take the next step towards ``goal``; False when there is none."""
        if rec.update is not None:
            await self._update(rec, goal, rec.update)
            return True
        wanted = goal.version
        if rec.version is None:
            if self._blocked(rec, goal, wanted):
                return False
            try:
                await self._fetch(rec, goal)
            except StepFailed as exc:
                self._fail(rec, goal, wanted, exc)
                return False
            rec.version, rec.stage, rec.enabled, rec.enabling = wanted, "unpacked", False, False
            self.store.save()
            return True
        if rec.version != wanted:
            ready = rec.stage == "installed" and rec.enabled and rec.last_ready == rec.version
            if not ready:
                await self._teardown(rec, rec.version)  # nothing good to go back to
                rec.version = rec.stage = None
                rec.enabled = rec.enabling = False
                self.store.save()
                return True
            if self._blocked(rec, goal, wanted):
                return False
            try:
                await self._fetch(rec, goal)
            except StepFailed as exc:
                rec.failed[wanted] = goal.retry
                self._set(rec, "Ready", None, f"the update to {wanted} failed at step "
                          f"{exc.step} and {rec.version} stays: {exc.message}", exc.code)
                return False
            rec.update = Update(old=rec.version, new=wanted)
            self.store.save()
            return True
        # The version wanted is the one here.
        if rec.stage != "installed":
            if self._blocked(rec, goal, wanted):
                return False
            if not self._unpacked(rec.name, wanted):
                rec.version = rec.stage = None  # its files went: fetched again
                self.store.save()
                return True
            rec.stage = "installing"
            try:
                await self._command(rec, goal, wanted, "install", "Installing")
            except StepFailed as exc:
                self._fail(rec, goal, wanted, exc)
                return False
            rec.stage = "installed"
            self.store.save()
            return True
        if goal.enabled:
            if rec.enabled and rec.enabled_seq == goal.seq:
                return False
            if self._blocked(rec, goal, wanted):
                return False
            await self._enable(rec, goal, wanted)
            return True
        if rec.enabled or rec.enabling:
            try:
                await self._command(rec, goal, wanted, "disable", "Transitioning")
            except StepFailed as exc:
                self._fail(rec, goal, wanted, exc)
                return False
            rec.enabled = rec.enabling = False
            await asyncio.to_thread(self.runtime.empty_group, rec.name)
        if rec.state != "NotReady" or rec.step is not None:
            self._set(rec, "NotReady", None, f"{wanted} is installed and disabled: its goal "
                      "says enabled=false")
        return False

    async def _enable(self, rec: Record, goal: ExtensionGoal, version: str) -> None:
        rec.enabling = True
        try:
            outcome = await self._command(rec, goal, version, "enable", "Transitioning")
        except StepFailed as exc:
            self._fail(rec, goal, version, exc)
            return
        rec.enabled, rec.enabled_seq = True, goal.seq
        if outcome is not None and outcome.result == "warning":
            self._set(rec, "NotReady", None, outcome.message or "the enable handler reported "
                      "a warning", outcome.code)
            return
        rec.last_ready = version
        self._set(rec, "Ready", None, outcome.message if outcome else "")

    # --- update and rollback -----------------------------------------------------------
    async def _update(self, rec: Record, goal: ExtensionGoal, up: Update) -> None:
        """Go on with the update ``up``: its next step, or its rollback once one failed."""
        if up.failed_step is not None:
            await self._rollback(rec, goal, up)
            return
        steps: list[tuple[str, str, HandlerName]] = [
            ("disable", up.old, "disable"), ("update", up.new, "update"),
            ("uninstall", up.old, "uninstall"), ("install", up.new, "install")]
        if goal.enabled or goal.version != up.new:
            steps.append(("enable", up.new, "enable"))
        for label, version, which in steps:
            if label in up.done:
                continue
            if label == "disable" and not rec.enabled:
                up.done.append(label)
                continue
            up.done.append(f"started:{label}")
            self.store.save()
            try:
                outcome = await self._command(rec, goal, version, which, "Transitioning",
                                              target=up.new, update_from=up.old)
            except StepFailed as exc:
                up.failed_step, up.failure, up.failure_code = exc.step, exc.message, exc.code
                rec.failed[up.new] = goal.retry
                self._set(rec, "Failed", exc.step, f"the update from {up.old} to {up.new} "
                          f"failed at step {exc.step}: {exc.message}; rolling back to "
                          f"{up.old}", exc.code, target=up.new)
                return
            up.done.append(label)
            if label == "disable":
                rec.enabled = False
                await asyncio.to_thread(self.runtime.empty_group, rec.name)
            if label == "enable":
                rec.enabled, rec.enabled_seq = True, goal.seq
                warning = outcome is not None and outcome.result == "warning"
                if not warning:
                    rec.last_ready = up.new
            self.store.save()
        old = up.old
        rec.version, rec.stage, rec.update = up.new, "installed", None
        rec.enabling = rec.enabled
        self._drop_version(rec.name, old)
        if rec.enabled:
            self._set(rec, "Ready" if rec.last_ready == up.new else "NotReady", None,
                      f"updated from {old}")
        else:
            self._set(rec, "NotReady", None, f"updated from {old}; disabled: its goal says "
                      "enabled=false")

    async def _rollback(self, rec: Record, goal: ExtensionGoal, up: Update) -> None:
        new_started = {s.removeprefix("started:") for s in up.done if s.startswith("started:")}
        plan: list[tuple[str, str, HandlerName]] = []
        if "enable" in new_started:
            plan.append(("undo:disable-new", up.new, "disable"))
        if "install" in new_started:
            plan.append(("undo:uninstall-new", up.new, "uninstall"))
        if "uninstall" in up.done or "uninstall" in new_started:
            plan.append(("undo:install-old", up.old, "install"))
        if "disable" in new_started or "disable" in up.done:
            plan.append(("undo:enable-old", up.old, "enable"))
        for label, version, which in plan:
            if label in up.done:
                continue
            undoing_new = version == up.new
            up.done.append(f"started:{label}")
            self.store.save()
            try:
                outcome = await self._command(rec, goal, version, which, "Transitioning",
                                              target=up.old, step="rollback")
            except StepFailed as exc:
                if undoing_new:  # the new version's own cleanup: noted, not fatal
                    log.warning("extension %s: while rolling back, %s", rec.name, exc.message)
                else:
                    up.done.append(label)
                    rec.update = None
                    rec.version = up.old
                    rec.stage = "installed" if which == "enable" else "installing"
                    rec.enabled, rec.enabling = False, which == "enable"
                    self._drop_version(rec.name, up.new)
                    self._set(rec, "Failed", "rollback", coded(
                        "ext_rollback_failed", f"the update to {up.new} failed at step "
                        f"{up.failed_step} ({up.failure}), and the rollback to {up.old} "
                        f"failed too: {exc.message}"), exc.code, target=up.old)
                    return
            else:
                if which == "enable" and version == up.old:
                    rec.enabled, rec.enabled_seq = True, goal.seq
                    if outcome is None or outcome.result == "success":
                        rec.last_ready = up.old
            up.done.append(label)
            self.store.save()
        rec.update = None
        rec.version, rec.stage = up.old, "installed"
        rec.enabling = rec.enabled
        self._drop_version(rec.name, up.new)
        self._set(rec, "Ready" if rec.enabled else "NotReady", None, coded(
            "ext_update_rolled_back", f"the update to {up.new} failed at step "
            f"{up.failed_step} ({up.failure}) and was rolled back to {up.old}; {up.new} is "
            "not tried again until 'outpost extension retry'", step=up.failed_step),
            up.failure_code)

    # --- removal -----------------------------------------------------------------------
    async def _remove(self, rec: Record) -> None:
        # Both versions of an update cut short, newest first; what each needs is decided
        # before anything runs.
        versions = [v for v in (rec.update.new if rec.update else None, rec.version) if v]
        plans = [(version, self._teardown_steps(rec, version)) for version in versions]
        notes = []
        for version, steps in plans:
            notes += await self._teardown(rec, version, steps)
        rec.update = None
        await asyncio.to_thread(self.runtime.remove_group, rec.name)
        self.runtime.remove(rec.name)
        del self.store.records[rec.name]
        self.store.save()
        message = "uninstalled: its goal was removed" + (
            f" ({'; '.join(notes)})" if notes else "")
        log.info("extension %s: %s", rec.name, message)
        self.reporter.put(ExtensionStatus(name=rec.name, state="NotInstalled",
                                          message=message[:4000], changed_at=self.clock(),
                                          seq=rec.seq))

    def _teardown_steps(self, rec: Record, version: str) -> list[HandlerName]:
        """The handlers that undo ``version`` as far as it got."""
        up = rec.update
        if up is not None and version == up.new:
            undo: tuple[tuple[HandlerName, str], ...] = (("disable", "enable"),
                                                         ("uninstall", "install"))
            started = {s.removeprefix("started:") for s in up.done}
            return [h for h, s in undo if s in started  # and a rollback did not undo it
                    and f"undo:{h}-new" not in up.done]
        if up is not None and version == up.old:
            # Enabled unless the update disabled it (and a rollback did not enable it
            # again); installed unless it uninstalled it (and no rollback began to install
            # it again).
            done = set(up.done)
            enabled = "disable" not in done or "started:undo:enable-old" in done
            installed = "uninstall" not in done or "started:undo:install-old" in done
            wanted: tuple[tuple[HandlerName, bool], ...] = (("disable", enabled),
                                                            ("uninstall", installed))
            return [h for h, needed in wanted if needed]
        steps: list[HandlerName] = []
        if rec.enabled or rec.enabling:
            steps.append("disable")
        if rec.stage in ("installing", "installed"):
            steps.append("uninstall")
        return steps

    async def _teardown(self, rec: Record, version: str,
                        steps: list[HandlerName] | None = None) -> list[str]:
        """Disable and uninstall ``version`` as far as it got; what failed, as notes (an
        uninstall goes on whatever its handlers do)."""
        notes = []
        goal = self.goals.get(rec.name)
        if steps is None:
            steps = self._teardown_steps(rec, version)
        for which in steps:
            try:
                await self._command(rec, goal, version, which, "Transitioning")
            except StepFailed as exc:
                notes.append(f"its {which} handler failed: {exc.message}")
            if which == "disable":
                rec.enabled = rec.enabling = False
                await asyncio.to_thread(self.runtime.empty_group, rec.name)
        rec.stage = None
        self._drop_version(rec.name, version)
        return notes

    # --- packages ----------------------------------------------------------------------
    def _unpacked(self, name: str, version: str) -> bool:
        return (self.runtime.package_dir(name, version) / MANIFEST_NAME).is_file()

    def _drop_version(self, name: str, version: str) -> None:
        self._manifests.pop((name, version), None)
        shutil.rmtree(self.runtime.package_dir(name, version), ignore_errors=True)

    def manifest(self, name: str, version: str) -> Manifest:
        key = (name, version)
        if key not in self._manifests:
            path = self.runtime.package_dir(name, version) / MANIFEST_NAME
            self._manifests[key] = read_lax(Manifest.read, "Manifest",
                                            json.loads(path.read_bytes()))
        return self._manifests[key]

    async def _fetch(self, rec: Record, goal: ExtensionGoal) -> None:
        """The goal's package, downloaded, verified and unpacked into its own directory.
        Raises Transient (tried again later) or StepFailed (this version is bad)."""
        name, version = goal.name, goal.version
        if name == "state.json":
            raise StepFailed("unpack", "the name 'state.json' is reserved on the agent")
        dest = self.runtime.package_dir(name, version)
        if self._unpacked(name, version):
            return
        shutil.rmtree(dest, ignore_errors=True)
        self._set(rec, "Installing" if rec.update is None and rec.state != "Ready"
                  else rec.state, "download", f"downloading {name} {version}",
                  target=version)
        assert self.channel is not None
        try:
            data = await self.channel.fetch_package(name, version)
        except OutpostError as exc:
            text = coded("ext_download_failed", f"the package {name} {version} could not "
                         f"be downloaded: {exc.code} {exc.message}", name=name,
                         version=version)
            self._set(rec, rec.state, "download", text, target=version)
            raise Transient(text) from exc
        self.runtime.home(name)
        try:
            package = await asyncio.to_thread(_unpack, data, dest, goal.sha256)
        except OutpostError as exc:
            if exc.reason == "ext_package_digest":
                text = f"{exc.code}: {exc.message} Nothing was unpacked; tried again later"
                self._set(rec, rec.state, "verify", text, target=version)
                raise Transient(text) from exc
            raise StepFailed("unpack", f"{exc.code}: {exc.message}") from exc
        except OSError as exc:
            raise Transient(f"the package {name} {version} could not be unpacked into "
                            f"{dest}: {exc.strerror or exc}") from exc
        manifest = package.manifest
        if manifest.name != name or manifest.version != version:
            self._drop_version(name, version)
            raise StepFailed("verify", f"the package's manifest says {manifest.name} "
                             f"{manifest.version}, not {name} {version}")
        if versions.older_than(self.agent_version, manifest.min_agent_version):
            self._drop_version(name, version)
            raise StepFailed("verify", coded(
                "ext_agent_too_old", f"{name} {version} needs agent "
                f"{manifest.min_agent_version} or newer; this agent is "
                f"{self.agent_version}", need=manifest.min_agent_version))
        self._manifests[(name, version)] = manifest

    # --- running a command -------------------------------------------------------------
    def _protected(self, goal: ExtensionGoal | None, step: Step) -> dict[str, Any] | None:
        """The goal's protected settings, decrypted in memory (never written anywhere)."""
        if goal is None or not goal.protected:
            return None
        if self.key is None:
            raise StepFailed(step, coded("ext_protected_not_for_machine", "the protected "
                             "settings cannot be read: the agent has no machine key"))
        try:
            sealed = base64.b64decode(goal.protected, validate=True)
            plain = SealedBox(self.key.to_curve25519_private_key()).decrypt(sealed)
            value = json.loads(plain)
        except (ValueError, CryptoError) as exc:
            raise StepFailed(step, coded(
                "ext_protected_not_for_machine", "the protected settings cannot be read with "
                f"this machine's key ({type(exc).__name__}): they were sealed to another "
                "machine, or damaged")) from None
        if not isinstance(value, dict):
            raise StepFailed(step, coded("ext_protected_not_for_machine", "the protected "
                             "settings are not a JSON object"))
        return value

    def _settings(self, name: str, goal: ExtensionGoal | None, seq: int) -> dict[str, Any]:
        """The public settings, written to the config directory as <seq>.settings.json."""
        config = self.runtime.config_dir(name)
        path = config / f"{seq}.settings.json"
        if goal is None:  # an uninstall after the goal went: the last settings written
            try:
                value = json.loads(path.read_bytes())
                return value if isinstance(value, dict) else {}
            except (OSError, ValueError):
                return {}
        if not path.exists():
            atomic_write(path, json.dumps(goal.settings, indent=1).encode(), 0o640)
            for old in config.glob("*.settings.json"):
                if old != path:
                    old.unlink(missing_ok=True)
        return goal.settings

    async def _command(self, rec: Record, goal: ExtensionGoal | None, version: str,
                       which: HandlerName, state: State, *, target: str | None = None,
                       step: Step | None = None,
                       update_from: str | None = None) -> handler.Outcome | None:
        """Run ``which`` of ``version``; None when the package has no such handler. Raises
        StepFailed saying why when it did not succeed."""
        the_step: Step = step or which
        try:
            manifest = self.manifest(rec.name, version)
        except (OSError, ValueError) as exc:
            raise StepFailed(the_step, f"the files of {rec.name} {version} are missing or "
                             f"damaged ({exc}); uninstall it and set it again") from None
        command = manifest.handlers.get(which)
        if command is None:
            return None
        run_as = goal.run_as if goal is not None else rec.run_as
        seq = goal.seq if goal is not None else rec.seq
        try:
            identity, _said = self.runtime.identity(run_as)
            self.runtime.prepare(rec.name, identity)
            settings = self._settings(rec.name, goal, seq)
        except OutpostError as exc:
            raise StepFailed(the_step, f"{exc.code}: {exc.message}") from None
        except OSError as exc:
            raise StepFailed(the_step, f"the extension's directories could not be prepared "
                             f"({exc.filename}: {exc.strerror or exc})") from None
        protected = self._protected(goal, the_step)
        group = self.runtime.group(rec.name)
        extra = {"OUTPOST_EXT_UPDATE_FROM": update_from} if update_from and \
            which == "update" else {}
        async with self._credential_lock:  # one request to the hub at a time: each rotates
            credentials = await self._credentials(rec, manifest, the_step, state, version)
        try:
            spec = handler.Spec(
                name=rec.name, version=version, handler=which, seq=seq, command=command,
                package_dir=self.runtime.package_dir(rec.name, version),
                config_dir=self.runtime.config_dir(rec.name),
                status_dir=self.runtime.status_dir(rec.name),
                log_dir=self.runtime.log_dir(rec.name),
                data_dir=self.runtime.data_dir(rec.name),
                output=ExtensionLog(log_dir(self.runtime.state_root) / f"{rec.name}.log",
                                    self.log_max_bytes,
                                    secret_values([protected or {}, secrets_of(credentials)])),
                settings=settings, protected=protected, identity=identity, group=group,
                limits=self.runtime.limits(manifest.limits) if group is not None else None,
                extra_env=extra, credentials=credentials)
            self._set(rec, state, the_step, f"running the {which} handler of {version}",
                      target=target or version)
            outcome = await handler.run(spec)
        finally:
            self.release_credentials(manifest)
        if outcome.ok:
            return outcome
        if outcome.result == "timeout":
            message = coded("ext_handler_hung", outcome.message)
        elif outcome.message.startswith(str(spec.status_file)):
            message = coded("ext_status_malformed", outcome.message)
        elif outcome.status is not None and outcome.exit_code == 0:
            message = coded("ext_handler_failed", f"the {which} handler of {version} "
                            f"reported an error (its code {outcome.code}): {outcome.message}")
        else:
            message = coded("ext_handler_failed", f"the {which} handler of {version} "
                            f"failed: {outcome.message}")
        raise StepFailed(the_step, message, outcome.code)

    async def _credentials(self, rec: Record, manifest: Manifest, step: Step, state: State,
                           version: str) -> dict[str, Any]:
        """The per-machine credentials the manifest asks for, held until
        ``release_credentials``: issued afresh by the hub, or the ones a command running now
        holds (in memory only: they reach the command on stdin)."""
        found: dict[str, Any] = {}
        for kind in manifest.credentials:
            held = self._held.get(kind)
            if held is not None:
                found[kind] = held[0]
                continue
            if self.channel is None:
                raise StepFailed(step, coded("ext_credentials_unavailable",
                                 f"{rec.name} needs the machine's {kind} credentials and the "
                                 "agent has no hub to ask", kind=kind, name=rec.name))
            try:
                found[kind] = await self.channel.fetch_credentials(kind)
            except (OutpostError, ValueError) as exc:
                why = f"{exc.code} {exc.message}" if isinstance(exc, OutpostError) else str(exc)
                text = coded("ext_credentials_unavailable", f"{rec.name} needs the machine's "
                             f"{kind} credentials and the hub did not give them ({why}); "
                             "tried again later", kind=kind, name=rec.name)
                self._set(rec, state, step, text, target=version)
                raise Transient(text) from exc
        for name, value in found.items():
            self._held[name] = (value, self._held.get(name, (value, 0))[1] + 1)
        return found

    def release_credentials(self, manifest: Manifest) -> None:
        """A command that held ``manifest``'s credentials ended."""
        for kind in manifest.credentials:
            self._release(kind)

    def _release(self, kind: str) -> None:
        held = self._held.get(kind)
        if held is None:
            return
        if held[1] <= 1:
            del self._held[kind]
        else:
            self._held[kind] = (held[0], held[1] - 1)

    # --- what 'outpost agent status' shows ---------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        rows = []
        for rec in sorted(self.store.records.values(), key=lambda r: r.name):
            shown = wire(rec.status())
            shown["running"] = rec.name in self.workers
            rows.append(shown)
        return rows


def secrets_of(credentials: dict[str, Any]) -> list[Any]:
    """The secret values of the credentials (their tokens), for the log's redaction: the
    hub's URL, the machine id and the CA stay readable there."""
    return [value.get("token") for value in credentials.values() if isinstance(value, dict)]


def _unpack(data: bytes, dest: Path, sha256: str) -> Any:
    """``extpackage.unpack``, then every directory of the package made passable for the
    handlers' user (unpack makes them with the agent's umask, which may be 077)."""
    from outpost.protocol import extpackage

    package = extpackage.unpack(data, dest, sha256, light=True)
    for root, dirs, _files in os.walk(dest):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
    return package


def read_states(state_root: Path) -> list[dict[str, Any]]:
    """The states as ``state.json`` holds them, for a support bundle of an agent that is not
    running (nothing secret is in it)."""
    store = Store(state_root / "extensions")
    if not store.path.exists():
        return []
    try:
        raw = json.loads(store.path.read_bytes())
        return [wire(Record.from_dict(dict(v)).status())
                for v in raw["extensions"].values()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return [{"error": f"{store.path}: {exc}"}]
