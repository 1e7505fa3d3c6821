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
