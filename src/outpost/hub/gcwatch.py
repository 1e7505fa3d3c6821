"""How long the garbage collector stops the hub.

A collection runs in whatever request allocated last, with the event loop stopped: every
request the hub holds waits for it. A full collection walks every object the collector
tracks, and a hub serving thousands of agents holds many (each connection's transport,
protocol and buffers), so its pauses grow with the fleet. ``outpost_gc_pause_seconds`` (a
histogram by generation) shows them on ``/metrics``, and a pause of ``SLOW`` seconds or more
is logged (at most once a minute).
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

log = logging.getLogger("outpost.hub")

SLOW = 0.1  # seconds
LOG_EVERY = 60.0  # seconds between two logged pauses


class GcWatch:
    """A ``gc.callbacks`` entry that times each collection."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.pauses = Histogram(
            "outpost_gc_pause_seconds", "How long each garbage collection stopped the hub, "
            "by generation", ["generation"], registry=registry,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
        self._began: float | None = None
        self._logged = float("-inf")
        self.longest = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        if self._began is None:
            return
        took, self._began = time.perf_counter() - self._began, None
        generation = int(info.get("generation", -1))
        self.pauses.labels(str(generation)).observe(took)
        self.longest = max(self.longest, took)
        now = time.monotonic()
        if took >= SLOW and now - self._logged >= LOG_EVERY:
            self._logged = now
            log.warning("the garbage collector stopped the hub for %.0f ms (generation %d, "
                        "%d objects collected)", took * 1e3, generation,
                        int(info.get("collected", 0)))


def install(registry: CollectorRegistry) -> GcWatch:
    watch = GcWatch(registry)
    gc.callbacks.append(watch)
    return watch


YOUNG_EVERY = 0.1  # seconds between two young collections (Freezer.collect_young)


class Freezer:
    """A ``gc.callbacks`` entry that keeps what survived a collection out of later ones.

    A hub with thousands of agents holds millions of tracked objects that live for seconds
    to hours (each connection's transport, protocol, parser and buffers; each waiting
    long-poll's task and frames), and Python's collector walks all of them in each
    collection of the generation they reached: at 10,000 agents a full collection stopped
    the hub for about a second, and a young one, which walks everything allocated since the
    last one that still lives, up to 800 ms (``bench/fleet.py --stalls``): the young
    generation's count is allocations less deallocations, so while a fleet holds steady it
    seldom reaches its threshold, and meanwhile every new connection and poll piles up
    young.

    Here the survivors of every collection of ``generation`` or older are frozen
    (``gc.freeze``), and ``collect_young`` (every ``YOUNG_EVERY`` seconds, the hub's
    "gc-young" task) makes a young collection walk only what was allocated since the last
    one and still lives. Each survivor is walked once, so a short period costs little more
    CPU in all (it also walks and freezes objects that were about to die, which their
    reference counts free anyway) and bounds each pause: at 10,000 agents a second's
    survivors (each waiting long-poll holds its objects for 25 s) took 50-145 ms to walk.

    A frozen object is still freed when its last reference goes, as every object is; what
    it cannot get is the collector's help with a reference cycle. A cycle that becomes
    garbage after it was frozen waits until, once every ``rewalk`` seconds, a full
    collection walks everything again (``gc.unfreeze`` at its start: the one long
    pause in that time). The hub makes little cyclic garbage (about 17,000 objects found by
    every collection of a 10,000-agent run's first five minutes).
    """

    def __init__(self, generation: int = 0, rewalk: float = 3600.0) -> None:
        self.generation = generation
        self.rewalk = rewalk
        self._walked = time.monotonic()
        self.rewalks = 0  # full collections that walked everything, for tests

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        generation = int(info.get("generation", -1))
        if phase == "start":
            if generation == 2 and time.monotonic() - self._walked >= self.rewalk:
                gc.unfreeze()  # this collection walks everything
                self._walked = time.monotonic()
                self.rewalks += 1
        elif generation >= self.generation:
            gc.freeze()

    async def collect_young(self) -> None:
        """One young collection (and, when its time has come, the rewalk)."""
        if time.monotonic() - self._walked >= self.rewalk:
            gc.collect(2)
        else:
            gc.collect(0)


def install_freezer(generation: int = 0, rewalk: float = 3600.0) -> Freezer:
    # No gauge of gc.get_freeze_count(): it walks the frozen list, 1.6 million objects at
    # 10,000 agents, and a /metrics read took 230 ms with the loop stopped.
    freezer = Freezer(generation, rewalk)
    gc.callbacks.append(freezer)
    return freezer


class LoopLag:
    """How late the event loop runs a callback it was asked to run ``PERIOD`` seconds on:
    whatever held the loop (a statement, a collection, a checkpoint, a slow handler) for
    longer shows as lag. ``outpost_event_loop_lag_seconds`` on ``/metrics``; a lag of
    ``SLOW`` seconds or more is logged (at most once a minute)."""

    PERIOD = 0.05  # seconds

    def __init__(self, registry: CollectorRegistry) -> None:
        self.lags = Histogram(
            "outpost_event_loop_lag_seconds", "How late the hub's event loop ran a timer, "
            "sampled every 50 ms", registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
        self._logged = float("-inf")
        self.longest = 0.0

    async def run(self) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            await asyncio.sleep(self.PERIOD)
            lag = max(loop.time() - asked - self.PERIOD, 0.0)
            self.lags.observe(lag)
            self.longest = max(self.longest, lag)
            if lag >= SLOW and asked - self._logged >= LOG_EVERY:
                self._logged = asked
                log.warning("the hub's event loop was held for %.0f ms", lag * 1e3)
