"""Fast tier: leases (HW-1). A claim holds a job under a lease that the machine's heartbeats
renew; the reaper ends an expired one and the job goes back to the queue. The hub's clock is
moved forward (hub_clock) instead of waiting for the lease to run out."""

from __future__ import annotations

from outpost.hub import jobs
from tests.inproc import FAST, Clock, InprocHub

pytestmark = FAST


async def _claimed_on(hub: InprocHub, name: str = "m1") -> tuple[str, str]:
    """A queued no-op job claimed by a new machine ``name`` (its lease is the minimum: the
    machine registered with the default interval is told one of 1 s by its heartbeat).
    The hub's own reaper is stopped: the test's passes are the only ones."""
    await hub.stop_task("reap-leases")
    await hub.runbook()
    machine = await hub.machine(name)
    await machine.heartbeat(interval=1)
    job_id = await hub.start_job()
    assert await machine.claimed() == [job_id]
    return job_id, machine.id


async def test_an_expired_lease_requeues_the_job_for_another_attempt(
        fast_hub_any: InprocHub, hub_clock: Clock) -> None:
    hub = fast_hub_any
    job_id, _ = await _claimed_on(hub)
    reaper = jobs.Reaper(hub.hub.engine)
    await reaper()  # a first pass extends every lease from now (the hub just started)
    assert (await hub.job(job_id))["status"] == "Activating"

    hub_clock.advance(jobs.LEASE_MIN + 1)
    await reaper()
    job = await hub.job(job_id)
    assert (job["status"], job["machine_id"]) == ("Queued", None)
    assert "lease expired" in job["attempts"][0]["reason"]
    assert job["attempts"][0]["ended_at"] is not None

    other = await hub.machine("m2")
    assert await other.claimed() == [job_id]
    job = await hub.job(job_id)
    assert (job["status"], job["attempt"], job["attempts"][1]["machine"]) == (
        "Activating", 2, "m2")


async def test_heartbeats_that_list_the_job_renew_its_lease(
        fast_hub: InprocHub, hub_clock: Clock) -> None:
    job_id, _ = await _claimed_on(fast_hub)
    machine = fast_hub.machines["m1"]
    reaper = jobs.Reaper(fast_hub.hub.engine)
    await reaper()
    for _ in range(4):  # four times the lease, renewed each time before it runs out
        hub_clock.advance(jobs.LEASE_MIN - 1)
        answer = await machine.heartbeat([(job_id, 1)])
        assert answer["abandon"] == []
        await reaper()
        assert (await fast_hub.job(job_id))["status"] == "Activating"
    # Then silence: the lease runs out.
    hub_clock.advance(jobs.LEASE_MIN + 1)
    await reaper()
    assert (await fast_hub.job(job_id))["status"] == "Queued"


async def test_a_heartbeat_for_an_attempt_the_hub_ended_is_told_to_abandon_it(
        fast_hub: InprocHub, hub_clock: Clock) -> None:
    job_id, _ = await _claimed_on(fast_hub)
    machine = fast_hub.machines["m1"]
    reaper = jobs.Reaper(fast_hub.hub.engine)
    await reaper()
    hub_clock.advance(jobs.LEASE_MIN + 1)
    await reaper()
    answer = await machine.heartbeat([(job_id, 1)])
    assert answer["abandon"] == [job_id]
    # Its late end changes nothing: the attempt is over.
    late = await machine.report(job_id, 1, started=True, end={"exit_code": 0})
    assert late.status_code == 200, late.text
    assert (await fast_hub.job(job_id))["status"] == "Queued"


async def test_the_third_failed_activation_suspends_the_job(
        fast_hub: InprocHub, hub_clock: Clock) -> None:
    job_id, _ = await _claimed_on(fast_hub)
    reaper = jobs.Reaper(fast_hub.hub.engine)
    await reaper()
    for attempt in range(1, jobs.MAX_ACTIVATIONS + 1):
        if attempt > 1:
            machine = await fast_hub.machine(f"m{attempt}")
            await machine.heartbeat(interval=1)
            assert await machine.claimed() == [job_id]
        hub_clock.advance(jobs.LEASE_MIN + 1)
        await reaper()
    job = await fast_hub.job(job_id)
    assert (job["status"], job["reason"]) == ("Suspended", jobs.ACTIVATE_FAILED)
    assert len(job["attempts"]) == jobs.MAX_ACTIVATIONS
    assert await fast_hub.machines["m1"].claimed(capacity=4) == []
