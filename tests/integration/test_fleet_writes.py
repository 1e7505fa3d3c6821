"""The writes a fleet causes, batched: heartbeats in one UPDATE per window, each answered
only once stored."""

from __future__ import annotations

import asyncio
import resource
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import sqlalchemy as sa

from outpost.hub import db, heartbeats, machines
from outpost.protocol.models import Heartbeat
from tests.support import init_hub, wait_until


async def _engine_with_machines(database_url: str, count: int) -> Any:
    engine = db.make_engine(database_url)
    await db.migrate(engine)
    async with engine.begin() as conn:
        await conn.execute(db.accounts.insert().values(
            id="acct", name="acct", primary_key="-", secondary_key="-", created_at=time.time()))
        await conn.execute(db.machines.insert(), [{
            "id": f"m{i:03d}", "account_id": "acct", "name": f"m{i:03d}", "group_name": "web",
            "labels": {}, "public_key": "-", "facts": {}, "agent_version": "0",
            "registered_at": time.time(), "heartbeat_interval": 30.0,
            "stopped_at": time.time()} for i in range(count)])
    return engine


def _statements(engine: Any, prefix: str) -> list[int]:
    """Rows of each execution of statements starting with ``prefix``, as they run."""
    seen: list[int] = []

    @sa.event.listens_for(engine.sync_engine, "before_cursor_execute")
    def count(_conn: Any, _cursor: Any, statement: str, params: Any, _ctx: Any,
              many: bool) -> None:
        if statement.lstrip().upper().startswith(prefix):
            seen.append(len(params) if many else 1)

    return seen


def test_heartbeats_arriving_together_are_written_in_one_update_and_answered_once_stored(
        database_url: str) -> None:
    async def run() -> None:
        engine = await _engine_with_machines(database_url, 200)
        try:
            updates = _statements(engine, "UPDATE MACHINES")
            beat = Heartbeat(agent_version="9.9", heartbeat_interval=7.0)

            async def one(i: int) -> tuple[float, float | None]:
                at = await machines.record_heartbeat(engine, f"m{i:03d}", beat)
                async with engine.connect() as conn:  # stored when answered
                    stored = await conn.scalar(sa.select(db.machines.c.last_heartbeat_at)
                                               .where(db.machines.c.id == f"m{i:03d}"))
                return at, stored

            answers = await asyncio.gather(*(one(i) for i in range(200)))
            assert all(stored == at for at, stored in answers)
            assert updates == [200]  # one UPDATE executed for the 200 rows
            async with engine.connect() as conn:
                rows = (await conn.execute(sa.select(db.machines))).all()
            assert {(r.agent_version, r.heartbeat_interval, r.stopped_at) for r in rows} == {
                ("9.9", 7.0, None)}
            assert all(r.heartbeat["agent_version"] == "9.9" for r in rows)
            # A lone heartbeat later is its own batch, and waits at most about the window.
            started = time.monotonic()
            await machines.record_heartbeat(engine, "m000", beat)
            assert time.monotonic() - started < heartbeats.WINDOW + 1.0
            assert updates == [200, 1]
        finally:
            await engine.dispose()

    asyncio.run(run())


def test_a_failed_batch_fails_every_heartbeat_in_it(tmp_path: Any) -> None:
    async def run() -> list[BaseException | float]:
        engine = await _engine_with_machines(f"sqlite:///{tmp_path / 'hub.db'}", 3)
        try:
            async with engine.begin() as conn:
                await conn.execute(sa.text("DROP TABLE machines"))
            beat = Heartbeat(agent_version="1")
            return await asyncio.gather(
                *(machines.record_heartbeat(engine, f"m{i:03d}", beat) for i in range(3)),
                return_exceptions=True)
        finally:
            await engine.dispose()

    results = asyncio.run(run())
    assert len(results) == 3 and all(isinstance(r, Exception) for r in results), results


def test_the_hub_raises_its_descriptor_limit_and_keeps_idle_connections_small(
        tmp_path: Path) -> None:
    """Started with a soft limit of 1,024, the hub raises it to the hard limit and says how
    many agents that serves; 200 idle TLS connections cost it far less than asyncio's
    256 KiB read buffer each."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 1024:
        pytest.skip(f"the hard limit on descriptors is {hard}: nothing to raise to")
    hub = init_hub(tmp_path / "hub", f"sqlite:///{tmp_path / 'hub.db'}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # the hub inherits it
    try:
        hub.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert hub.proc is not None
        assert psutil.Process(hub.proc.pid).rlimit(resource.RLIMIT_NOFILE) == (hard, hard)
        wait_until(lambda: "open descriptors" in hub.log(), 10, what="the limit in the log")
        assert (f"open descriptors: limit {hard} (raised from 1024), enough for about "
                f"{(hard - 200) // 2} agents") in hub.log()

        async def connect(count: int) -> tuple[int, int]:
            ctx = hub.ssl_context()
            clients = [httpx.AsyncClient(verify=ctx, timeout=30) for _ in range(count)]
            before = psutil.Process(hub.proc.pid).memory_info().rss  # type: ignore[union-attr]
            try:
                for client in clients:
                    assert (await client.get(f"{hub.url}/healthz")).status_code == 200
                return before, psutil.Process(hub.proc.pid).memory_info().rss  # type: ignore[union-attr]
            finally:
                for client in clients:
                    await client.aclose()

        before, after = asyncio.run(connect(200))
        per_connection = (after - before) / 200 / 1024
        assert per_connection < 150, f"{per_connection:.0f} KiB an idle connection"
    finally:
        hub.stop()


def _sample(hub: Any, name: str) -> float:
    for line in hub.api("GET", "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def _young_collections(hub: Any) -> float:
    return _sample(hub, 'outpost_gc_pause_seconds_count{generation="0"}')


def test_the_hub_collects_its_young_generation_ten_times_a_second(tmp_path: Path) -> None:
    """An idle hub allocates too little to reach the collector's threshold, yet its young
    generation is collected ten times a second (its survivors frozen), so that no collection
    walks more than the last tenth of a second's objects (gcwatch.Freezer)."""
    hub = init_hub(tmp_path / "hub", f"sqlite:///{tmp_path / 'hub.db'}")
    hub.start()
    try:
        first = _young_collections(hub)
        # Within 10 s: one a second would take 20.
        wait_until(lambda: _young_collections(hub) >= first + 20, 10,
                   what="twenty more young collections")
    finally:
        hub.stop()
