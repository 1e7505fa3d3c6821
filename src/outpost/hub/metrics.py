"""The job metrics of ``/metrics``, named as Prometheus advises (base units, ``_total``).

- ``outpost_jobs{status}`` (gauge): jobs in each live state (New, Queued, Activating,
  Running, Stopping, Suspending, Suspended, Resuming), read at each scrape.
- ``outpost_jobs_finished_total{status}`` (counter): jobs that reached Completed, Failed or
  Stopped since this hub process started. The final states are a counter, not a gauge:
  counting them would read the whole history at every scrape, and ``rate()`` of a counter
  is what a dashboard wants of them.
- ``outpost_queue_depth{account,group}`` (gauge): jobs Queued, per group of each account; a
  group seen once stays at 0 rather than vanishing.
- ``outpost_job_dispatch_latency_seconds`` (histogram): from a job's submission to its first
  claim by an agent (later attempts are retries, not dispatch).
- ``outpost_job_duration_seconds{status}`` (histogram): from a job's start on a machine to
  its end, for jobs that ran.
- ``outpost_job_reports_total``, ``outpost_job_records_total`` (counters): attempt reports
  and output records taken from agents.
- ``outpost_long_polls_open`` (gauge): agents' long-polls the hub holds now.

The gauges of states come from one indexed count, ``GROUP BY`` over the live rows only
(``ix_jobs_lease`` leads with the status), so a scrape costs what is live, not what is
history. Labels are bounded: states, and groups (a handful per account); never a job or a
machine. Counters and histograms are this process's own (two hubs on one database each
count what they served; sum them); the gauges of states are the database's, the same on
every hub.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.ext.asyncio import AsyncEngine

from . import jobs
from .db import jobs as jobs_table

LIVE = tuple(s for s in jobs.STATES if s not in jobs.FINAL)
DISPATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 300.0, 1800.0)
DURATION_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
                    7200.0, 21600.0, 86400.0)
_LIVE_COUNTS = (sa.select(jobs_table.c.account_id, jobs_table.c.group_name,
                          jobs_table.c.status, sa.func.count())
                .where(jobs_table.c.status.in_(LIVE))
                .group_by(jobs_table.c.account_id, jobs_table.c.group_name,
                          jobs_table.c.status))


class _States(Collector):
    """The gauges read from the database at the last scrape (``JobMetrics.refresh``)."""

    def __init__(self) -> None:
        self.by_status: dict[str, int] = {}
        self.queued: dict[tuple[str, str], int] = {}

    def collect(self) -> Iterator[Metric]:
        states = GaugeMetricFamily("outpost_jobs", "Jobs in each live state", labels=["status"])
        for status in LIVE:
            states.add_metric([status], self.by_status.get(status, 0))
        yield states
        depth = GaugeMetricFamily("outpost_queue_depth", "Jobs queued, per group",
                                  labels=["account", "group"])
        for (account, group), count in sorted(self.queued.items()):
            depth.add_metric([account, group], count)
        yield depth


class JobMetrics:
    """The job metrics of one hub process, registered in its registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.states = _States()
        registry.register(self.states)
        self.finished = Counter("outpost_jobs_finished", "Jobs that reached a final state",
                                ["status"], registry=registry)
        for status in jobs.FINAL:
            self.finished.labels(status)
        self.dispatch = Histogram("outpost_job_dispatch_latency_seconds",
                                  "From a job's submission to its first claim by an agent",
                                  buckets=DISPATCH_BUCKETS, registry=registry)
        self.duration = Histogram("outpost_job_duration_seconds",
                                  "From a job's start on a machine to its end",
                                  ["status"], buckets=DURATION_BUCKETS, registry=registry)
        self.reports = Counter("outpost_job_reports", "Attempt reports taken from agents",
                               registry=registry)
        self.records = Counter("outpost_job_records", "Output records taken from agents",
                               registry=registry)
        self.long_polls = Gauge("outpost_long_polls_open", "Agents' long-polls held now",
                                registry=registry)

    async def refresh(self, engine: AsyncEngine) -> None:
        """Read the live states' counts (raises DatabaseUnavailable in an outage)."""
        async with engine.connect() as conn:
            rows = (await conn.execute(_LIVE_COUNTS)).all()
        by_status: dict[str, int] = {}
        queued = dict.fromkeys(self.states.queued, 0)
        for row in rows:
            status, count = str(row[2]), int(row[3])
            by_status[status] = by_status.get(status, 0) + count
            if status == "Queued":
                queued[(str(row[0]), str(row[1]))] = count
        self.states.by_status, self.states.queued = by_status, queued

    def claimed(self, items: list[dict[str, Any]], now: float) -> None:
        """Jobs just claimed (a long-poll's or a report's answer): their dispatch latency."""
        for item in items:
            payload = item.get("payload") or {}
            if item.get("kind") == "job" and payload.get("attempt") == 1:
                self.dispatch.observe(max(0.0, now - float(item["created_at"])))

    def ended(self, status: str, started_at: float | None, ended_at: float) -> None:
        """A job reached a final state (jobs.py tells, see ``jobs.ended_listeners``)."""
        self.finished.labels(status).inc()
        if started_at is not None:
            self.duration.labels(status).observe(max(0.0, ended_at - started_at))

    def reported(self, reports: int, records: int) -> None:
        self.reports.inc(reports)
        self.records.inc(records)
