"""The hub's garbage-collection pauses: each collection is timed into
``outpost_gc_pause_seconds{generation}``, and a slow one is logged, at most once a minute."""

from __future__ import annotations

import gc
import logging

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from outpost.hub import gcwatch


def _count(registry: CollectorRegistry, generation: int) -> float:
    value = registry.get_sample_value("outpost_gc_pause_seconds_count",
                                      {"generation": str(generation)})
    return 0.0 if value is None else value


def test_each_collection_is_timed_and_a_slow_one_is_logged_once_a_minute(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    watch = gcwatch.install(registry)
    try:
        monkeypatch.setattr(gcwatch, "SLOW", 0.0)  # every pause counts as slow here
        with caplog.at_level(logging.WARNING, logger="outpost.hub"):
            gc.collect(2)
            gc.collect(2)
        assert _count(registry, 2) >= 2
        assert watch.longest > 0
        slow = [r for r in caplog.records if "garbage collector stopped the hub" in r.message]
        assert len(slow) == 1, [r.message for r in slow]  # the second within the minute
        assert "(generation 2," in slow[0].message
        text = generate_latest(registry).decode()
        assert 'outpost_gc_pause_seconds_bucket{generation="2",le="0.1"}' in text
    finally:
        gc.callbacks.remove(watch)


def test_a_loop_held_by_blocking_work_shows_as_lag_and_is_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    import asyncio
    import time

    registry = CollectorRegistry()
    lag = gcwatch.LoopLag(registry)

    async def main() -> None:
        task = asyncio.ensure_future(lag.run())
        await asyncio.sleep(0.12)  # a few samples of an idle loop
        quiet = lag.longest
        time.sleep(0.3)  # the loop held: what a checkpoint or a collection inline does
        await asyncio.sleep(0.12)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert quiet < 0.1, quiet
        assert 0.2 < lag.longest < 1.0, lag.longest

    with caplog.at_level(logging.WARNING, logger="outpost.hub"):
        asyncio.run(main())
    held = [r.message for r in caplog.records if "event loop was held" in r.message]
    assert len(held) == 1, held
    count = registry.get_sample_value("outpost_event_loop_lag_seconds_count")
    assert count is not None and count >= 3


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_the_freezer_keeps_survivors_out_of_later_collections_until_a_rewalk() -> None:
    gc.collect()
    frozen_before = gc.get_freeze_count()
    freezer = gcwatch.Freezer(generation=1, rewalk=3600.0)
    gc.callbacks.append(freezer)
    try:
        kept = [_Cycle() for _ in range(1000)]  # alive at the collection: frozen by it
        gc.collect(1)
        assert gc.get_freeze_count() >= frozen_before + 1000
        # A frozen object still dies with its last reference; a frozen cycle waits for the
        # rewalk, which a full collection does once its time has come.
        import weakref

        probe = weakref.ref(kept[0])
        del kept
        gc.collect(2)
        assert probe() is not None  # out of the collector's sight
        freezer.rewalk = 0.0
        gc.collect(2)
        assert freezer.rewalks == 1
        assert probe() is None  # the rewalk found the cycle
        assert gc.get_freeze_count() > 0  # and froze what survived it
    finally:
        gc.callbacks.remove(freezer)
        gc.unfreeze()
        gc.collect()


def test_the_young_collection_each_second_freezes_what_lives_and_rewalks_in_time() -> None:
    import asyncio

    gc.collect()
    freezer = gcwatch.Freezer(generation=0, rewalk=3600.0)
    gc.callbacks.append(freezer)
    try:
        before = gc.get_freeze_count()
        kept = [_Cycle() for _ in range(500)]
        asyncio.run(freezer.collect_young())
        assert gc.get_freeze_count() >= before + 500
        assert gc.get_count()[0] < 500  # the young generation starts empty again
        assert freezer.rewalks == 0
        del kept
        freezer.rewalk = 0.0
        frozen = gc.get_freeze_count()
        asyncio.run(freezer.collect_young())  # its time has come: a full walk
        assert freezer.rewalks == 1
        assert gc.get_freeze_count() < frozen  # the 500 cycles were found and freed
    finally:
        gc.callbacks.remove(freezer)
        gc.unfreeze()
        gc.collect()
