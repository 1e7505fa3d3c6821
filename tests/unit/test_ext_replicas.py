"""Fast tier, PostgreSQL: two hub replicas in this process on one database. A goal changed
through one replica changes the etag the other answers heartbeats with, through the
notification (well within the goals cache's time limit)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tests.extbuild import manifest, package
from tests.inproc import FAST, Machine, running_hub

pytestmark = FAST


async def _etag(machine: Machine) -> str:
    return str((await machine.heartbeat())["extensions_etag"])


async def _changes(machine: Machine, old: str, within: float = 5.0) -> tuple[str, float]:
    started = time.monotonic()
    while time.monotonic() - started < within:
        now = await _etag(machine)
        if now != old:
            return now, time.monotonic() - started
        await asyncio.sleep(0.02)
    raise AssertionError(f"the etag stayed {old!r} for {within} s")


async def test_a_change_on_one_replica_reaches_the_others_heartbeats(
        tmp_path: Path, postgres_url: str, anyio_backend: str) -> None:
    async with running_hub(tmp_path / "a", postgres_url) as a, \
            running_hub(tmp_path / "b", postgres_url) as b:
        made = await a.api("POST", "/v1/extensions", headers={"Content-Type": "application/gzip"},
                           content=package(manifest("hello", "1.0.0")))
        assert made.status_code == 201, made.text
        on_a = await a.machine("m1", "web")
        on_b = Machine(b, on_a.id, on_a.name, on_a.group, on_a.key)
        assert await _etag(on_b) == ""  # replica b now holds the account's (empty) goals
        held = b.hub.extensions.cache.loads

        await a.ok("PUT", "/v1/extensions/hello/targets/group/web", json={})
        first, took = await _changes(on_b, "")
        assert took < b.hub.extensions.cache.TTL / 10
        assert first == await _etag(on_a)
        assert b.hub.extensions.cache.loads > held

        await a.ok("POST", "/v1/machines/m1/extensions/hello/retry")
        second, _ = await _changes(on_b, first)
        await a.ok("DELETE", "/v1/extensions/hello/targets/group/web")
        third, _ = await _changes(on_b, second)
        assert third == ""
