"""Fast tier: claiming jobs through the long-poll (POST /v1/agent/poll), the hub in this
process and machines that sign their calls with their own keys."""

from __future__ import annotations

import asyncio

from tests.inproc import FAST, InprocHub

pytestmark = FAST


async def test_two_pollers_never_get_the_same_job(fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    await hub.runbook()
    a, b = await hub.machine("a"), await hub.machine("b")
    queued = {await hub.start_job() for _ in range(7)}
    got_a, got_b = await asyncio.gather(a.claimed(capacity=4), b.claimed(capacity=4))
    assert not set(got_a) & set(got_b)
    assert set(got_a) | set(got_b) == queued
    assert sorted((len(got_a), len(got_b))) == [3, 4]
    for job_id in got_a:
        job = await hub.job(job_id)
        assert (job["status"], job["machine_id"], job["attempt"]) == ("Activating", a.id, 1)


async def test_one_job_many_pollers_exactly_one_claim(fast_hub: InprocHub) -> None:
    await fast_hub.runbook()
    pollers = [await fast_hub.machine(f"m{i}") for i in range(6)]
    job_id = await fast_hub.start_job()
    claims = await asyncio.gather(*(m.claimed() for m in pollers))
    assert sorted(len(c) for c in claims) == [0, 0, 0, 0, 0, 1]
    winner = next(m for m, c in zip(pollers, claims, strict=True) if c)
    assert (await fast_hub.job(job_id))["attempts"][0]["machine"] == winner.name


async def test_a_poll_claims_at_most_its_free_capacity(fast_hub: InprocHub) -> None:
    await fast_hub.runbook()
    machine = await fast_hub.machine("m1")
    for _ in range(5):
        await fast_hub.start_job()
    assert await machine.claimed(capacity=0) == []
    first = await machine.claimed(capacity=2)
    assert len(first) == 2
    # The two it holds count against its capacity of 3: one more, not three.
    assert len(await machine.claimed(capacity=3)) == 1
    assert await machine.claimed(capacity=3) == []
    queued = await fast_hub.ok("GET", "/v1/jobs?status=Queued")
    assert len(queued) == 2


async def test_jobs_are_claimed_oldest_first(fast_hub: InprocHub) -> None:
    await fast_hub.runbook()
    machine = await fast_hub.machine("m1")
    order = [await fast_hub.start_job() for _ in range(4)]
    # Each poll has one slot more than the jobs it holds: one claim each time.
    assert [(await machine.claimed(capacity=held + 1))[0] for held in range(4)] == order


async def test_only_machines_of_the_jobs_group_claim_it(fast_hub: InprocHub) -> None:
    await fast_hub.runbook()
    web, db = await fast_hub.machine("w1", "web"), await fast_hub.machine("d1", "db")
    job_id = await fast_hub.start_job(group="db")
    assert await web.claimed(capacity=8) == []
    assert await db.claimed() == [job_id]


async def test_a_waiting_poll_is_answered_when_a_job_is_queued(fast_hub: InprocHub) -> None:
    await fast_hub.runbook()
    machine = await fast_hub.machine("m1")
    waiting = asyncio.create_task(machine.poll(capacity=1, wait=20))
    # Queued once the poll waits: the hub must wake it, not let it sit out its 20 s.
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    began = loop.time()
    job_id = await fast_hub.start_job()
    items = await asyncio.wait_for(waiting, 5)
    assert [i["payload"]["job_id"] for i in items] == [job_id]
    assert loop.time() - began < 2


async def test_an_unsigned_or_badly_signed_poll_is_refused(fast_hub: InprocHub) -> None:
    await fast_hub.runbook()
    machine = await fast_hub.machine("m1")
    job_id = await fast_hub.start_job()
    unsigned = await fast_hub.http.post("/v1/agent/poll?wait=0&capacity=1")
    assert unsigned.status_code == 401, unsigned.text
    from nacl.signing import SigningKey

    real_key, machine.key = machine.key, SigningKey.generate()
    forged = await machine.call("POST", "/v1/agent/poll?wait=0&capacity=1")
    assert forged.status_code == 401, forged.text
    machine.key = real_key
    assert (await fast_hub.job(job_id))["status"] == "Queued"
    assert await machine.claimed() == [job_id]
