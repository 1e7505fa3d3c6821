"""A job on every machine of a group keeps running counts of its children on its fanouts
row: exact when children end at once through two engines (as two hub replicas would) and
when an end is reported twice, on both databases; and what the rate control refuses."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa

from outpost.hub import db, fanout, jobs, machines, runbooks
from outpost.protocol.errors import OutpostError

FINAL = ("Completed", "Failed", "Stopped")


async def _setup(engine: Any, n: int, concurrency: str, errors: str | None = None
                 ) -> tuple[str, dict[str, str]]:
    """``n`` machines m00.. in group web and a job on each; returns the parent's id and its
    children's ids by machine id."""
    await db.migrate(engine)
    now = time.time()
    async with engine.begin() as conn:
        await conn.execute(db.accounts.insert().values(
            id="acct", name="acct", primary_key="-", secondary_key="-", created_at=now))
        await conn.execute(db.machines.insert(), [
            {"id": f"m{i:02d}", "account_id": "acct", "name": f"m{i:02d}",
             "group_name": "web", "labels": {}, "public_key": "-", "facts": {},
             "agent_version": "1", "registered_at": now, "last_heartbeat_at": now,
             "heartbeat_interval": 30.0} for i in range(n)])
    await runbooks.publish(engine, "acct", "r", "#!/bin/bash\ntrue\n", kind=None,
                           filename="r.sh", description="", param_specs=[],
                           log_verbose=False, log_progress=False)
    values = await jobs.prepare(engine, "acct", "r", "web", {})
    view = await fanout.start(engine, "acct", values, concurrency, errors)
    return values["id"], {c["machine_id"]: c["job_id"] for c in view["fanout"]["breakdown"]}


def _machine(machine_id: str) -> Any:
    return SimpleNamespace(id=machine_id, account_id="acct", group_name="web",
                           heartbeat_interval=30.0)


async def _claim(engine: Any, machine_id: str) -> list[str]:
    async with engine.begin() as conn:
        return [c["id"] for c in await jobs.claim(conn, _machine(machine_id), 4)]


async def _end(engine: Any, machine_id: str, job_id: str, code: int) -> str:
    return await jobs.report(engine, machine_id, job_id, 1, started=True,
                             end={"exit_code": code, "signal": None,
                                  "reason": f"exit code {code}"})


async def _counts(engine: Any, parent_id: str) -> tuple[dict[str, int], dict[str, int]]:
    """The fanouts row's counts, and the same counted from the children's rows."""
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(*(db.fanouts.c[n] for n in fanout.COUNTERS))
                                  .where(db.fanouts.c.job_id == parent_id))).one()
        statuses = [s for (s,) in (await conn.execute(sa.select(db.jobs.c.status).where(
            db.jobs.c.parent_id == parent_id))).all()]
    kept = dict(row._mapping)
    counted = {"waiting": statuses.count("New"),
               "busy": sum(s not in FINAL and s != "New" for s in statuses),
               **{s.lower(): statuses.count(s) for s in FINAL}}
    return kept, counted


@pytest.mark.timeout(300)
def test_counts_stay_exact_when_ends_race_on_two_engines(database_url: str) -> None:
    """30 machines, 5 at a time: each round's children are claimed and ended at once, every
    end sent twice, once through each of two engines (two pools: on PostgreSQL, parallel
    transactions, as on two replicas). After each round the kept counts equal the counted
    ones and no more than 5 children were ever released and not ended."""
    async def run() -> None:
        engines = [db.make_engine(database_url), db.make_engine(database_url)]
        try:
            parent_id, child = await _setup(engines[0], 30, "5")
            failing = {child["m03"], child["m17"]}
            kept, counted = await _counts(engines[0], parent_id)
            assert kept == counted == {"waiting": 25, "busy": 5, "completed": 0,
                                       "failed": 0, "stopped": 0}
            rounds = 0
            while True:
                async with engines[0].connect() as conn:
                    queued = [(r.target_machine_id, r.id) for r in (await conn.execute(
                        sa.select(db.jobs.c.target_machine_id, db.jobs.c.id).where(
                            db.jobs.c.parent_id == parent_id,
                            db.jobs.c.status == "Queued"))).all()]
                if not queued:
                    break
                rounds += 1
                assert len(queued) <= 5
                claimed = await asyncio.gather(*(
                    _claim(engines[i % 2], m) for i, (m, _) in enumerate(queued)))
                assert claimed == [[job_id] for _, job_id in queued]
                ends = await asyncio.gather(*(
                    _end(engines[(i + k) % 2], m, job_id, 1 if job_id in failing else 0)
                    for i, (m, job_id) in enumerate(queued) for k in (0, 1)))
                assert set(ends) <= {"Completed", "Failed"}, ends
                kept, counted = await _counts(engines[1], parent_id)
                assert kept == counted, (rounds, kept, counted)
                assert kept["busy"] <= 5
            assert rounds == 6
            shown = await jobs.get(engines[1], "acct", parent_id)
            assert shown["status"] == "Failed" and shown["ended_at"] is not None
            assert shown["reason"] == "30 children: 28 Completed, 2 Failed"
            assert shown["fanout"]["counts"] == {"Completed": 28, "Failed": 2}
            kept, counted = await _counts(engines[0], parent_id)
            assert kept == counted == {"waiting": 0, "busy": 0, "completed": 28,
                                       "failed": 2, "stopped": 0}
        finally:
            for engine in engines:
                await engine.dispose()

    asyncio.run(run())


def test_a_queued_child_of_a_removed_machine_ends_and_resume_after_a_halt_is_refused(
        database_url: str) -> None:
    async def run() -> None:
        engine = db.make_engine(database_url)
        try:
            parent_id, child = await _setup(engine, 5, "2", "0")
            # m00 and m01 queued, the rest held. m01's machine is removed before it claims.
            await machines.deregister(engine, "m01")
            assert await fanout.sweep(engine) == 1
            shown = await jobs.get(engine, "acct", child["m01"])
            assert (shown["status"], shown["reason"]) == (
                "Stopped", "not started: its machine was removed")
            parent = await jobs.get(engine, "acct", parent_id)
            assert [c["status"] for c in parent["fanout"]["breakdown"]] == \
                ["Queued", "Stopped", "Queued", "New", "New"]
            # A queued child suspended keeps its slot: nothing more is released.
            suspended, _ = await jobs.control(engine, "acct", child["m02"], "suspend")
            assert suspended["status"] == "Suspended"
            assert (await _counts(engine, parent_id))[0]["busy"] == 2
            with pytest.raises(OutpostError) as held:
                await jobs.control(engine, "acct", child["m03"], "suspend")
            assert held.value.code == "E8128"
            # m00's child fails: more than --max-errors 0, so dispatching stops.
            assert await _claim(engine, "m00") == [child["m00"]]
            assert await _end(engine, "m00", child["m00"], 2) == "Failed"
            parent = await jobs.get(engine, "acct", parent_id)
            assert parent["fanout"]["halted"] == \
                "1 children failed, more than --max-errors 0 lets pass (0)"
            with pytest.raises(OutpostError) as halted:
                await jobs.control(engine, "acct", child["m02"], "resume")
            assert halted.value.code == "E8129"
            assert "no further child of job" in halted.value.message
            assert (await jobs.get(engine, "acct", child["m02"]))["status"] == "Suspended"
            stopped, _ = await jobs.control(engine, "acct", child["m02"], "stop")
            assert stopped["status"] == "Stopped"
            parent = await jobs.get(engine, "acct", parent_id)
            assert parent["status"] == "Failed"
            assert parent["reason"] == ("5 children: 1 Failed, 4 Stopped; dispatching "
                                        "stopped: 1 children failed, more than --max-errors "
                                        "0 lets pass (0)")
            kept, counted = await _counts(engine, parent_id)
            assert kept == counted
        finally:
            await engine.dispose()

    asyncio.run(run())
