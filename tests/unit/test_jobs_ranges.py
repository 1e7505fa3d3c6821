"""Fast tier: numbers out of range and NUL in text are bad input with the field named, on
both databases: a number the database cannot hold or JSON cannot carry (2**70, NaN,
Infinity) answered 500, and NUL was refused by PostgreSQL but stored by SQLite. The hub runs
in this process; the machine signs its calls with its own key."""

from __future__ import annotations

import json
from typing import Any

from outpost import __version__
from tests.inproc import FAST, InprocHub, Machine

pytestmark = FAST

BIG = 2**70


async def _refused(call: Machine, method: str, path: str, payload: Any) -> dict[str, Any]:
    refused = await call.call(method, path, payload)
    assert refused.status_code == 422, (path, refused.status_code, refused.text)
    body: dict[str, Any] = refused.json()
    assert body["code"] == "E3003" and body["fix"], body
    return body


async def _claimed_job(hub: InprocHub) -> tuple[Machine, str]:
    """A no-op job queued and claimed by a new machine m1 (as support.claimed_job)."""
    await hub.runbook("noop", "true")
    call = await hub.machine("m1")
    job_id = await hub.start_job()
    assert await call.claimed() == [job_id]
    return call, job_id


def _beat(**fields: Any) -> bytes:
    # Written by hand: json.dumps would not write NaN the way a careless client does.
    parts = [f'"agent_version": "{__version__}"'] + [f'"{k}": {v}' for k, v in fields.items()]
    return ("{" + ", ".join(parts) + "}").encode()


async def test_out_of_range_numbers_name_their_field(fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    call, job_id = await _claimed_job(hub)
    report = f"/v1/agent/jobs/{job_id}/report"

    for value in ("NaN", "Infinity", "-Infinity", "-1", "0", "1e999"):
        body = await _refused(call, "POST", "/v1/agent/heartbeat", _beat(heartbeat_interval=value))
        assert "heartbeat_interval" in body["message"], (value, body)
    body = await _refused(call, "POST", "/v1/agent/heartbeat",
                    _beat(jobs=json.dumps([{"id": job_id, "attempt": BIG}])))
    assert "jobs.0.attempt" in body["message"], body
    body = await _refused(call, "POST", "/v1/agent/heartbeat", _beat(running_jobs=BIG))
    assert "running_jobs" in body["message"], body

    body = await _refused(call, "POST", report, {"attempt": BIG})
    assert "attempt" in body["message"], body
    body = await _refused(call, "POST", report, {"attempt": 1, "end": {"exit_code": BIG}})
    assert "end.exit_code" in body["message"], body
    body = await _refused(call, "POST", report, {"attempt": 1, "end": {"exit_code": 0,
                                                                 "signal": -BIG}})
    assert "end.signal" in body["message"], body
    for at in ("nan", "inf", -1, "soon"):
        record = {"seq": 0, "stream": "Output", "text": "x", "at": at}
        body = await _refused(call, "POST", report, {"attempt": 1, "records": [record]})
        assert "records[0].at" in body["message"], (at, body)
    # In a batch a bad record refuses only its own report, naming the field too.
    answer = await call.ok("POST", "/v1/agent/reports", {"reports": [
        {"job_id": job_id, "attempt": 1, "records": [
            {"seq": 0, "stream": "Output", "text": "fine", "at": 1.0},
            {"seq": 1, "stream": "Output", "text": "x", "at": "nan"}]}]})
    error = answer["results"][0]["error"]
    assert error["code"] == "E3003" and "records[1].at" in error["message"], answer
    body = await _refused(call, "POST", "/v1/agent/reports", {"reports": [
        {"job_id": job_id, "attempt": BIG}]})
    assert "reports.0.attempt" in body["message"], body

    # The job is untouched by all of that, and the hub still answers its operators.
    shown = await hub.api("GET", f"/v1/jobs/{job_id}")
    assert shown.status_code == 200 and shown.json()["status"] == "Activating", shown.text

    for payload, field in (({"runbook": "noop", "group": "web", "version": BIG},
                             "version"),
                           ({"runbook": "noop", "group": "web", "timeout": 1e300},
                            "timeout")):
        answer = await hub.api("POST", "/v1/jobs", json=payload)
        assert answer.status_code == 422, answer.text
        assert field in answer.json()["message"].lower(), answer.text
    raw = b'{"runbook": "noop", "group": "web", "timeout": Infinity}'
    answer = await hub.api("POST", "/v1/jobs", content=raw,
                           headers={"Content-Type": "application/json"})
    assert answer.status_code == 422 and "timeout" in answer.json()["message"], answer.text
    raw = b'{"runbook": "noop", "group": "web", "params": {"n": NaN}}'
    answer = await hub.api("POST", "/v1/jobs", content=raw,
                           headers={"Content-Type": "application/json"})
    assert answer.status_code == 422 and "body.params.n" in answer.json()["message"], \
        answer.text
    for path, field in ((f"/v1/jobs/{job_id}/output?after={BIG}", "after"),
                        (f"/v1/runbooks/noop?version={BIG}", "version")):
        answer = await hub.api("GET", path)
        assert answer.status_code == 422 and field in answer.json()["message"], answer.text
    assert (await hub.api("GET", "/v1/jobs")).status_code == 200


async def test_nul_in_text_is_refused_on_both_databases(fast_hub_any: InprocHub) -> None:
    """One rule on SQLite and PostgreSQL: 422 naming the field. A runbook's output is the
    exception: it is kept, with U+FFFD for each NUL, since refusing it would lose it."""
    hub = fast_hub_any
    for method, path, payload, field in (
            ("POST", "/v1/runbooks", {"name": "n", "type": "sh", "content": "a\x00b"},
             "body.content"),
            ("POST", "/v1/accounts", {"name": "a\x00b"}, "body.name"),
            ("PUT", "/v1/assets/variables/v", {"value": "x\x00"}, "body.value"),
            ("POST", "/v1/jobs", {"runbook": "n", "group": "web",
                                  "params": {"deep": ["ok", {"k": "\x00"}]}},
             "body.params.deep.1.k"),
            ("POST", "/v1/jobs", {"runbook": "n", "group": "web",
                                  "params": {"ke\x00y": 1}}, "body.params.ke")):
        answer = await hub.api(method, path, json=payload)
        assert answer.status_code == 422, (path, answer.text)
        body = answer.json()
        assert body["code"] == "E3003" and "NUL" in body["message"], body
        assert body["message"].startswith(field), (field, body)
        assert body["fix"], body
    for path, field in (("/v1/machines/a%00b", "path"),
                        ("/v1/jobs?status=a%00b", "query.status")):
        answer = await hub.api("GET", path)
        assert answer.status_code == 422, (path, answer.text)
        assert answer.json()["message"].startswith(field), answer.text
    assert [r["name"] for r in await hub.ok("GET", "/v1/runbooks")] == []
    assert await hub.ok("GET", "/v1/assets") == []

    call, job_id = await _claimed_job(hub)
    answer = await call.ok("POST", f"/v1/agent/jobs/{job_id}/report", {"attempt": 1, "records": [
        {"seq": 0, "stream": "Output", "text": "a\x00b", "at": 1.0}]})
    assert answer["status"] == "Activating", answer
    output = await hub.output(job_id)
    assert [r["text"] for r in output] == ["a\ufffdb"], output
    # NUL anywhere else in a report is refused like any other field.
    body = await _refused(call, "POST", f"/v1/agent/jobs/{job_id}/report",
                    {"attempt": 1, "end": {"exit_code": 0, "reason": "a\x00"}})
    assert body["message"].startswith("body.end.reason"), body
