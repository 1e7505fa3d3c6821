"""Fast tier: submitting jobs (POST /v1/jobs and /v1/jobs/batch), the hub in this process."""

from __future__ import annotations

import pytest

from tests.inproc import FAST, InprocHub

pytestmark = FAST


async def test_a_submitted_job_is_queued_for_its_group(fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    await hub.runbook("hello", "echo hello")
    job_id = await hub.start_job("hello", "web", params={})
    job = await hub.job(job_id)
    assert (job["status"], job["runbook_name"], job["runbook_version"], job["group_name"],
            job["attempt"], job["machine_id"]) == ("Queued", "hello", 1, "web", 0, None)
    listed = await hub.ok("GET", "/v1/jobs?status=Queued")
    assert [j["id"] for j in listed] == [job_id]


async def test_a_job_for_an_unknown_runbook_is_refused_and_nothing_is_queued(
        fast_hub: InprocHub) -> None:
    response = await fast_hub.api("POST", "/v1/jobs", json={"runbook": "nope", "group": "web"})
    assert response.status_code == 404, response.text
    assert response.json()["code"].startswith("E")
    assert "nope" in response.json()["message"]
    assert await fast_hub.ok("GET", "/v1/jobs") == []


async def test_a_bad_parameter_refuses_the_job(fast_hub: InprocHub) -> None:
    await fast_hub.ok("POST", "/v1/runbooks", json={
        "name": "count", "type": "bash", "content": "echo $N", "params": ["N:int"]})
    response = await fast_hub.api("POST", "/v1/jobs", json={
        "runbook": "count", "group": "web", "params": {"N": "many"}})
    assert response.status_code in (400, 422), response.text
    assert "N" in response.json()["message"]
    assert await fast_hub.ok("GET", "/v1/jobs") == []
    job_id = await fast_hub.start_job("count", params={"N": 3})
    assert (await fast_hub.job(job_id))["params"] == {"N": 3}


async def test_a_batch_is_queued_all_or_none(fast_hub: InprocHub) -> None:
    await fast_hub.runbook()
    bad = await fast_hub.api("POST", "/v1/jobs/batch", json={"jobs": [
        {"runbook": "noop", "group": "web"}, {"runbook": "missing", "group": "web"}]})
    assert bad.status_code == 404, bad.text
    assert await fast_hub.ok("GET", "/v1/jobs") == []
    done = await fast_hub.ok("POST", "/v1/jobs/batch", json={"jobs": [
        {"runbook": "noop", "group": "web"}] * 5})
    assert len({j["id"] for j in done["jobs"]}) == 5
    assert len(await fast_hub.ok("GET", "/v1/jobs?status=Queued")) == 5


async def test_an_operator_needs_a_valid_token(fast_hub: InprocHub) -> None:
    await fast_hub.runbook()
    response = await fast_hub.api("POST", "/v1/jobs", token="not-a-token",
                                  json={"runbook": "noop", "group": "web"})
    assert response.status_code == 401, response.text
    assert await fast_hub.ok("GET", "/v1/jobs") == []


@pytest.mark.parametrize("timeout, seconds", [("90s", 90.0), ("1h30m", 5400.0), (60, 60.0)])
async def test_a_job_timeout_is_kept_in_seconds(fast_hub: InprocHub, timeout: object,
                                                seconds: float) -> None:
    await fast_hub.runbook()
    job_id = await fast_hub.start_job(timeout=timeout)
    assert (await fast_hub.job(job_id))["timeout_seconds"] == seconds
