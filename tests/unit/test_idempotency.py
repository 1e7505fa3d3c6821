"""Fast tier: requests that create jobs sent again with their Idempotency-Key create nothing
more (hub/idempotency.py), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time

import sqlalchemy as sa

from outpost.hub import idempotency
from outpost.hub.db import idempotency_keys
from tests.inproc import FAST, InprocHub

pytestmark = FAST

JOB = {"runbook": "noop", "group": "web"}


def _key(value: str) -> dict[str, str]:
    return {"Idempotency-Key": value}


async def _queued(hub: InprocHub) -> list[str]:
    return [j["id"] for j in await hub.ok("GET", "/v1/jobs")]


async def test_a_job_start_sent_again_with_its_key_is_answered_with_the_same_job(
        fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    await hub.runbook()
    first = await hub.api("POST", "/v1/jobs", json=JOB, headers=_key("k-1"))
    assert first.status_code == 201, first.text
    assert idempotency.REPLAYED not in first.headers
    again = await hub.api("POST", "/v1/jobs", json=JOB, headers=_key("k-1"))
    assert again.status_code == 201, again.text
    assert again.headers[idempotency.REPLAYED] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["status"] == "Queued"
    assert await _queued(hub) == [first.json()["id"]]
    # Another key, or none, is another request.
    other = await hub.ok("POST", "/v1/jobs", json=JOB, headers=_key("k-2"))
    plain = await hub.ok("POST", "/v1/jobs", json=JOB)
    assert len({first.json()["id"], other["id"], plain["id"]}) == 3
    assert len(await _queued(hub)) == 3


async def test_the_same_key_with_another_body_is_refused_and_creates_nothing(
        fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    await hub.runbook()
    first = await hub.ok("POST", "/v1/jobs", json=JOB, headers=_key("k"))
    refused = await hub.api("POST", "/v1/jobs", json={**JOB, "group": "db"},
                            headers=_key("k"))
    assert refused.status_code == 422, refused.text
    assert refused.json()["code"] == "E3014"
    assert "another request" in refused.json()["message"]
    # And on another route: a key names one request.
    batch = await hub.api("POST", "/v1/jobs/batch", json={"jobs": [JOB]}, headers=_key("k"))
    assert (batch.status_code, batch.json()["code"]) == (422, "E3014")
    assert await _queued(hub) == [first["id"]]


async def test_a_key_that_is_not_one_is_refused(fast_hub: InprocHub) -> None:
    await fast_hub.runbook()
    for bad in ("x" * 256, "tab\there"):
        answer = await fast_hub.api("POST", "/v1/jobs", json=JOB, headers=_key(bad))
        assert (answer.status_code, answer.json()["code"]) == (400, "E3015"), answer.text
    assert await _queued(fast_hub) == []


async def test_a_batch_sent_again_is_answered_with_its_jobs(fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    await hub.runbook()
    body = {"jobs": [JOB] * 3}
    first = await hub.ok("POST", "/v1/jobs/batch", json=body, headers=_key("b"))
    again = await hub.api("POST", "/v1/jobs/batch", json=body, headers=_key("b"))
    assert again.headers[idempotency.REPLAYED] == "true"
    assert [j["id"] for j in again.json()["jobs"]] == [j["id"] for j in first["jobs"]]
    assert len(await _queued(hub)) == 3


async def test_a_job_on_every_machine_sent_again_starts_no_second_one(
        fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    await hub.runbook()
    for name in ("m1", "m2"):
        await hub.machine(name)
    first = await hub.ok("POST", "/v1/fanouts", json=JOB, headers=_key("f"))
    again = await hub.api("POST", "/v1/fanouts", json=JOB, headers=_key("f"))
    assert again.headers[idempotency.REPLAYED] == "true"
    assert again.json()["id"] == first["id"]
    # One parent and its two children, not two of each.
    assert [j["id"] for j in await hub.ok("GET", "/v1/jobs")] == [first["id"]]
    assert again.json()["fanout"]["children"] == 2
    async with hub.hub.engine.connect() as conn:
        children = (await conn.execute(sa.text(
            "SELECT count(*) FROM jobs WHERE parent_id IS NOT NULL"))).scalar()
    assert children == 2


async def test_two_requests_with_one_key_at_once_create_one_job(
        fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    await hub.runbook()
    answers = await asyncio.gather(*(
        hub.api("POST", "/v1/jobs", json=JOB, headers=_key("race")) for _ in range(4)))
    assert {a.status_code for a in answers} == {201}, [a.text for a in answers]
    ids = {a.json()["id"] for a in answers}
    assert len(ids) == 1
    assert await _queued(hub) == list(ids)
    assert sum(a.headers.get(idempotency.REPLAYED) == "true" for a in answers) == 3


async def test_keys_are_per_account(fast_hub: InprocHub) -> None:
    hub = fast_hub
    await hub.runbook()
    other = await hub.ok("POST", "/v1/accounts", json={"name": "second"})
    await hub.api("POST", "/v1/runbooks", token=other["token"],
                  json={"name": "noop", "type": "bash", "content": "true"})
    mine = await hub.ok("POST", "/v1/jobs", json=JOB, headers=_key("shared"))
    theirs = await hub.api("POST", "/v1/jobs", json=JOB, headers=_key("shared"),
                           token=other["token"])
    assert theirs.status_code == 201, theirs.text
    assert idempotency.REPLAYED not in theirs.headers
    assert theirs.json()["id"] != mine["id"]


async def test_a_key_is_kept_a_day_then_pruned_and_free_again(fast_hub: InprocHub) -> None:
    hub = fast_hub
    await hub.runbook()
    first = await hub.ok("POST", "/v1/jobs", json=JOB, headers=_key("old"))
    engine = hub.hub.engine
    async with engine.begin() as conn:
        await conn.execute(sa.update(idempotency_keys).values(
            created_at=time.time() - idempotency.TTL - 1))
    # Past its time the key names a new request (even before the prune removes its row).
    fresh = await hub.ok("POST", "/v1/jobs", json=JOB, headers=_key("old"))
    assert fresh["id"] != first["id"]
    async with engine.begin() as conn:
        await conn.execute(sa.update(idempotency_keys).values(
            created_at=time.time() - idempotency.TTL - 1))
    assert await idempotency.prune(engine) == 1
    async with engine.connect() as conn:
        assert (await conn.execute(sa.select(sa.func.count()).select_from(
            idempotency_keys))).scalar() == 0
