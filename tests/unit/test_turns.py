"""The heartbeat and the long-poll take turns (agent/turns.py): an idle agent never has two
requests on the wire at once, so it needs one connection to the hub; a heartbeat that would
fall due during a poll goes out early, between two polls; and neither loop is held up for
long when the other's request does not come back."""

from __future__ import annotations

import asyncio
import time

import pytest

from outpost.agent import turns as turns_mod
from outpost.agent.turns import Turns

pytestmark = [pytest.mark.anyio]


class Wire:
    """Requests on the wire: how many at once, at most, and what was sent when."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0
        self.beats: list[float] = []
        self.polls: list[float] = []

    async def send(self, seconds: float) -> None:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.now -= 1


async def _agent(turns: Turns, wire: Wire, interval: float, wait: float,
                 poll_extra: float = 0.0) -> None:
    async def heartbeats() -> None:
        while True:
            await turns.beat_turn()
            wire.beats.append(time.monotonic())
            await wire.send(0.02)
            turns.next_beat(interval)
            try:
                await asyncio.wait_for(turns.early.wait(), interval)
            except TimeoutError:
                pass

    async def polls() -> None:
        while True:
            hold = await turns.poll_turn(wait)
            wire.polls.append(hold)
            try:
                await wire.send(hold + poll_extra)  # the hub holds it that long
            finally:
                turns.poll_back()

    await asyncio.gather(heartbeats(), polls())


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


async def test_heartbeats_less_frequent_than_polls_go_early_between_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A heartbeat every 0.6 s beside polls held 0.5 s: one request on the wire at a time,
    every poll held its whole time, and a heartbeat between each two (every 0.5 s)."""
    monkeypatch.setattr(turns_mod, "GRACE", 0.5)
    turns, wire = Turns(), Wire()
    task = asyncio.ensure_future(_agent(turns, wire, interval=0.6, wait=0.5))
    await asyncio.sleep(3.0)
    task.cancel()
    assert wire.most == 1, "a heartbeat went out while a poll was on the wire"
    assert len(wire.polls) >= 4 and all(hold == 0.5 for hold in wire.polls), wire.polls
    gaps = _gaps(wire.beats)
    assert len(wire.beats) >= 5 and max(gaps) < 0.6 + 0.1, gaps  # none late
    assert len(wire.beats) <= len(wire.polls) + 1  # not more heartbeats than polls


async def test_heartbeats_more_frequent_than_polls_shorten_the_polls(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(turns_mod, "MIN_HOLD", 0.1)
    monkeypatch.setattr(turns_mod, "GRACE", 0.5)
    turns, wire = Turns(), Wire()
    task = asyncio.ensure_future(_agent(turns, wire, interval=0.4, wait=1.0))
    await asyncio.sleep(2.5)
    task.cancel()
    assert wire.most == 1, "a heartbeat went out while a poll was on the wire"
    gaps = _gaps(wire.beats)
    assert len(wire.beats) >= 5 and max(gaps) < 0.4 + 0.2, gaps  # none late
    assert all(hold < 1.0 for hold in wire.polls[1:]), wire.polls


async def test_a_poll_held_past_the_heartbeat_delays_it_by_the_grace_at_most(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub that holds the poll longer than asked: the heartbeat waits GRACE, then goes on
    a connection of its own."""
    monkeypatch.setattr(turns_mod, "MIN_HOLD", 0.1)
    monkeypatch.setattr(turns_mod, "GRACE", 0.3)
    turns, wire = Turns(), Wire()
    task = asyncio.ensure_future(_agent(turns, wire, interval=0.4, wait=1.0, poll_extra=5.0))
    await asyncio.sleep(2.0)
    task.cancel()
    gaps = _gaps(wire.beats)
    assert len(wire.beats) >= 3 and max(gaps) < 0.4 + 0.3 + 0.2, gaps
    assert wire.most == 2


async def test_a_poll_is_not_held_up_by_a_heartbeat_that_never_comes() -> None:
    turns = Turns()  # the first heartbeat is due at once, but its loop is stuck elsewhere
    started = time.monotonic()
    hold = await turns.poll_turn(25.0)
    assert time.monotonic() - started < turns_mod.GRACE + 0.5
    assert hold == turns_mod.MIN_HOLD
    turns.poll_back()
    turns.next_beat(10.0)  # heartbeats less frequent than the polls: the poll is whole
    assert await turns.poll_turn(5.0) == 5.0
    turns.poll_back()
    assert not turns.early.is_set()
    turns.next_beat(3.0, cadence=30.0)  # due during the poll: asked for at once
    asked = asyncio.ensure_future(turns.poll_turn(25.0))
    await asyncio.sleep(0.05)
    assert turns.early.is_set()
    turns.next_beat(30.0)
    assert await asked == 25.0
