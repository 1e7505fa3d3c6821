"""Fast tier: the machines' statuses counted by the database (``/metrics``) agree with the
status each machine is shown with (``machines.status``), on SQLite and PostgreSQL, for every
kind of machine: heartbeating, late, silent, never heard from, stopped, and one whose
interval is below the floor."""

from __future__ import annotations

import time
from collections import Counter

import sqlalchemy as sa

from outpost.hub import machines
from outpost.hub.db import machines as machine_rows
from tests.inproc import FAST, InprocHub

pytestmark = FAST


async def test_counts_in_the_database_match_each_machines_status(
        fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    now = time.time()
    # (heartbeat interval, seconds since the last heartbeat or None, seconds since it
    # registered, stopped)
    cases = {
        "beating": (10.0, 1.0, 500.0, False),
        "late": (10.0, 35.0, 500.0, False),  # 3 intervals: Unresponsive
        "silent": (10.0, 150.0, 500.0, False),  # 10 intervals: Disconnected
        "new": (10.0, None, 5.0, False),  # never heard from, within 3 intervals: Pending
        "never": (10.0, None, 40.0, False),  # never heard from for longer: Unresponsive
        "long-gone": (10.0, None, 500.0, False),  # Disconnected
        "stopped": (10.0, 400.0, 500.0, True),
        "tiny": (0.0, 0.5, 500.0, False),  # interval 0 counts as 1 ms: Disconnected
        "edge": (10.0, 29.0, 500.0, False),
    }
    for name in cases:
        await hub.machine(name)
    async with hub.hub.engine.begin() as conn:
        for name, (interval, ago, registered, stopped) in cases.items():
            await conn.execute(machine_rows.update().where(
                machine_rows.c.name == name).values(
                heartbeat_interval=interval,
                last_heartbeat_at=None if ago is None else now - ago,
                registered_at=now - registered, stopped_at=now - 1 if stopped else None))
    async with hub.hub.engine.connect() as conn:
        rows = (await conn.execute(sa.select(
            machine_rows.c.heartbeat_interval, machine_rows.c.last_heartbeat_at,
            machine_rows.c.registered_at, machine_rows.c.stopped_at))).all()
    shown = Counter(machines.status(row, time.time()) for row in rows)
    counted = await machines.counts_by_status(hub.hub.engine)
    assert counted == dict(shown), (counted, shown)
    assert counted == {"Healthy": 2, "Unresponsive": 2, "Disconnected": 3, "Pending": 1,
                       "Stopped": 1}, counted
