"""The long-poll carries the heartbeat (agent/turns.py): an idle agent makes one request per
poll, never two on the wire at once; a heartbeat is never late for it; the heartbeat loop
sends one on its own only when no poll carried it (a poll held past its time, a carried one
lost, a hub that takes none in polls, where the two take turns on one connection)."""

from __future__ import annotations

import asyncio
import time

import pytest

from outpost.agent import turns as turns_mod
from outpost.agent.turns import Turns

pytestmark = [pytest.mark.anyio]


class Wire:
    """Requests on the wire: how many at once, at most, and the heartbeats that reached
    the hub (carried by a poll, or on their own)."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0
        self.requests = 0
        self.beats: list[float] = []  # when each heartbeat reached the hub
        self.alone: list[float] = []  # those sent on their own
        self.polls: list[float] = []  # each poll's hold

    async def send(self, seconds: float) -> None:
        self.now += 1
        self.requests += 1
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.now -= 1


async def _agent(turns: Turns, wire: Wire, interval: float, wait: float,
                 poll_extra: float = 0.0, acknowledged: bool = True) -> None:
    """The agent's two loops as daemon.py runs them, against a hub that holds each poll
    ``wait`` (+ ``poll_extra``) seconds; ``acknowledged``: the hub takes heartbeats in
    polls."""
    async def heartbeats() -> None:
        while True:
            await turns.until_due(5.0)
            if not turns.due():
                continue
            await turns.beat_turn()
            if not turns.due():
                continue
            wire.beats.append(time.monotonic())
            wire.alone.append(time.monotonic())
            await wire.send(0.02)
            turns.next_beat(interval)

    async def polls() -> None:
        while True:
            hold, carry = await turns.poll_turn(wait)
            wire.polls.append(hold)
            if carry:
                wire.beats.append(time.monotonic())
            try:
                await wire.send(hold + poll_extra)
            finally:
                turns.poll_back()
            if carry and not acknowledged:
                turns.beat_lost(refused=True)

    await asyncio.gather(heartbeats(), polls())


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


async def _run(seconds: float, **kw: float | bool) -> tuple[Turns, Wire]:
    turns, wire = Turns(cadence=float(kw["interval"])), Wire()
    task = asyncio.ensure_future(_agent(turns, wire, **kw))  # type: ignore[arg-type]
    await asyncio.sleep(seconds)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return turns, wire


async def test_heartbeats_less_frequent_than_polls_ride_on_every_poll_that_would_pass_them(
        ) -> None:
    """A heartbeat every 0.6 s beside polls held 0.5 s: each poll carries one and is held
    its whole time; no heartbeat goes on its own; one request per poll."""
    turns, wire = await _run(3.0, interval=0.6, wait=0.5)
    assert wire.most == 1
    assert not wire.alone, "a heartbeat went on its own"
    assert len(wire.polls) >= 5 and all(hold == 0.5 for hold in wire.polls), wire.polls
    assert wire.requests == len(wire.polls)
    gaps = _gaps(wire.beats)
    assert len(wire.beats) >= 5 and max(gaps) < 0.6, gaps  # none late
    assert turns.carried == len(wire.beats)


async def test_heartbeats_more_frequent_than_polls_shorten_the_polls_and_ride_on_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(turns_mod, "MIN_HOLD", 0.1)
    _, wire = await _run(2.5, interval=0.4, wait=1.0)
    assert wire.most == 1 and not wire.alone
    gaps = _gaps(wire.beats)
    assert len(wire.beats) >= 5 and max(gaps) < 0.4 + 0.1, gaps  # none late
    assert all(hold <= 0.4 for hold in wire.polls), wire.polls


async def test_a_poll_held_past_the_heartbeat_delays_it_by_the_grace_at_most(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub that holds the poll longer than asked: the heartbeat waits GRACE, then goes on
    a connection of its own."""
    monkeypatch.setattr(turns_mod, "MIN_HOLD", 0.1)
    monkeypatch.setattr(turns_mod, "GRACE", 0.3)
    _, wire = await _run(2.0, interval=0.4, wait=1.0, poll_extra=5.0)
    gaps = _gaps(wire.beats)
    assert len(wire.beats) >= 3 and len(wire.alone) >= 2 and max(gaps) < 0.4 + 0.3 + 0.2, gaps
    assert wire.most == 2


@pytest.mark.parametrize("interval,wait", [(0.5, 1.0), (0.6, 0.5)])
async def test_a_hub_that_takes_no_heartbeat_in_a_poll_gets_them_on_their_own(
        monkeypatch: pytest.MonkeyPatch, interval: float, wait: float) -> None:
    """After one unacknowledged carried heartbeat the agent stops carrying them; polls are
    then held only until the next heartbeat is due, so it goes between two polls."""
    monkeypatch.setattr(turns_mod, "MIN_HOLD", 0.1)
    monkeypatch.setattr(turns_mod, "GRACE", 0.3)
    turns, wire = await _run(3.0, interval=interval, wait=wait, acknowledged=False)
    assert turns.carried == 1 and not turns.carrying
    assert len(wire.alone) >= 3
    gaps = _gaps(wire.alone)
    assert max(gaps) < interval + 0.2, gaps  # none late
    assert wire.most == 1, "a heartbeat went out while a poll was on the wire"


async def test_a_lost_carried_heartbeat_is_due_again_at_once() -> None:
    turns = Turns(cadence=30.0)
    hold, carry = await turns.poll_turn(25.0)  # the first heartbeat is due at once: carried
    assert (hold, carry) == (25.0, True)
    assert not turns.due()  # the next one is scheduled a cadence on
    hold, carry = await turns.poll_turn(25.0)  # due in 30 s: after this poll's 25, not carried
    assert (hold, carry) == (25.0, False)
    turns.beat_lost()  # say the first poll's answer never came
    assert turns.due()
    started = time.monotonic()
    await turns.until_due(5.0)
    assert time.monotonic() - started < 0.1
    hold, carry = await turns.poll_turn(25.0)
    assert carry and not turns.due()


async def test_until_due_wakes_when_stopped_or_when_a_poll_moves_the_beat() -> None:
    turns = Turns(cadence=30.0)
    turns.next_beat(10.0)
    stop = asyncio.Event()
    waiting = asyncio.ensure_future(turns.until_due(20.0, stop))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    turns.next_beat(0.0)  # due now: it returns
    await asyncio.wait_for(waiting, 1.0)
    turns.next_beat(10.0)
    waiting = asyncio.ensure_future(turns.until_due(20.0, stop))
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(waiting, 1.0)
