"""Fast tier: stopping, suspending and resuming a job that no machine holds yet."""

from __future__ import annotations

from tests.inproc import FAST, InprocHub

pytestmark = FAST


async def test_a_queued_job_that_is_stopped_is_never_claimed(fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    await hub.runbook()
    machine = await hub.machine("m1")
    job_id = await hub.start_job()
    stopped = await hub.ok("POST", f"/v1/jobs/{job_id}/stop")
    assert (stopped["status"], stopped["reason"]) == ("Stopped", "stopped by the operator")
    assert stopped["ended_at"] is not None
    assert await machine.claimed(capacity=4) == []
    again = await hub.api("POST", f"/v1/jobs/{job_id}/stop")
    assert again.status_code == 409, again.text
    assert "Stopped" in again.json()["message"]


async def test_a_suspended_queued_job_waits_until_it_is_resumed(fast_hub: InprocHub) -> None:
    await fast_hub.runbook()
    machine = await fast_hub.machine("m1")
    job_id = await fast_hub.start_job()
    assert (await fast_hub.ok("POST", f"/v1/jobs/{job_id[:8]}/suspend"))["status"] == \
        "Suspended"
    assert await machine.claimed(capacity=4) == []
    assert (await fast_hub.ok("POST", f"/v1/jobs/{job_id}/resume"))["status"] == "Queued"
    assert await machine.claimed() == [job_id]


async def test_a_suspended_job_can_be_stopped(fast_hub: InprocHub) -> None:
    await fast_hub.runbook()
    job_id = await fast_hub.start_job()
    await fast_hub.ok("POST", f"/v1/jobs/{job_id}/suspend")
    assert (await fast_hub.ok("POST", f"/v1/jobs/{job_id}/stop"))["status"] == "Stopped"
    refused = await fast_hub.api("POST", f"/v1/jobs/{job_id}/resume")
    assert refused.status_code == 409, refused.text


async def test_resuming_a_queued_job_is_refused(fast_hub: InprocHub) -> None:
    await fast_hub.runbook()
    job_id = await fast_hub.start_job()
    refused = await fast_hub.api("POST", f"/v1/jobs/{job_id}/resume")
    assert refused.status_code == 409, refused.text
    assert "Queued" in refused.json()["message"]
    assert (await fast_hub.job(job_id))["status"] == "Queued"


async def test_stopping_a_claimed_job_tells_its_machine(fast_hub: InprocHub) -> None:
    await fast_hub.runbook()
    machine = await fast_hub.machine("m1")
    job_id = await fast_hub.start_job()
    assert await machine.claimed() == [job_id]
    assert (await fast_hub.ok("POST", f"/v1/jobs/{job_id}/stop"))["status"] == "Stopping"
    items = await machine.poll(capacity=1)
    assert [(i["kind"], i["payload"]["job_id"], i["payload"]["action"]) for i in items] == [
        ("job_control", job_id, "stop")]
    ended = await machine.report(job_id, started=True, end={"exit_code": None, "signal": 15,
                                                            "cause": "stopped"})
    assert ended.json()["status"] == "Stopped"
