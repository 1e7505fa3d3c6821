"""Batch submit (POST /v1/jobs/batch, ``job start --count``): all or none, on both databases."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from outpost.hub import db, jobs, runbooks
from tests.support import SQLITE_ONLY, Agent, Hub, healthy_agent, publish_script, query, wait_until


_publish = publish_script
_healthy_agent = healthy_agent


def _stored(hub: Hub) -> int:
    """How many jobs the hub's database holds."""
    return int(query(hub.database_url, "SELECT COUNT(*) FROM jobs")[0][0])


def _batch(hub: Hub, entries: Any) -> Any:
    return hub.api("POST", "/v1/jobs/batch", json={"jobs": entries})


def test_a_batch_of_200_is_queued_in_order_and_each_job_runs_once(
        hub: Hub, agents: list[Agent], tmp_path: Path, shared: Path) -> None:
    ledger = shared / "ledger"
    ledger.touch()
    os.chmod(ledger, 0o666)  # appended to by every job user
    _publish(hub, tmp_path, "tally", f'echo "$OUTPOST_JOB_ID $n" >> "{ledger}"\n',
             "--param", "n:int")
    for name in ("w1", "w2"):
        _healthy_agent(hub, tmp_path, agents, name, max_concurrent_jobs=4)

    response = _batch(hub, [{"runbook": "tally", "group": "web", "params": {"n": str(i)}}
                            for i in range(200)])
    assert response.status_code == 201, response.text
    views = response.json()["jobs"]
    # In request order, each built as a single submit's answer is, parameters converted.
    assert [v["params"] for v in views] == [{"n": i} for i in range(200)]
    assert all(v["status"] == "Queued" and v["attempts"] == [] and v["runbook_version"] == 1
               and v["group_name"] == "web" for v in views)
    created = [v["created_at"] for v in views]
    assert created == sorted(created) and len(set(created)) == 200  # claims keep the order
    ids = {v["id"]: v["params"]["n"] for v in views}
    assert len(ids) == 200

    def all_done() -> bool:
        found = hub.api("GET", "/v1/jobs?limit=1000").json()
        return len(found) == 200 and all(j["status"] == "Completed" for j in found)

    wait_until(all_done, 120, 0.5, what="200 jobs to complete")
    lines = [line.split() for line in ledger.read_text().splitlines()]
    assert sorted((job_id, int(n)) for job_id, n in lines) == sorted(ids.items())  # once each
    shown = hub.api("GET", f"/v1/jobs/{views[0]['id']}").json()
    assert {k: shown[k] for k in ("id", "params", "created_at", "runbook_name")} == {
        k: views[0][k] for k in ("id", "params", "created_at", "runbook_name")}


def test_a_batch_reads_each_runbook_once_and_inserts_in_one_statement(
        database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """1,000 entries of two runbooks (one also by version): three lookups, one INSERT."""
    lookups: list[tuple[Any, ...]] = []
    real_get = runbooks.get

    async def counted(*args: Any) -> dict[str, Any]:
        lookups.append(args[2:])
        return await real_get(*args)

    monkeypatch.setattr(runbooks, "get", counted)
    inserts: list[int] = []

    async def run() -> list[dict[str, Any]]:
        engine = db.make_engine(database_url)
        try:
            await db.migrate(engine)
            async with engine.begin() as conn:
                await conn.execute(db.accounts.insert().values(
                    id="acct", name="acct", primary_key="-", secondary_key="-",
                    created_at=time.time()))
            for name in ("a", "b"):
                await runbooks.publish(
                    engine, "acct", name, "#!/bin/bash\ntrue\n", kind=None, filename="x.sh",
                    description="", param_specs=["n:int=7"], log_verbose=False,
                    log_progress=False)
            lookups.clear()

            @sa.event.listens_for(engine.sync_engine, "before_cursor_execute")
            def seen(_conn: Any, _cursor: Any, statement: str, params: Any, _ctx: Any,
                     many: bool) -> None:
                if statement.lstrip().upper().startswith("INSERT INTO JOBS"):
                    inserts.append(len(params) if many else 1)

            entries = [{"runbook": ("a", "b", "a")[i % 3], "group": "web",
                        "version": 1 if i % 3 == 2 else None,
                        "params": {"n": i} if i % 2 else {}} for i in range(1000)]
            views = await jobs.start_many(engine, "acct", entries)
            async with engine.connect() as conn:
                stored = await conn.scalar(sa.select(sa.func.count()).select_from(db.jobs))
            assert stored == 1000
            return views
        finally:
            await engine.dispose()

    views = asyncio.run(run())
    assert lookups == [("a", None), ("b", None), ("a", 1)]  # in first-seen order
    assert inserts == [1000]
    assert [v["params"]["n"] for v in views] == [i if i % 2 else 7 for i in range(1000)]
    assert [v["runbook_name"] for v in views[:3]] == ["a", "b", "a"]


def test_a_bad_entry_refuses_the_whole_batch(hub: Hub, tmp_path: Path) -> None:
    _publish(hub, tmp_path, "p", "true\n", "--param", "n:int")
    first = hub.api("POST", "/v1/jobs", json={"runbook": "p", "group": "web",
                                              "params": {"n": 1}})
    assert first.status_code == 201, first.text
    good = {"runbook": "p", "group": "web", "params": {"n": 2}}
    # Each bad entry is refused as a single submit refuses it: same status, same code, the
    # same message after "jobs[7]: ", and details naming the entry.
    for bad in ({"runbook": "p", "group": "web", "params": {"n": "lots"}},  # E4003
                {"runbook": "p", "group": "web"},  # E4004
                {"runbook": "p", "group": "web", "params": {"n": 1, "m": 2}},  # E4003
                {"runbook": "nope", "group": "web"},  # E3002
                {"runbook": "p", "group": "web", "version": 9, "params": {"n": 1}},  # E3002
                {"runbook": "p", "group": "w b", "params": {"n": 1}},  # E3003
                {"runbook": "p", "group": "web", "timeout": 1e9, "params": {"n": 1}},
                {"runbook": "p", "group": "web", "timeout": 0, "params": {"n": 1}}):  # E7051
        single = hub.api("POST", "/v1/jobs", json=bad)
        batch = _batch(hub, [good] * 7 + [bad] + [good] * 4)
        assert single.status_code >= 400 and batch.status_code == single.status_code, bad
        s, b = single.json(), batch.json()
        assert b["code"] == s["code"] and b["fix"] == s["fix"], (bad, b)
        assert b["message"] == f"jobs[7]: {s['message']}", (bad, b)
        assert b["details"]["index"] == 7
    # A NUL in a name: PostgreSQL cannot even look it up; still the single submit's answer.
    nul = {"runbook": "p\u0000", "group": "web"}
    single, batch = hub.api("POST", "/v1/jobs", json=nul), _batch(hub, [good, nul])
    assert batch.status_code == single.status_code < 500
    assert batch.json()["code"] == single.json()["code"]
    # A request-shape error in an entry names it the same way.
    shape = _batch(hub, [good] * 7 + [{"runbook": "p", "group": "web", "version": 0}])
    assert shape.status_code == 422 and shape.json()["code"] == "E3003"
    assert shape.json()["message"].startswith("jobs[7]: The request is not valid: version:")
    # The first bad entry is the one named, whichever check finds it.
    mixed = _batch(hub, [good, {"runbook": "nope", "group": "web"}, {"group": "web"}])
    assert mixed.json()["message"].startswith("jobs[1]: No runbook 'nope'")
    mixed = _batch(hub, [good, {"group": "web"}, {"runbook": "nope", "group": "web"}])
    assert mixed.json()["message"].startswith("jobs[1]: The request is not valid: runbook:")

    assert _stored(hub) == 1  # nothing of any refused batch was queued
    assert len(hub.api("GET", "/v1/jobs").json()) == 1
    done = hub.cli("job", "start", "p", "--group", "web", "--param", "n=lots", "--count", "3")
    assert done.returncode == 2 and "jobs[0]: Parameter 'n'" in done.stderr
    assert "E4003" in done.stderr and "Traceback" not in done.stderr
    assert _stored(hub) == 1
    assert "Traceback" not in hub.log()


# SQLite only: validation of the batch, before anything is queued.
@SQLITE_ONLY
def test_empty_and_oversized_batches_are_refused_with_a_stable_code(hub: Hub,
                                                                    tmp_path: Path) -> None:
    _publish(hub, tmp_path, "noop", "true\n")
    entry = {"runbook": "noop", "group": "web"}
    body: dict[str, Any]
    for body in ({"jobs": []}, {"jobs": [entry] * 1001}, {}, {"jobs": "all"},
                 {"jobs": [1]}):
        response = hub.api("POST", "/v1/jobs/batch", json=body)
        assert response.status_code == 422, (body, response.text)
        answer = response.json()
        assert answer["code"] == "E3003" and answer["reason"] == "invalid_request"
        assert answer["message"].startswith("The request is not valid: body.jobs"), answer
        assert answer["fix"]
    assert _stored(hub) == 0
    # Exactly the limit is taken, in one transaction.
    response = _batch(hub, [entry] * 1000)
    assert response.status_code == 201, response.text
    assert len({v["id"] for v in response.json()["jobs"]}) == 1000
    assert _stored(hub) == 1000
    spec = hub.api("GET", "/openapi.json").json()
    assert "post" in spec["paths"]["/v1/jobs/batch"]
    assert "Traceback" not in hub.log()


def test_job_start_count_waits_for_every_job(hub: Hub, agents: list[Agent],
                                             tmp_path: Path) -> None:
    _publish(hub, tmp_path, "ok", 'echo "hi $OUTPOST_JOB_ID"\n')
    _publish(hub, tmp_path, "bad", "exit 4\n")
    _healthy_agent(hub, tmp_path, agents, max_concurrent_jobs=4)

    done = hub.cli("job", "start", "ok", "--group", "web", "--count", "5", "--wait")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 10, lines  # the ids as queued, then one summary line a job
    ids = lines[:5]
    assert len(set(ids)) == 5
    assert lines[5:] == [f"Job {i} Completed (exit code 0)." for i in ids]

    queued = hub.cli("job", "start", "ok", "--group", "web", "--count", "3")
    assert queued.returncode == 0, queued.stderr
    assert len(set(queued.stdout.split())) == 3

    as_json = hub.cli("job", "start", "ok", "--group", "web", "--count", "2", "--json")
    views = json.loads(as_json.stdout)
    assert [v["status"] for v in views] == ["Queued", "Queued"]

    waited = hub.cli("job", "start", "ok", "--group", "web", "--count", "2", "--wait",
                     "--json")
    assert waited.returncode == 0, waited.stderr
    final = json.loads(waited.stdout)
    assert [j["status"] for j in final] == ["Completed", "Completed"]
    assert all(len(j["attempts"]) == 1 for j in final)

    failed = hub.cli("job", "start", "bad", "--group", "web", "--count", "2", "--wait")
    assert failed.returncode == 1
    assert failed.stdout.count("Failed") == 2

    one = hub.cli("job", "start", "ok", "--group", "web", "--wait")  # as before --count
    assert one.returncode == 0 and len(one.stdout.splitlines()) == 2
    wait_until(lambda: all(j["status"] == ("Failed" if j["runbook_name"] == "bad" else
                                           "Completed") for j in hub.api(
        "GET", "/v1/jobs").json()), 30, 0.2, what="every job to end")
    assert _stored(hub) == 5 + 3 + 2 + 2 + 2 + 1


def test_job_start_count_refuses_follow_and_counts_out_of_range(sqlite_hub: Hub,
                                                                 tmp_path: Path) -> None:
    hub = sqlite_hub
    _publish(hub, tmp_path, "noop", "true\n")
    follow = hub.cli("job", "start", "noop", "--group", "web", "--count", "3", "--follow")
    assert follow.returncode == 2
    message = " ".join(follow.stderr.split())
    assert "--follow shows one job's output" in message and "--wait" in message
    for count in ("0", "1001", "-1"):
        refused = hub.cli("job", "start", "noop", "--group", "web", "--count", count)
        assert refused.returncode == 2 and "--count" in refused.stderr, refused.stderr
    assert "Traceback" not in follow.stderr + refused.stderr
    assert _stored(hub) == 0


def test_a_bad_group_name_says_what_a_good_one_is(hub: Hub, tmp_path: Path) -> None:
    publish_script(hub, tmp_path, "r", "true\n")
    single = hub.api("POST", "/v1/jobs", json={"runbook": "r", "group": "bad group!"})
    assert single.status_code == 422, single.text
    body = single.json()
    assert body["code"] == "E3003" and body["message"] == "Invalid group name 'bad group!'."
    assert body["fix"].startswith("Use 1 to 64 letters, digits")
    batch = hub.api("POST", "/v1/jobs/batch", json={"jobs": [
        {"runbook": "r", "group": "web"}, {"runbook": "r", "group": "-x"}]})
    assert batch.status_code == 422, batch.text
    body = batch.json()
    assert body["message"] == "jobs[1]: Invalid group name '-x'."
    assert body["fix"].startswith("Use 1 to 64 letters, digits")
    assert body["details"] == {"group": "-x", "index": 1}
