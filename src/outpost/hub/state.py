"""The hub's state for one process: what every request handler and background task shares.

``Hub`` is made once (``server.prepare``) and reached by routers through
``request.app.state.hub`` (``routes.deps.HubDep``), never through closures.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
from sqlalchemy.ext.asyncio import AsyncEngine

from outpost.common.supervise import Supervisor

from . import (accounts, backup_catalog, backupstore, db, deployments, extension_ops, extensions,
               gcwatch, install, jobs, leader, machines, messages, metrics, notify, packages,
               recovery)
from .config import HubConfig, HubPaths, ca_fingerprint, vault_for
from .dispatcher import Dispatcher
from .schedules import Scheduler

# The *_created series double every counter and tell an operator nothing here.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Wheel:
    """The agent's wheel, built at the first request and kept for the process's life."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path: Path | None = None
        self.lock = asyncio.Lock()

    async def get(self) -> Path:
        async with self.lock:
            if self.path is None:
                self.path = await asyncio.to_thread(install.cached_wheel, self.directory)
            return self.path


class Hub:
    """Everything a request handler needs, created once per process."""

    def __init__(self, paths: HubPaths, config: HubConfig, engine: AsyncEngine) -> None:
        self.paths = paths
        self.config = config
        self.engine = engine
        self.vault = vault_for(paths)
        # Wake-ups and cache invalidations between request handlers, background tasks and
        # (through the database) other replicas: hub/notify.py. Which replica runs the
        # scheduler: hub/leader.py.
        self.notifier = notify.create(engine)
        notify.attach(engine, self.notifier)
        accounts.follow(self.notifier)
        machines.follow(self.notifier)
        # Extension packages and goals; each account's goals held for heartbeats' etags.
        held = packages.HeldPackages()  # packages served to agents, of either kind
        self.extensions = extensions.Extensions(engine, self.vault, held)
        self.extensions.cache.follow(self.notifier)
        # Module packages and deployments; each account's deployments held for heartbeats.
        self.deployments = deployments.Deployments(engine, held)
        self.deployments.cache.follow(self.notifier)
        # Operations asked of extensions (hub/extension_ops.py).
        self.ext_ops = extension_ops.ExtensionOps(engine, self.extensions.cache)
        self.ext_ops.ended.append(backup_catalog.on_end)  # the snapshots backup ops took
        self.leadership = leader.Leadership(engine)
        self.dispatcher = Dispatcher(engine, self.notifier)
        self.scheduler = Scheduler(engine, self.dispatcher, ext_ops=self.ext_ops)
        self.wheel = Wheel(paths.root / "agent-dist")
        # Each machine's restic repository (hub/backupstore.py, docs/backup.md).
        self.backups = backupstore.Store(paths.root / "backup")
        # Protections, their points and failover/failback actions (hub/recovery.py).
        self.recovery = recovery.Recovery(engine, self.extensions, self.ext_ops, self.backups)
        self.tasks: Supervisor | None = None  # the background tasks, while the app runs
        self.ca_pem = paths.ca_cert.read_text()
        self.ca_fingerprint = ca_fingerprint(paths)
        self.registry = CollectorRegistry()
        self.requests = Counter("outpost_http_requests", "HTTP requests served",
                                ["status"], registry=self.registry)
        self.registrations = Counter("outpost_registrations", "Machines registered",
                                     registry=self.registry)
        self.heartbeats = Counter("outpost_heartbeats", "Heartbeats received",
                                  registry=self.registry)
        self.refusals = Counter("outpost_refusals", "Requests refused, by reason",
                                ["reason"], registry=self.registry)
        self.machines = Gauge("outpost_machines", "Machines by status", ["status"],
                              registry=self.registry)
        failures = Counter("outpost_database_failures", "Database outages met (answered 503 "
                           "E3007), by kind", ["kind"], registry=self.registry)
        if isinstance(engine, db.Engine):
            engine.health.listeners.append(lambda kind: failures.labels(kind).inc())
        Gauge("outpost_scheduler_leader", "1 while this replica runs the scheduler",
              registry=self.registry).set_function(lambda: float(self.leadership.leader))
        self.job_metrics = metrics.JobMetrics(self.registry)
        self.loop_lag = gcwatch.LoopLag(self.registry)  # sampled while the app runs
        # The collector's survivors frozen, young collections ten a second: the server's
        # (server.py), not an in-process app's.
        self.gc_freezer: gcwatch.Freezer | None = None
        jobs.ended_listeners.append(self.job_metrics.ended)
        # Upstream messages from machines' modules: stored, read, pruned, forwarded.
        self.messages = messages.Messages(engine, config.messages, self.notifier,
                                          lambda: self.leadership.leader, self.registry)
