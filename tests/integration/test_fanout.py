"""A job on every machine of a group (``job start --all``): real agents, both databases."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from outpost.hub import db, fanout, jobs, runbooks
from tests.support import SQLITE_ONLY, Agent, Hub, healthy_agent, publish_script, wait_until

# Waits for its go file (so the test can look before any child runs), stamps its start and
# end (with pair=yes, the first waits until a second has started, so two are seen side by
# side whenever the limit lets them), holds on when asked, and fails where the test left a
# fail file for its job id.
RUNBOOK = """\
for i in $(seq 1 1200); do [ -e "{shared}/go-$tag" ] && break; sleep 0.05; done
echo "start $OUTPOST_JOB_ID $(date +%s.%N)" >> "{shared}/ledger-$tag"
sleep 0.3
if [ "$pair" = yes ]; then
  for i in $(seq 1 600); do
    n=0
    while read -r kind rest; do [ "$kind" = start ] && n=$((n + 1)); done \
      < "{shared}/ledger-$tag"
    [ "$n" -ge 2 ] && break; sleep 0.05
  done
fi
if [ "$hold" = yes ]; then for i in $(seq 1 1200); do sleep 0.05; done; fi
echo "end $OUTPOST_JOB_ID $(date +%s.%N)" >> "{shared}/ledger-$tag"
if [ -e "{shared}/fail-$OUTPOST_JOB_ID" ]; then exit 3; fi
"""
NAMES = ("w1", "w2", "w3", "w4", "w5")


def _ledger(shared: Path, tag: str) -> Path:
    path = shared / f"ledger-{tag}"
    path.touch()
    os.chmod(path, 0o666)  # appended to by every job user
    return path


def _events(path: Path) -> list[tuple[float, str, str]]:
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return sorted((float(at), kind, job) for kind, job, at in rows)


def _most_at_once(events: list[tuple[float, str, str]]) -> int:
    running, most = 0, 0
    for _, kind, _ in events:
        running += 1 if kind == "start" else -1
        most = max(most, running)
    return most


def _start(hub: Hub, tag: str, *options: str) -> dict[str, Any]:
    done = hub.cli("job", "start", "fleet", "--group", "web", "--all", "--param",
                   f"tag={tag}", *options, "--json")
    assert done.returncode == 0, done.stderr
    parent: dict[str, Any] = json.loads(done.stdout)
    parent["stderr"] = done.stderr
    return parent


def _show(hub: Hub, job_id: str) -> dict[str, Any]:
    done = hub.cli("job", "show", job_id, "--json")
    assert done.returncode == 0, done.stderr
    shown: dict[str, Any] = json.loads(done.stdout)
    return shown


def _api_status(hub: Hub, job_id: str) -> str:
    """The job's status from GET /v1/jobs/ID, which ``job show --json`` prints: the waits
    ask the API (a command each 0.2 s would cost a Python process each time)."""
    answer = hub.api("GET", f"/v1/jobs/{job_id}")
    assert answer.status_code == 200, answer.text
    return str(answer.json()["status"])


def _ended(hub: Hub, job_id: str) -> dict[str, Any]:
    final = ("Completed", "Failed", "Stopped")
    wait_until(lambda: _api_status(hub, job_id) in final, 180, 0.2,
               what=f"job {job_id} to end")
    return _show(hub, job_id)


# Four runs of a job on five real agents: longer than one job's test on a busy machine.
@pytest.mark.timeout(400)
def test_every_machine_runs_it_once_at_most_n_at_a_time_and_stops_as_told(
        hub: Hub, agents: list[Agent], tmp_path: Path, shared: Path) -> None:
    publish_script(hub, tmp_path, "fleet", RUNBOOK.format(shared=shared),
                   "--param", "tag", "--param", "hold=no", "--param", "pair=no")
    for name in NAMES:
        healthy_agent(hub, tmp_path, agents, name, max_concurrent_jobs=4)

    # --- five machines, two at a time, the third one fails -------------------------------
    ledger = _ledger(shared, "a")
    parent = _start(hub, "a", "--max-concurrency", "2", "--param", "pair=yes")
    fan = parent["fanout"]
    assert parent["status"] == "Running" and parent["machine_id"] is None
    assert (fan["children"], fan["max_concurrency"], fan["concurrency_given"]) == (5, 2, "2")
    assert fan["max_errors"] is None and fan["errors_given"] is None
    assert [c["machine"] for c in fan["breakdown"]] == list(NAMES)
    assert [c["status"] for c in fan["breakdown"]] == ["Queued"] * 2 + ["New"] * 3
    child = {c["machine"]: c["job_id"] for c in fan["breakdown"]}
    (shared / f"fail-{child['w3']}").touch()
    (shared / "go-a").touch()

    done = _ended(hub, parent["id"])
    fan = done["fanout"]
    assert done["status"] == "Failed", done
    assert fan["counts"] == {"Completed": 4, "Failed": 1}
    by_machine = {c["machine"]: c for c in fan["breakdown"]}
    assert by_machine["w3"]["status"] == "Failed" and by_machine["w3"]["exit_code"] == 3
    assert all(by_machine[n]["exit_code"] == 0 and by_machine[n]["ended_at"]
               for n in NAMES if n != "w3")
    assert done["reason"] == "5 children: 4 Completed, 1 Failed"
    events = _events(ledger)
    assert sorted(job for _, kind, job in events if kind == "start") == sorted(child.values())
    assert _most_at_once(events) == 2, events  # never three, and two did run side by side
    for name, job_id in child.items():  # each on its own machine, once
        shown = _show(hub, job_id)
        assert shown["parent_id"] == parent["id"]
        assert [a["machine"] for a in shown["attempts"]] == [name]

    # job list: the parent once, with its aggregate status; no child.
    listed = json.loads(hub.cli("job", "list", "--json").stdout)
    assert [(j["id"], j["status"]) for j in listed] == [(parent["id"], "Failed")]
    text = hub.cli("job", "show", parent["id"][:8])
    assert text.returncode == 0, text.stderr
    assert "at most 2 at a time" in text.stdout and "4 Completed, 1 Failed" in text.stdout
    assert all(name in text.stdout for name in NAMES)

    # --- one at a time, no failure may pass: the first failure stops the dispatch --------
    _ledger(shared, "b")
    parent = _start(hub, "b", "--max-concurrency", "20%", "--max-errors", "0")
    fan = parent["fanout"]
    assert (fan["max_concurrency"], fan["max_errors"], fan["errors_given"]) == (1, 0, "0")
    first = fan["breakdown"][0]["job_id"]
    (shared / f"fail-{first}").touch()
    (shared / "go-b").touch()
    done = _ended(hub, parent["id"])
    fan = done["fanout"]
    assert done["status"] == "Failed"
    assert fan["counts"] == {"Failed": 1, "Stopped": 4}
    assert fan["halted"] == "1 children failed, more than --max-errors 0 lets pass (0)"
    assert all(c["reason"] == f"not started: {fan['halted']}" and c["started_at"] is None
               for c in fan["breakdown"][1:])
    assert len(_events(shared / "ledger-b")) == 2  # only the first ran

    # --- one machine lost (Unresponsive), one stopped: stop the parent mid-run ------------
    agents[4].stop(signal.SIGKILL)  # w5
    # w4: its agent says it is stopping (a graceful stop: killed after 10 s, it could not)
    assert agents[3].stop() == 0, agents[3].log()[-3000:]
    wait_until(lambda: hub.machines()["w5"]["status"] == "Unresponsive", 30,
               what="w5 Unresponsive")
    wait_until(lambda: hub.machines()["w4"]["status"] == "Stopped", 30,
               what=f"w4 Stopped\n{agents[3].log()[-3000:]}")
    _ledger(shared, "c")
    (shared / "go-c").touch()
    parent = _start(hub, "c", "--max-concurrency", "1", "--param", "hold=yes")
    fan = parent["fanout"]
    assert [c["machine"] for c in fan["breakdown"]] == ["w1", "w2", "w3", "w5"]
    assert fan["breakdown"][3]["status"] == "Stopped"
    assert fan["breakdown"][3]["reason"] == \
        "not started: machine w5 was Unresponsive at submission"
    assert "left out (Stopped: their agents said they were stopping): w4" in parent["stderr"]
    assert "machine w5 was Unresponsive at submission" in parent["stderr"]
    running = fan["breakdown"][0]["job_id"]
    wait_until(lambda: _api_status(hub, running) == "Running", 30, 0.2,
               what="w1's child runs")

    suspend = hub.cli("job", "suspend", parent["id"])
    assert suspend.returncode == 1 and "E8124" in suspend.stderr, suspend.stderr
    stopped = hub.cli("job", "stop", parent["id"], "--json")
    assert stopped.returncode == 0, stopped.stderr
    assert json.loads(stopped.stdout)["status"] in ("Stopping", "Stopped")
    done = _ended(hub, parent["id"])
    fan = done["fanout"]
    assert done["status"] == "Stopped"
    assert fan["counts"] == {"Stopped": 4}
    states = {c["machine"]: (c["status"], c["reason"]) for c in fan["breakdown"]}
    assert states["w2"] == ("Stopped", "not started: the operator stopped its parent job")
    assert states["w1"][0] == "Stopped" and _show(hub, running)["attempts"][0]["ended_at"]
    assert [kind for _, kind, _ in _events(shared / "ledger-c")] == ["start"]  # w1's only
    again = hub.cli("job", "stop", parent["id"])
    assert again.returncode == 1 and "E4009" in again.stderr, again.stderr

    # --- --wait: the parent's end; exit 1 since w5's child did not run -------------------
    _ledger(shared, "d")
    (shared / "go-d").touch()
    waited = hub.cli("job", "start", "fleet", "--group", "web", "--all", "--param", "tag=d",
                     "--wait")
    assert waited.returncode == 1, waited.stderr
    parent_id, line = waited.stdout.strip().splitlines()
    assert line == (f"Job {parent_id} Failed (4 children: 3 Completed, 1 Stopped).")


# SQLite only: the CLI's validation of the options, before anything is queued.
@SQLITE_ONLY
def test_bad_options_are_refused_with_their_codes(hub: Hub, tmp_path: Path) -> None:
    publish_script(hub, tmp_path, "fleet", "true\n")
    cases = [
        (("--all",), 2, "E8120", "--all runs the job on every machine of a group"),
        (("--group", "web", "--max-concurrency", "2"), 2, "E8120", "add --all"),
        (("--group", "web", "--all", "--count", "3"), 2, "E8120", "--count does not apply"),
        (("--group", "web", "--all", "--max-concurrency", "0"), 2, "E8121",
         "The value '0' of --max-concurrency is not valid"),
        (("--group", "web", "--all", "--max-concurrency", "101%"), 2, "E8121", "101%"),
        (("--group", "web", "--all", "--max-errors", "0%"), 2, "E8121", "--max-errors"),
        (("--group", "web", "--all", "--max-errors", "-1"), 2, "E8121", "--max-errors"),
        (("--group", "nobody", "--all"), 2, "E8122",
         "No machine is registered in group 'nobody'"),
    ]
    for args, code, error, text in cases:
        done = hub.cli("job", "start", "fleet", *args)
        assert done.returncode == code, (args, done.stderr)
        assert error in done.stderr and text in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
    # Nothing was stored by any of them.
    assert hub.api("GET", "/v1/jobs").json() == []
    answer = hub.api("POST", "/v1/fanouts", json={"runbook": "fleet", "group": "web",
                                                  "max_concurrency": "ten"})
    assert answer.status_code == 422 and answer.json()["code"] == "E8121", answer.text


def test_children_that_end_at_once_release_each_slot_once_and_settle_the_parent(
        database_url: str) -> None:
    """12 machines, 6 at a time; each round's 6 children end in 6 transactions at once (on
    PostgreSQL, in parallel): exactly the 6 held ones are released, each claimed by its own
    machine only, and the last ends settle the parent."""
    async def run() -> None:
        engine = db.make_engine(database_url)
        try:
            await db.migrate(engine)
            now = time.time()
            async with engine.begin() as conn:
                await conn.execute(db.accounts.insert().values(
                    id="acct", name="acct", primary_key="-", secondary_key="-",
                    created_at=now))
                await conn.execute(db.machines.insert(), [
                    {"id": f"m{i:02d}", "account_id": "acct", "name": f"m{i:02d}",
                     "group_name": "web", "labels": {}, "public_key": "-", "facts": {},
                     "agent_version": "1", "registered_at": now, "last_heartbeat_at": now,
                     "heartbeat_interval": 30.0} for i in range(12)])
            await runbooks.publish(engine, "acct", "r", "#!/bin/bash\ntrue\n", kind=None,
                                   filename="r.sh", description="", param_specs=[],
                                   log_verbose=False, log_progress=False)
            values = await jobs.prepare(engine, "acct", "r", "web", {})
            view = await fanout.start(engine, "acct", values, "50%", None)
            child = {c["machine_id"]: c["job_id"] for c in view["fanout"]["breakdown"]}
            assert [c["status"] for c in view["fanout"]["breakdown"]] == \
                ["Queued"] * 6 + ["New"] * 6

            def machine(i: int) -> Any:
                return SimpleNamespace(id=f"m{i:02d}", account_id="acct", group_name="web",
                                       heartbeat_interval=30.0)

            async def claim(i: int) -> list[str]:
                async with engine.begin() as conn:
                    return [c["id"] for c in await jobs.claim(conn, machine(i), 4)]

            async def end(i: int, code: int) -> str:
                return await jobs.report(engine, f"m{i:02d}", child[f"m{i:02d}"], 1,
                                         started=True, end={"exit_code": code, "signal": None,
                                                            "reason": f"exit code {code}"})

            assert await claim(8) == []  # its child is held back
            for i in range(6):  # each claims its own child, and nothing else
                assert await claim(i) == [child[f"m{i:02d}"]]
            assert await asyncio.gather(*(end(i, 0) for i in range(6))) == ["Completed"] * 6
            shown = await jobs.get(engine, "acct", values["id"])
            assert shown["status"] == "Running"
            assert shown["fanout"]["counts"] == {"Completed": 6, "Queued": 6}
            for i in range(6, 12):
                assert await claim(i) == [child[f"m{i:02d}"]]
            ended = await asyncio.gather(*(end(i, 1 if i == 7 else 0) for i in range(6, 12)))
            assert sorted(ended) == ["Completed"] * 5 + ["Failed"]
            shown = await jobs.get(engine, "acct", values["id"])
            assert shown["status"] == "Failed" and shown["ended_at"] is not None
            assert shown["reason"] == "12 children: 11 Completed, 1 Failed"
            listed = await jobs.listing(engine, "acct")
            assert [j["id"] for j in listed] == [values["id"]]
        finally:
            await engine.dispose()

    asyncio.run(run())
