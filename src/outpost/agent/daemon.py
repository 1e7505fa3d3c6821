"""The agent daemon: heartbeats, long-polls for work, answers on its status socket.

Signal handlers only set flags. SIGTERM or SIGINT stops gracefully (the in-flight heartbeat
may finish within the grace period); a second SIGINT forces. Every background task is
supervised (common/supervise.py): if one fails unexpectedly it is logged and started again
after a backoff of at most 30 s. Work items go to the handler registered for their kind
(work.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import secrets
import signal
import time
from collections.abc import Awaitable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from nacl.signing import SigningKey

from outpost import __version__
from outpost.common.events import first_of
from outpost.common.supervise import Supervisor
from outpost.protocol.readers import HeartbeatAck, JobClaim, PollAnswer
from outpost.protocol.errors import HubRefused, OutpostError, TransportError

from . import cache, facts, joblogs, work
from . import config as agent_config
from .cgroups import Limits
from .config import AgentConfig
from .extensions.store import Store
from .pressure import Pressure, own_cpu_seconds
from .process import watch_children_with_pidfd
from .reporter import Reporter
from .sandbox import Sandbox
from .state import Registration, StateDir
from .transport import Backoff, Clock, HubClient
from .turns import Turns

if TYPE_CHECKING:
    from .extensions import ops as ext_ops
    from .extensions.reconcile import Reconciler
    from .modules.hook import Modules
    from .runner import JobRun

log = logging.getLogger("outpost.agent")

GRACE_SECONDS = 5.0
# How long a graceful stop waits for the hub to take its stop notice: an absent hub must
# not hold the stop up (it then learns of it from the missed heartbeats).
STOP_NOTICE_SECONDS = 2.0


class Agent:
    def __init__(self, state: StateDir, config: AgentConfig, clock: Clock,
                 config_path: Path | None = None,
                 handlers: work.Registry | None = None) -> None:
        self.state = state
        self.config = config.effective()
        self.clock = clock
        self.config_path = config_path
        self.started = time.time()
        # This run, named in its heartbeats and its stop notice: a heartbeat of this run
        # that reaches the hub after the stop notice does not end the stop.
        self.run_id = secrets.token_hex(8)
        self.stop_requested = asyncio.Event()
        self.forced = False
        self.last_ack: float | None = None
        self.last_error: dict[str, Any] | None = None
        self.registration: Registration | None = None
        self.client: HubClient | None = None
        self.cache: cache.Cache | None = None
        self.supervisor = Supervisor(log)
        self.jobs: dict[str, JobRun] = {}
        self.handlers = handlers or work.registry
        self.work = work.Context(call=self._call, jobs=self.jobs, state=state,
                                 spawn=self._spawn, start_job=self._start_job,
                                 note_failure=self._note_failure,
                                 start_extensions=self._start_extensions)
        self._job_tasks: dict[tuple[str, int], asyncio.Task[None]] = {}  # (job, attempt)
        self._deliveries: set[asyncio.Task[Any]] = set()
        self.spool_dir = state.root / "spool"
        # The long-poll in flight and the capacity it offered (see _recheck_poll).
        self._poll: tuple[asyncio.Future[Any] | None, int] = (None, 0)
        # The long-poll carries the heartbeat (turns.py): one request for both.
        self.turns = Turns(cadence=self.config.heartbeat_interval)
        self._poll_withdrawn = False
        self._beats_failed = False  # since the last acknowledged heartbeat
        # Set by each heartbeat the hub acknowledges: a poll waiting out its backoff after
        # failures asks again at once (the hub, or its database, is back), so work queued
        # after an outage starts in milliseconds, not after a backoff of up to backoff_max.
        self._hub_answered = asyncio.Event()
        self._reload = asyncio.Event()  # SIGHUP: read the backpressure thresholds again
        self.pressure = Pressure(self.config.max_cpu_percent, self.config.max_memory_percent,
                                 self.config.pressure_seconds, own_cpu_seconds(self._leaders))
        self.reporter = Reporter(self._call, self._capacity, self._take)
        self.sandbox = Sandbox(state.root, self.config.max_concurrent_jobs,
                               Limits(self.config.job_memory_mb, self.config.job_cpus,
                                      self.config.job_processes), self.config.job_users)
        # The extensions' reconciler and operations, started with the hub client on a
        # machine that has extensions, else once the hub names some (a heartbeat's
        # extensions_etag) or asks for an operation: until then the agent does not load
        # them, nor the wire models they read (docs/architecture.md, "The agent's memory
        # budget").
        self.ext_ops: ext_ops.Operations | None = None
        self.extensions: Reconciler | None = None
        self._ext_store = Store(state.root / "extensions")  # extensions/runtime.py STATE_DIR
        self._ext_etag: str | None = None  # the hub's, while the extensions do not run
        self._key: SigningKey | None = None
        # Edge modules (modules/hook.py): loaded once a heartbeat names a deployment or the
        # state directory records one (its modules may still run: they are adopted).
        self.modules: Modules | None = None
        self._deploy_etag: str | None = None  # the hub's, while the modules do not run

    # --- lifecycle -----------------------------------------------------------------------
    async def run(self) -> None:
        other = self.state.running_pid()
        if other is not None and other != os.getpid():
            raise OutpostError("agent_already_running",
                               f"Another agent (pid {other}) already runs with state "
                               f"directory {self.state.root}.", pid=other)
        key = self.state.load_key()  # E1013: the one file nothing can fetch again
        reg, identity = cache.load_at_start(self.state)  # HW-9: corrupt files set aside
        self.state.write_pid()
        self.state.keep_private()
        try:
            self.sandbox.start()  # E4012: no job runs as root for want of its users
        except BaseException:
            self.state.remove_pid()
            raise
        server = await self._status_server()
        loop = asyncio.get_running_loop()
        watch_children_with_pidfd(loop)
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self._on_sigint)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        try:
            if not await self._connect(key, reg, identity):
                return  # stopped before any hub answered
            self._recover()
            self._key = key
            self._ext_store.load()
            if self._ext_store.records:
                self._start_extensions()
            if (self.state.root / "modules" / "supervisor.json").exists():
                self._start_modules()  # adopts the modules still running
            self.supervisor.start("heartbeat", self._heartbeat_loop)
            self.supervisor.start("poll", self._poll_loop)
            self.supervisor.start("reload-thresholds", self._reload_thresholds)
            self.supervisor.start("prune-job-logs", lambda: joblogs.prune_forever(
                self.state.root, self.config.job_log_retention, self.stop_requested))
            await self.stop_requested.wait()
            log.info("stopping")
            await self._shutdown()
            await self._tell_hub_stopping()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            server.close()
            if self.extensions is not None:
                self.extensions.runtime.close()
            self.sandbox.close()
            if self.client is not None:
                await self.client.aclose()
            self.state.remove_pid()
            if not self.state.socket_address.startswith("\0"):
                Path(self.state.socket_address).unlink(missing_ok=True)
            log.info("stopped")

    async def _reload_thresholds(self) -> None:
        """On SIGHUP, the backpressure thresholds (max_cpu_percent, max_memory_percent,
        pressure_seconds) are read again from the config file, so that an operation waiting
        for the load to pass (E9091's fix: raise them) need not be cut off by a restart;
        every other setting still needs one."""
        while True:
            await self._reload.wait()
            self._reload.clear()
            try:
                cfg = agent_config.load(self.config_path).effective()
            except OutpostError as exc:
                log.error("SIGHUP: %s was not read again (%s %s); the thresholds stay as "
                          "they were", self.config_path, exc.code, exc.message)
                continue
            self.config = replace(self.config, max_cpu_percent=cfg.max_cpu_percent,
                                  max_memory_percent=cfg.max_memory_percent,
                                  pressure_seconds=cfg.pressure_seconds)
            self.pressure.retune(cfg.max_cpu_percent, cfg.max_memory_percent,
                                 cfg.pressure_seconds)
            log.info("SIGHUP: thresholds now CPU %g%%, memory %g%%, for %g s",
                     cfg.max_cpu_percent, cfg.max_memory_percent, cfg.pressure_seconds)

    def request_stop(self) -> None:
        self.stop_requested.set()

    def _on_sigint(self) -> None:
        if self.stop_requested.is_set():
            self.forced = True
            log.warning("second interrupt: stopping now")
            for task in self.supervisor.tasks.values():
                task.cancel()
        self.request_stop()

    async def _shutdown(self) -> None:
        # Nothing the agent does yet needs draining: an interrupted long-poll or heartbeat
        # is simply sent again by the next agent. Jobs (later) drain within GRACE_SECONDS.
        # Running jobs are ended (their whole process group) rather than left orphaned.
        tasks = [*self.supervisor.tasks.values(), *self._job_tasks.values(),
                 *self._deliveries]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=GRACE_SECONDS)
        if self.ext_ops is not None:
            from .extensions import ops as ext_ops

            ext_ops.detach(self.state)
            await self.ext_ops.close()
        if self.extensions is not None:
            await self.extensions.close()  # a handler running now is ended with its group
        if self.modules is not None:
            from .modules import msghub

            msghub.detach(self.state)
            await self.modules.close()  # the modules keep running (adopted by the next)
        await self.reporter.close()

    async def _tell_hub_stopping(self) -> None:
        """A graceful stop: the hub shows the machine Stopped at once rather than Healthy
        until heartbeats are missed. Sent after the heartbeat task ended, so no heartbeat of
        this run follows it; kept in the state directory for 'outpost check'."""
        told: str | None = None
        try:
            await asyncio.wait_for(
                self._call("POST", "/v1/agent/stopping", {"run": self.run_id},
                           timeout=STOP_NOTICE_SECONDS),
                STOP_NOTICE_SECONDS)
            told = self.client.url if self.client else None
            log.info("the hub was told this agent is stopping")
        except (OutpostError, asyncio.TimeoutError) as exc:
            why = exc.message if isinstance(exc, OutpostError) else "no answer in time"
            log.warning("could not tell the hub this agent is stopping (%s): it shows the "
                        "machine Unresponsive once heartbeats are missed", why)
        self.state.save_stop(time.time(), told)

    # --- talking to the hub --------------------------------------------------------------
    async def _connect(self, key: SigningKey, reg: Registration | None,
                       identity: dict[str, Any]) -> bool:
        """Set up the hub client; a registration lost to corruption is fetched again first,
        retried with backoff while no hub answers (HW-9, ED-4). False if stopped meanwhile."""
        urls = self.config.hub_urls or list(identity["hub_urls"])
        backoff = Backoff(cap=self.config.backoff_max)
        while reg is None:
            try:
                reg = await cache.fetch_registration(identity, key, self.clock, urls,
                                                     self.config.proxy,
                                                     self.config.request_timeout)
            except OutpostError as exc:
                self._note_failure(exc)
                await self._sleep(self._log_failure("fetching the registration", exc,
                                                    backoff))
                if self.stop_requested.is_set():
                    return False
                continue
            self.state.save_registration(reg)
            log.warning("registration.json fetched again from the hub and written")
        self.registration = reg
        self.cache = cache.Cache(self.state, key, reg)
        self.client = HubClient(urls, reg.ca_pem, clock=self.clock, proxy=self.config.proxy,
                                timeout=self.config.request_timeout,
                                connections=self.config.connections,
                                machine_id=reg.machine_id, machine_key=key,
                                ca_fingerprint=reg.ca_fingerprint)
        last = self.cache.last_hub_url
        if last in self.client.urls:
            self.client.active = self.client.urls.index(last)  # the hub that answered last
        log.info("agent %s started: machine %s (%s), group %s, hub %s", __version__, reg.name,
                 reg.machine_id, reg.group, ", ".join(self.client.urls))
        log.info("sandbox: runbooks run as %s; job limits by %s; defaults %s",
                 self.sandbox.describe_users(), self.sandbox.describe_limits(),
                 self.sandbox.defaults.text())
        return True

    def _start_extensions(self) -> None:
        """The extensions' reconciler and its reports, beside heartbeats and jobs; once."""
        if self.extensions is not None or self.client is None or self._key is None:
            return
        from .extensions import ops as ext_ops
        from .extensions.channel import HttpChannel
        from .extensions.reconcile import Reconciler
        from .extensions.runtime import Runtime

        cfg = self.config
        runtime = Runtime(self.state.root, Limits(cfg.extension_memory_mb, cfg.extension_cpus,
                                                  cfg.extension_processes),
                          self.sandbox.hierarchy, self.sandbox.why_no_cgroups)
        assert runtime.state_dir == self._ext_store.directory
        self.extensions = Reconciler(self._ext_store, runtime, HttpChannel(self.client),
                                     self._key, log_max_bytes=cfg.log_bytes[0])
        if self._ext_etag is not None:
            self.extensions.note_etag(self._ext_etag)
        self.supervisor.start("extensions", self.extensions.run)
        self.supervisor.start("extension-reports", self.extensions.reporter.run)
        # Operations (the ext_op work kind): run beside the reconciler, through its records.
        self.ext_ops = ext_ops.Operations(self.extensions, self._call, self.pressure.reason)
        ext_ops.attach(self.state, self.ext_ops)
        log.info("extensions started")

    def _start_modules(self) -> None:
        """The module supervisor, its reports and its control socket; once."""
        if self.modules is not None or self.client is None:
            return
        from .modules.hook import Modules

        cfg = self.config
        self.modules = Modules(self.state.root, self.client,
                               hierarchy=self.sandbox.hierarchy,
                               defaults=Limits(cfg.extension_memory_mb, cfg.extension_cpus,
                                               cfg.extension_processes))
        from .modules import msghub

        msghub.attach(self.state, self.modules.messages)  # for module_call work items
        self.supervisor.start("modules", self.modules.run)
        self.supervisor.start("module-reports", self.modules.report_loop)
        self.supervisor.start("module-control", self.modules.control)
        log.info("modules started")

    def _note_deployment_etag(self, etag: str) -> None:
        """The hub's etag of the machine's deployment: '' while none was ever made for it."""
        if self.modules is None:
            self._deploy_etag = etag
            if not etag:
                return
            self._start_modules()
        if self.modules is not None:
            self.modules.note_etag(etag)

    def _note_extensions_etag(self, etag: str) -> None:
        """The hub's etag of the machine's extensions: a machine that has none is told ''
        (hub/extension_goals.py); any other value starts the extensions here."""
        if self.extensions is None:
            self._ext_etag = etag
            if etag:
                self._start_extensions()  # which notes it
            return
        self.extensions.note_etag(etag)

    def _handler_roles(self) -> list[tuple[int, str]]:
        """The extension commands running now (none before the extensions started)."""
        if self.extensions is None:
            return []
        from .extensions import handler

        return list(handler.running.items())

    def _note_failure(self, exc: OutpostError) -> None:
        kind = exc.kind if isinstance(exc, TransportError) else exc.reason
        self.last_error = {"at": time.time(), "code": exc.code, "kind": kind,
                           "message": exc.message, "fix": exc.fix}

    async def _call(self, method: str, path: str, payload: Any = None,
                    timeout: float | None = None) -> Any:
        assert self.client is not None
        return await self.client.request(method, path, payload, timeout=timeout)

    async def _sleep(self, seconds: float, wake: asyncio.Event | None = None) -> None:
        """``seconds``, or until the agent stops or ``wake`` is set."""
        await first_of([self.stop_requested, wake], seconds)

    # How often the heartbeat loop looks at the open poll's capacity (_recheck_poll) while
    # polls carry the heartbeats.
    RECHECK = 5.0

    def _beat(self) -> tuple[dict[str, Any], dict[str, int]]:
        """The heartbeat to send now, and the attempts it lists."""
        beat = facts.heartbeat(self.state.root, self.started, self.config.heartbeat_interval,
                               len(self.jobs), self.not_taking_work())
        beat["run"] = self.run_id
        listed = {run.id: run.attempt for run in self.jobs.values()}
        beat["jobs"] = [{"id": job_id, "attempt": attempt}
                        for job_id, attempt in listed.items()]
        return beat, listed

    async def _heartbeat_loop(self) -> None:
        """Heartbeats that no poll carries (turns.py): while polls fail and back off, or
        when a poll is held past the time a heartbeat is due."""
        backoff = Backoff(cap=min(self.config.backoff_max, max(self.config.heartbeat_interval,
                                                                 1.0)))
        interval = self.config.heartbeat_interval
        facts.heartbeat(self.state.root, self.started, interval)  # prime cpu_percent
        while not self.stop_requested.is_set():
            await self.turns.until_due(min(interval, self.RECHECK), self.stop_requested)
            self._recheck_poll()  # pressure or a short disk since the poll was opened
            if self.stop_requested.is_set() or not self.turns.due():
                continue
            await self.turns.beat_turn()  # the next poll may carry it yet
            if not self.turns.due():
                continue
            beat, listed = self._beat()
            try:
                answer = await self._call("POST", "/v1/agent/heartbeat", beat)
            except OutpostError as exc:
                self._note_failure(exc)
                self._beats_failed = True
                delay = min(self._log_failure("heartbeat", exc, backoff), interval)
                self.turns.next_beat(delay, interval)
                continue
            self.turns.next_beat(interval)
            backoff.reset()
            await self._acknowledged(answer, listed)

    async def _acknowledged(self, answer: Any, listed: dict[str, int]) -> None:
        """A heartbeat the hub acknowledged (on its own or carried by a poll)."""
        self._hub_answered.set()
        if self._beats_failed:
            log.info("heartbeat acknowledged again by %s", self.client.url
                     if self.client else "?")
            self._beats_failed = False
        log.debug("heartbeat acknowledged by %s", self.client.url if self.client else "?")
        self.last_ack = time.time()
        self.last_error = None
        if self.cache is not None and self.client is not None:
            await self.cache.check(self.client, answer)  # HW-9: heal what went bad
        ack = HeartbeatAck.read(answer)
        self._note_extensions_etag(ack.extensions_etag)
        self._note_deployment_etag(ack.deployment_etag)
        for job_id in ack.abandon:
            run = self.jobs.get(job_id)
            # Only the attempt this heartbeat listed: the job's next attempt may have
            # started here since (its previous one ended and the hub gave it back).
            if run is not None and run.attempt == listed.get(job_id):
                log.warning("job %s: the hub gave this attempt up (its lease expired); "
                            "ending it", job_id)
                self._spawn(run.control("abandon", "the hub gave this attempt up after "
                                        "its lease expired"), f"abandon-{job_id}")

    def _log_failure(self, what: str, exc: OutpostError, backoff: Backoff) -> float:
        delay = backoff.next()
        if isinstance(exc, TransportError):
            log.warning("%s failed: hub unreachable (%s): %s; retrying in %.1f s",
                        what, exc.kind, exc.message, delay)
        elif isinstance(exc, HubRefused):
            log.error("%s refused by the hub: %s %s. Fix: %s; retrying in %.1f s",
                      what, exc.code, exc.message.rstrip("."), exc.fix.rstrip("."), delay)
        else:
            log.error("%s failed: %s %s. Fix: %s; retrying in %.1f s",
                      what, exc.code, exc.message.rstrip("."), exc.fix.rstrip("."), delay)
        return delay

    async def _poll_loop(self) -> None:
        backoff = Backoff(cap=self.config.backoff_max)
        wait = self.config.poll_timeout
        while not self.stop_requested.is_set():
            # The hub counts the jobs it sees this machine hold against the capacity, and
            # wakes this poll when one of them ends (unless the report of that end claimed
            # the freed slot itself), so the poll is always open.
            capacity = self._capacity()
            busy = capacity == 0
            hold = min(wait, 5.0) if busy else wait  # look at the pressure again soon
            # The poll carries the heartbeat when one falls due (turns.py).
            hold, carry = await self.turns.poll_turn(hold)
            hold = round(hold, 3)
            # A stopping agent sends no heartbeat after it told the hub (_tell_stopping).
            carry = carry and not self.stop_requested.is_set()
            beat, listed = self._beat() if carry else (None, {})
            if carry:
                log.debug("heartbeat sent with the poll to %s", self.client.url
                          if self.client else "?")
            # The extensions' poll etag (reconcile.py); while they do not run, the hub's
            # last one, or before any that of the goals last reconciled ("" for none).
            if self.extensions is not None:
                told: str | None = self.extensions.poll_etag
            else:
                told = self._ext_etag if self._ext_etag is not None else self._ext_store.etag
            etag = "" if told is None else f"&extensions_etag={quote(told, safe='')}"
            # The deployment's likewise (modules/hook.py poll_etag; "" for none known).
            deployed = self.modules.poll_etag if self.modules is not None else (
                self._deploy_etag or "")
            etag += f"&deployment_etag={quote(deployed, safe='')}"
            request = asyncio.ensure_future(self._call(
                "POST", f"/v1/agent/poll?wait={hold:g}&capacity={capacity}{etag}",
                {"heartbeat": beat} if carry else None,
                timeout=hold + self.config.request_timeout))
            request.add_done_callback(lambda _: self.turns.poll_back())
            self._poll = (request, capacity)
            try:
                answer = await request
            except asyncio.CancelledError:
                if carry:
                    self.turns.beat_lost()
                current = asyncio.current_task()
                if self._poll_withdrawn and not (current and current.cancelling()):
                    self._poll_withdrawn = False  # _recheck_poll: ask again, with 0
                    continue
                raise
            except OutpostError as exc:
                if carry:  # the heartbeat failed with it, and is due again
                    self.turns.beat_lost()
                    self._beats_failed = True
                self._note_failure(exc)
                delay = self._log_failure("heartbeat" if carry else "poll",
                                          exc, backoff)
                self._hub_answered.clear()
                await self._sleep(delay, self._hub_answered)
                continue
            backoff.reset()
            polled = PollAnswer.read(answer)
            if carry and polled.heartbeat_error is not None:
                log.warning("the heartbeat carried by the poll was not recorded: %s %s",
                            polled.heartbeat_error.get("code"),
                            polled.heartbeat_error.get("message"))
                self.turns.beat_lost()
            elif carry and polled.heartbeat is None:
                log.info("the hub at %s does not take heartbeats in polls; sending them on "
                         "their own", self.client.url if self.client else "?")
                self.turns.beat_lost(refused=True)
            elif carry and polled.heartbeat is not None:
                await self._acknowledged(polled.heartbeat, listed)
            if polled.extensions_etag is not None:
                self._note_extensions_etag(polled.extensions_etag)  # its own goal changed
            if polled.deployment_etag is not None:
                self._note_deployment_etag(polled.deployment_etag)
            for item in polled.items:
                await self.handlers.handle(item, self.work)

    def _capacity(self) -> int:
        """How many jobs to run at once now: none while the machine is under pressure or its
        disk is short, or while the agent is stopping."""
        if self.stop_requested.is_set() or self.pressure.reason() is not None \
                or self._disk_short() is not None:
            return 0
        return self.config.max_concurrent_jobs

    def _recheck_poll(self) -> None:
        """The capacity fell to 0 (a job found the disk full, or at a heartbeat the machine
        is under pressure): the open long-poll still offers the old one, and the hub would
        claim with it when a slot frees. It is withdrawn (the hub claims nothing for a poll
        whose agent hung up) and asked again."""
        request, offered = self._poll
        if offered > 0 and request is not None and not request.done() \
                and self._capacity() == 0:
            self._poll_withdrawn = True
            request.cancel()

    def _disk_short(self) -> str | None:
        """Why the state directory's disk cannot take a job's output now, or None. Read
        each time (a statvfs, microseconds): right after a job filled the disk, the claim
        in its end's report must already see it."""
        floor = self.config.min_free_disk_mb
        if floor <= 0:
            return None
        try:
            free = shutil.disk_usage(self.state.root).free / 2**20
        except OSError:
            return None
        if free >= floor:
            return None
        return (f"the disk of {self.state.root} has {free:.1f} MB free, under "
                f"min_free_disk_mb ({floor:g} MB)")

    async def _take(self, items: list[dict[str, Any]]) -> None:
        """Work the hub claimed for this machine in an answer to its reports."""
        for item in items:
            await self.handlers.handle(item, self.work)

    def not_taking_work(self) -> str | None:
        """Why the agent claims no new job now (shown in the machine list), or None."""
        why = self.pressure.reason() or self._disk_short()
        if why:
            return why
        if len(self.jobs) >= self.config.max_concurrent_jobs:
            return f"running {len(self.jobs)} jobs, its maximum (max_concurrent_jobs)"
        return None

    def _spawn(self, work: Awaitable[Any], name: str) -> None:
        """A short task that must not be lost: kept, and its failure logged."""
        async def body() -> None:
            try:
                await work
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s failed", name)

        task = asyncio.create_task(body(), name=name)
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    def _leaders(self) -> list[int]:
        """The process leaders of the runbooks running now."""
        return [run.proc.pid for run in self.jobs.values()
                if run.proc is not None and run.proc.returncode is None]

    def _recover(self) -> None:
        """Deliver what a previous run of the agent spooled and did not get to the hub.

        An attempt it left running is ended first (its process group too); the hub treats
        that as a failed activation and queues the job again (HW-1).
        """
        if not any(self.spool_dir.glob("*.jsonl")):  # runner.leftover_spools' files
            return  # nothing left over: the job runner loads with the first job
        from .runner import Uploader, end_leftover, leftover_spools

        for spool in leftover_spools(self.spool_dir):
            try:
                end_leftover(spool)
                meta = spool.meta()
            except (OSError, ValueError) as exc:
                log.error("spool %s is unreadable (%s); moving it aside", spool.path, exc)
                spool.path.rename(spool.path.with_suffix(".corrupt"))
                continue
            log.info("job %s: delivering attempt %s spooled by the last run", meta["job_id"],
                     meta["attempt"])
            uploader = Uploader(spool, meta["job_id"], int(meta["attempt"]), self._call,
                                self.reporter)
            self._spawn(uploader.run(announce=False), f"deliver-{meta['job_id']}")

    def _start_job(self, claim: JobClaim) -> None:
        """The ``job`` work kind's handler: run the claimed attempt (work.py)."""
        assert self.client is not None and self.registration is not None
        from .runner import JobRun

        try:
            self.sandbox.group_name = self.registration.group
            run = JobRun(claim.as_job(), self.state.root / "jobs", self.spool_dir,
                         self._call, self.client.url, self.registration.ca_pem,
                         self.reporter, self.sandbox)
        except OSError as exc:  # no spool, no job: the disk is full, or the directory gone
            self._cannot_spool(claim, exc)
            return
        self.jobs[run.id] = run
        run.disk_refused = self._recheck_poll

        async def body() -> None:
            try:
                await run.run()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job %s failed inside the agent", run.id)
            finally:
                # The job's next attempt may already run here (claimed in the answer to this
                # one's end): only this attempt's entries go.
                if self.jobs.get(run.id) is run:
                    del self.jobs[run.id]
                self._job_tasks.pop((run.id, run.attempt), None)

        log.info("job %s: running %s version %s (attempt %s)", run.id, claim.runbook,
                 claim.version, run.attempt)
        self._job_tasks[(run.id, run.attempt)] = asyncio.create_task(body(),
                                                                     name=f"job-{run.id}")

    def _cannot_spool(self, claim: JobClaim, exc: OSError) -> None:
        """A claimed job whose spool cannot be made is given back at once as a failed
        activation (the machine's fault: the hub queues it again), rather than left to
        wait out its lease."""
        job_id, attempt = claim.job_id, claim.attempt
        why = (f"the agent could not make the job's spool in {self.spool_dir} "
               f"({exc.strerror or exc}); free space on the machine")
        log.error("job %s: %s", job_id, why)
        end = {"exit_code": None, "signal": None, "cause": "lost", "reason": why}
        self._spawn(self._call("POST", f"/v1/agent/jobs/{quote(job_id, safe='')}/report",
                               {"attempt": attempt, "started": False, "end": end,
                                "records": []}), f"give back {job_id}")

    # --- local status --------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        reg = self.registration
        return {
            "pid": os.getpid(),
            "started_at": self.started,
            "uptime_seconds": round(time.time() - self.started, 3),
            "version": __version__,
            "state_dir": str(self.state.root),
            "config_path": str(self.config_path) if self.config_path else None,
            "hub_url": self.client.url if self.client else None,
            "hub_urls": self.client.urls if self.client else [],
            "account_id": reg.account_id if reg else None,
            "group": reg.group if reg else None,
            "machine_id": reg.machine_id if reg else None,
            "machine_name": reg.name if reg else None,
            "heartbeat_interval": self.config.heartbeat_interval,
            "constrained": self.config.constrained,
            "max_concurrent_jobs": self.config.max_concurrent_jobs,
            "last_heartbeat_ack_at": self.last_ack,
            "last_error": self.last_error,
            "running_jobs": len(self.jobs),
            "jobs": [{"id": run.id, "attempt": run.attempt, "runbook": run.job.get("runbook"),
                      "pid": run.proc.pid if run.proc else None}
                     for run in self.jobs.values()],
            "not_taking_work": self.not_taking_work(),
            "sandbox": self.sandbox.status(),
            "extensions": self.extensions.status() if self.extensions is not None else [],
            "extensions_fetched_at": self.extensions.fetched_at if self.extensions else None,
            "modules": self.modules.status() if self.modules is not None else None,
            "processes": [{"pid": os.getpid(), "role": "agent", "started_at": self.started}]
            + [{"pid": run.proc.pid, "role": f"job {job_id}"}
               for job_id, run in self.jobs.items() if run.proc is not None]
            + [{"pid": pid, "role": role} for pid, role in self._handler_roles()]
            + [{"pid": m.pid, "role": f"module {m.name}"} for m in (
                self.modules.supervisor.statuses() if self.modules is not None else [])
               if m.pid is not None],
        }

    async def _status_server(self) -> asyncio.AbstractServer:
        address = self.state.socket_address
        if not address.startswith("\0"):
            Path(address).unlink(missing_ok=True)

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                writer.write(json.dumps(self.status()).encode() + b"\n")
                await writer.drain()
            finally:
                writer.close()

        server = await asyncio.start_unix_server(answer, path=address)
        if not address.startswith("\0"):
            os.chmod(address, 0o600)
        return server


def read_status(state: StateDir, timeout: float = 3.0) -> dict[str, Any] | None:
    """The running agent's status from its socket, or None when nothing answers."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(state.socket_address)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        data: dict[str, Any] = json.loads(b"".join(chunks))
        return data
    except (OSError, ValueError):
        return None
    finally:
        sock.close()
