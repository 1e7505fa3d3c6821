"""Fast tier: what a machine reports of an attempt (POST /v1/agent/jobs/ID/report and
/v1/agent/reports): its start, its output records in order, its end; and that a report sent
twice changes nothing the second time."""

from __future__ import annotations

import time
from typing import Any

from tests.inproc import FAST, InprocHub, Machine

pytestmark = FAST


def records(first: int, *texts: str, stream: str = "Output") -> list[dict[str, Any]]:
    return [{"seq": first + i, "stream": stream, "text": text, "at": time.time()}
            for i, text in enumerate(texts)]


async def _claimed(hub: InprocHub) -> tuple[str, Machine]:
    await hub.runbook()
    machine = await hub.machine("m1")
    job_id = await hub.start_job()
    assert await machine.claimed() == [job_id]
    return job_id, machine


async def test_a_started_report_makes_the_job_running(fast_hub_any: InprocHub) -> None:
    job_id, machine = await _claimed(fast_hub_any)
    answer = await machine.report(job_id, started=True)
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "Running"
    job = await fast_hub_any.job(job_id)
    assert job["status"] == "Running" and job["started_at"] is not None


async def test_records_are_kept_in_order_across_reports(fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    job_id, machine = await _claimed(hub)
    assert (await machine.report(job_id, started=True, records=records(0, "a", "b"))).is_success
    assert (await machine.report(job_id, records=records(2, "c") + records(
        3, "careful", stream="Warning"))).is_success
    out = await hub.output(job_id)
    assert [(r["seq"], r["stream"], r["text"]) for r in out] == [
        (0, "Output", "a"), (1, "Output", "b"), (2, "Output", "c"), (3, "Warning", "careful")]
    after = await hub.ok("GET", f"/v1/jobs/{job_id}/output?after=1")
    assert [r["text"] for r in after] == ["c", "careful"]


async def test_the_end_of_the_attempt_ends_the_job(fast_hub: InprocHub) -> None:
    await fast_hub.runbook()
    machine = await fast_hub.machine("m1")
    ok_id, bad_id = await fast_hub.start_job(), await fast_hub.start_job()
    assert set(await machine.claimed(capacity=2)) == {ok_id, bad_id}
    done = await machine.report(ok_id, started=True, records=records(0, "fine"),
                                end={"exit_code": 0})
    assert done.json()["status"] == "Completed"
    failed = await machine.report(bad_id, started=True, end={"exit_code": 3})
    assert failed.json()["status"] == "Failed"
    ok_job, bad_job = await fast_hub.job(ok_id), await fast_hub.job(bad_id)
    assert (ok_job["status"], ok_job["exit_code"]) == ("Completed", 0)
    assert (bad_job["status"], bad_job["exit_code"]) == ("Failed", 3)
    assert ok_job["ended_at"] >= ok_job["started_at"]
    assert bad_job["attempts"][0]["exit_code"] == 3
    # Both slots are free again: the machine claims the next job.
    next_id = await fast_hub.start_job()
    assert await machine.claimed(capacity=1) == [next_id]


async def test_a_report_sent_twice_changes_nothing_the_second_time(
        fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    job_id, machine = await _claimed(hub)
    first = await machine.report(job_id, started=True, records=records(0, "x", "y"),
                                 end={"exit_code": 0})
    before = await hub.job(job_id)
    again = await machine.report(job_id, started=True, records=records(0, "x", "y"),
                                 end={"exit_code": 7})
    assert first.status_code == again.status_code == 200
    assert again.json()["status"] == "Completed"
    after = await hub.job(job_id)
    assert after == before
    assert [r["text"] for r in await hub.output(job_id)] == ["x", "y"]


async def test_reports_in_one_batch_and_the_freed_slot_claims_again(
        fast_hub: InprocHub) -> None:
    await fast_hub.runbook()
    machine = await fast_hub.machine("m1")
    first, second = await fast_hub.start_job(), await fast_hub.start_job()
    assert await machine.claimed(capacity=1) == [first]
    answer = await machine.ok("POST", "/v1/agent/reports", {"claim": 1, "reports": [
        {"job_id": first, "attempt": 1, "started": True, "records": records(0, "one"),
         "end": {"exit_code": 0}}]})
    assert answer["results"] == [{"id": first, "status": "Completed"}]
    assert [i["payload"]["job_id"] for i in answer["items"]] == [second]
    assert (await fast_hub.job(second))["status"] == "Activating"


async def test_another_machine_cannot_report_on_a_job_it_does_not_hold(
        fast_hub: InprocHub) -> None:
    job_id, _ = await _claimed(fast_hub)
    intruder = await fast_hub.machine("m2")
    refused = await intruder.report(job_id, started=True, records=records(0, "fake"),
                                    end={"exit_code": 0})
    assert refused.status_code in (404, 409), refused.text
    assert refused.json()["code"].startswith("E")
    job = await fast_hub.job(job_id)
    assert job["status"] == "Activating"
    assert await fast_hub.output(job_id) == []


async def test_a_malformed_record_is_refused_with_its_place(fast_hub: InprocHub) -> None:
    job_id, machine = await _claimed(fast_hub)
    bad = await machine.report(job_id, records=[*records(0, "ok"),
                                                {"seq": 1, "stream": "Output"}])
    assert bad.status_code == 422 or bad.status_code == 400, bad.text
    assert "records[1]" in bad.json()["message"]
    assert await fast_hub.output(job_id) == []
