"""Fast tier: POST /v1/agent/reports, many attempts' reports in one signed request, and the
claim of the freed slots in its answer. The hub runs in this process on both databases; the
machine is registered for real and its requests are signed with its own key (no agent
daemon, so the test decides exactly what is reported)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.inproc import FAST, InprocHub, Machine

pytestmark = FAST


def _record(seq: int, text: str, stream: str = "Output") -> dict[str, Any]:
    return {"seq": seq, "stream": stream, "text": text, "at": 1.0}


async def _setup(hub: InprocHub, jobs: int) -> tuple[Machine, list[str]]:
    await hub.runbook("noop", "true\n")
    machine = await hub.machine("m1")
    return machine, [await hub.start_job() for _ in range(jobs)]


async def test_reports_in_one_request_and_the_freed_slot_claimed_in_the_answer(
        fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    call, (first, second, third) = await _setup(hub, 3)

    claimed = await call.poll(capacity=2)
    assert [i["payload"]["job_id"] for i in claimed] == [first, second]
    assert all(i["payload"]["job_token"] for i in claimed)

    batch = {"claim": 2, "reports": [
        {"job_id": first, "attempt": 1, "started": True,
         "records": [_record(0, "one"), _record(1, "two", "Error")],
         "end": {"exit_code": 0, "signal": None, "reason": "exit code 0", "cause": "exit"}},
        {"job_id": second, "attempt": 1, "started": True, "records": [_record(0, "half")]},
        {"job_id": "no-such-job", "attempt": 1, "records": []},
        {"job_id": second, "attempt": 1, "records": [_record(1, "bad", "Nope")]},
    ]}
    answer = await call.ok("POST", "/v1/agent/reports", batch)
    results = answer["results"]
    assert results[0] == {"id": first, "status": "Completed"}
    assert results[1] == {"id": second, "status": "Running"}
    # A refused report refuses only itself, with the code the one-job endpoint gives.
    assert results[2]["error"]["reason"] == "not_found"
    assert "no-such-job" in results[2]["error"]["message"]
    assert results[3]["error"]["reason"] == "invalid_request"
    assert "Nope" in results[3]["error"]["message"]
    # One slot freed (the second job still holds the other): the third job comes back in
    # the answer, with its token, as a long-poll answer would bring it.
    assert [i["payload"]["job_id"] for i in answer["items"]] == [third]
    assert answer["items"][0]["payload"]["job_token"]

    # The same batch again (an answer lost on the way): nothing is kept twice, nothing
    # changes, and nothing more is claimed.
    again = await call.ok("POST", "/v1/agent/reports", batch)
    assert again["results"][0] == {"id": first, "status": "Completed"}
    assert again["items"] == []
    output = await hub.output(first)
    assert [(r["seq"], r["stream"], r["text"]) for r in output] == [
        (0, "Output", "one"), (1, "Error", "two")]
    assert [r["text"] for r in await hub.output(second)] == ["half"]

    shown = await hub.job(first)
    assert shown["status"] == "Completed" and shown["started_at"] is not None
    assert [(a["number"], a["reason"]) for a in shown["attempts"]] == [(1, "exit code 0")]

    # Without a claim (an agent under pressure asks for none), an end claims nothing.
    for job_id in (second, third):
        done = await call.ok("POST", "/v1/agent/reports", {"claim": 0, "reports": [
            {"job_id": job_id, "attempt": 1, "started": True,
             "end": {"exit_code": 3, "reason": "exit code 3"}}]})
        assert done["results"] == [{"id": job_id, "status": "Failed"}]
        assert done["items"] == []


async def test_a_killed_sandbox_in_a_batch_is_a_failed_activation(
        fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    call, (killed, fine) = await _setup(hub, 2)
    await call.poll(capacity=2)
    answer = await call.ok("POST", "/v1/agent/reports", {"claim": 1, "reports": [
        {"job_id": killed, "attempt": 1, "started": True,
         "end": {"exit_code": None, "signal": 9, "cause": "killed",
                 "reason": "the runbook's process was killed by SIGKILL, not by the agent"}},
        {"job_id": fine, "attempt": 1, "started": True,
         "end": {"exit_code": 0, "reason": "exit code 0"}}]})
    assert answer["results"] == [{"id": killed, "status": "Queued"},
                                 {"id": fine, "status": "Completed"}]
    # The failed activation went back to the queue, and the freed slot took it again.
    assert [(i["payload"]["job_id"], i["payload"]["attempt"]) for i in answer["items"]] == [
        (killed, 2)]
    shown = await hub.job(killed)
    # (a claim counts an activation: the failed one, and the one under way)
    assert shown["activations"] == 2 and shown["status"] == "Activating"
    assert shown["attempts"][0]["signal"] == 9


@pytest.mark.parametrize("body, what", [
    ({"reports": []}, "reports"),
    ({"reports": [{"job_id": "j", "attempt": 1}] * 257}, "reports"),
    ({"reports": [{"job_id": "j", "attempt": 0}]}, "attempt"),
    ({"claim": -1, "reports": [{"job_id": "j", "attempt": 1}]}, "claim"),
    ({"reports": "all of them"}, "reports"),
])
async def test_a_malformed_batch_is_refused_whole_and_clearly(
        fast_hub: InprocHub, body: dict[str, Any], what: str) -> None:
    machine = await fast_hub.machine("m1")
    refused = await machine.call("POST", "/v1/agent/reports", body)
    assert refused.status_code == 422, refused.text
    assert what in json.dumps(refused.json())
    assert "Traceback" not in refused.text
