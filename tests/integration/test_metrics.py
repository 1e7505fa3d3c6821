"""``/metrics`` tells about jobs as Prometheus names things: a real hub runs jobs on a real
agent, the scrape is parsed with prometheus_client's own parser, and the families, their
types and their values are those of what happened."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support import Agent, Hub, healthy_agent, publish_script, wait_until

RUN = 4  # jobs that complete


def _scrape(hub: Hub) -> dict[str, Any]:
    with hub.client() as client:
        response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(response.text)}


def _value(family: Any, sample: str, **labels: str) -> float:
    found = [s.value for s in family.samples
             if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (sample, labels, family.samples)
    return float(found[0])


def _job(hub: Hub, runbook: str, group: str = "web") -> str:
    response = hub.api("POST", "/v1/jobs", json={"runbook": runbook, "group": group})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _ended(hub: Hub, job_id: str) -> str:
    def status() -> str | None:
        job = hub.api("GET", f"/v1/jobs/{job_id}").json()
        return str(job["status"]) if job["status"] in ("Completed", "Failed") else None

    return wait_until(status, 30, 0.1, f"job {job_id} to end")


def test_job_metrics_after_real_jobs(hub: Hub, agents: list[Agent],
                                     tmp_path: Path) -> None:
    # (the hub fixture runs it on SQLite and on PostgreSQL)
    publish_script(hub, tmp_path, "work", "echo one\necho two\nsleep 0.2\n")
    publish_script(hub, tmp_path, "broken", "echo oops >&2\nexit 3\n")
    healthy_agent(hub, tmp_path, agents)
    ran = [_job(hub, "work") for _ in range(RUN)]
    failed = _job(hub, "broken")
    assert [_ended(hub, j) for j in ran] == ["Completed"] * RUN
    assert _ended(hub, failed) == "Failed"
    waiting = [_job(hub, "work", "nomachines") for _ in range(2)]

    families = wait_until(lambda: (f := _scrape(hub)) and _value(
        f["outpost_long_polls_open"], "outpost_long_polls_open") == 1 and f, 10, 0.2,
        "the agent's long-poll to be held")
    types = {name: f.type for name, f in families.items() if name.startswith("outpost_")}
    assert {
        "outpost_jobs": "gauge", "outpost_queue_depth": "gauge",
        "outpost_jobs_finished": "counter", "outpost_job_reports": "counter",
        "outpost_job_records": "counter", "outpost_long_polls_open": "gauge",
        "outpost_job_dispatch_latency_seconds": "histogram",
        "outpost_job_duration_seconds": "histogram",
    }.items() <= types.items(), types

    jobs = families["outpost_jobs"]
    assert _value(jobs, "outpost_jobs", status="Queued") == 2
    assert _value(jobs, "outpost_jobs", status="Running") == 0
    assert not any(s.labels["status"] in ("Completed", "Failed") for s in jobs.samples)
    depth = families["outpost_queue_depth"]
    assert _value(depth, "outpost_queue_depth", group="nomachines") == 2
    assert _value(depth, "outpost_queue_depth", account=hub.account_id,
                  group="nomachines") == 2

    finished = families["outpost_jobs_finished"]
    assert _value(finished, "outpost_jobs_finished_total", status="Completed") == RUN
    assert _value(finished, "outpost_jobs_finished_total", status="Failed") == 1
    assert _value(finished, "outpost_jobs_finished_total", status="Stopped") == 0

    dispatch = families["outpost_job_dispatch_latency_seconds"]
    count = _value(dispatch, "outpost_job_dispatch_latency_seconds_count")
    assert count == RUN + 1  # every job that ran was claimed once; the waiting ones never
    assert 0 < _value(dispatch, "outpost_job_dispatch_latency_seconds_sum") < 30 * count
    assert _value(dispatch, "outpost_job_dispatch_latency_seconds_bucket", le="+Inf") == count

    duration = families["outpost_job_duration_seconds"]
    assert _value(duration, "outpost_job_duration_seconds_count", status="Completed") == RUN
    assert _value(duration, "outpost_job_duration_seconds_count", status="Failed") == 1
    # The durations are the jobs' own: from started_at to ended_at as the hub keeps them.
    shown = [hub.api("GET", f"/v1/jobs/{j}").json() for j in ran]
    took = sum(j["ended_at"] - j["started_at"] for j in shown)
    assert abs(_value(duration, "outpost_job_duration_seconds_sum", status="Completed")
               - took) < 1e-3 * RUN
    longest = max(j["ended_at"] - j["started_at"] for j in shown)
    assert _value(duration, "outpost_job_duration_seconds_bucket", status="Completed",
                  le="60.0") == RUN and longest < 60

    # Each job's output: its records (2 lines, or 1) and at least one report each.
    assert _value(families["outpost_job_records"], "outpost_job_records_total") >= 2 * RUN + 1
    assert _value(families["outpost_job_reports"], "outpost_job_reports_total") >= RUN + 1

    # Stopping the waiting jobs: they are Stopped (never ran: no duration), the queue is
    # empty and its group still reads 0.
    for job_id in waiting:
        assert hub.api("POST", f"/v1/jobs/{job_id}/stop").status_code == 200
    after = _scrape(hub)
    assert _value(after["outpost_queue_depth"], "outpost_queue_depth", group="nomachines") == 0
    assert _value(after["outpost_jobs"], "outpost_jobs", status="Queued") == 0
    assert _value(after["outpost_jobs_finished"], "outpost_jobs_finished_total",
                  status="Stopped") == 2
    assert not [s for s in after["outpost_job_duration_seconds"].samples
                if s.labels.get("status") == "Stopped"]
