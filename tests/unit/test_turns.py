"""The heartbeat and the long-poll take turns (agent/turns.py): an idle agent never has two
requests on the wire at once, so it needs one connection to the hub, and neither loop is
held up for long when the other's request does not come back."""

from __future__ import annotations

import asyncio
import time

import pytest

from outpost.agent import turns as turns_mod
from outpost.agent.turns import Turns

pytestmark = [pytest.mark.anyio]


class Wire:
    """Requests on the wire: how many at once, at most."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0
        self.beats: list[float] = []

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
            await asyncio.sleep(interval)

    async def polls() -> None:
        while True:
            await turns.poll_turn()
            hold = turns.hold(wait)
            try:
                await wire.send(hold + poll_extra)  # the hub holds it that long
            finally:
                turns.poll_back()

    await asyncio.gather(heartbeats(), polls())


async def test_an_idle_agent_has_one_request_on_the_wire_at_a_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(turns_mod, "MIN_HOLD", 0.1)
    monkeypatch.setattr(turns_mod, "GRACE", 0.5)
    turns, wire = Turns(), Wire()
    task = asyncio.ensure_future(_agent(turns, wire, interval=0.4, wait=1.0))
    await asyncio.sleep(2.5)
    task.cancel()
    assert wire.most == 1, "a heartbeat went out while a poll was on the wire"
    gaps = [b - a for a, b in zip(wire.beats, wire.beats[1:], strict=False)]
    assert len(wire.beats) >= 5 and max(gaps) < 0.4 + 0.2, gaps  # and none came late


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
    gaps = [b - a for a, b in zip(wire.beats, wire.beats[1:], strict=False)]
    assert len(wire.beats) >= 3 and max(gaps) < 0.4 + 0.3 + 0.2, gaps
    assert wire.most == 2


async def test_a_poll_is_not_held_up_by_a_heartbeat_that_never_comes() -> None:
    turns = Turns()
    turns.next_beat(0)  # due now, but the heartbeat loop is stuck elsewhere
    started = time.monotonic()
    await turns.poll_turn()
    assert time.monotonic() - started < turns_mod.GRACE + 0.5
    turns.poll_back()
    # And the poll is held only until the next heartbeat, never below MIN_HOLD.
    turns.next_beat(10.0)
    assert 9.0 < turns.hold(25.0) <= 10.0
    assert turns.hold(5.0) == 5.0
    turns.next_beat(0.0)
    assert turns.hold(25.0) == turns_mod.MIN_HOLD
