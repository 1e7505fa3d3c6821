"""Heartbeats and the long-poll take turns on one connection.

An agent's long-poll holds a connection open almost all the time, and a heartbeat sent
meanwhile needs a second one: two descriptors on the hub for every agent, which is what
limits how many agents one hub process serves (its descriptor limit; 20,000 allows 9,900
agents). Instead the long-poll asks to be held only until the next heartbeat is due, and the
heartbeat goes out on the connection the poll has just freed, before the next poll starts.
An idle agent then keeps one connection; one with running jobs opens a second for its
reports, as before.

``Turns`` only orders the two loops; neither ever waits for the other longer than
``GRACE`` seconds, so a poll answered late (or a hub that holds it longer) delays a
heartbeat by at most that, and a heartbeat that fails never holds up the poll.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

# How long either loop waits for its turn at most.
GRACE = 2.0
# A poll is not shortened below this (a heartbeat due sooner goes on its own connection
# only if the poll does not return in time).
MIN_HOLD = 1.0


class Turns:
    """The heartbeat loop calls ``beat_turn`` when a heartbeat is due and ``next_beat``
    once it is answered (or failed); the poll loop asks ``hold`` how long its next poll may
    be held, calls ``poll_turn`` before sending it and ``poll_back`` when it returns.
    (``hold`` after ``poll_turn``, which may have let a heartbeat go first.)"""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # Clock time of the next heartbeat: the first is due at once, so the first poll
        # waits for it (GRACE at most).
        self.beat_due: float | None = clock()
        self._poll_free = asyncio.Event()  # set while no poll is on the wire
        self._poll_free.set()
        self._scheduled = asyncio.Event()  # set when the next heartbeat is scheduled

    # --- the heartbeat loop --------------------------------------------------------------
    def next_beat(self, delay: float) -> None:
        """The heartbeat is answered (or failed); the next one is due ``delay`` seconds from
        now."""
        self.beat_due = self._clock() + delay
        self._scheduled.set()

    async def beat_turn(self) -> None:
        """A heartbeat is due: wait (at most GRACE) for the poll on the wire to come back."""
        if not self._poll_free.is_set():
            try:
                await asyncio.wait_for(self._poll_free.wait(), GRACE)
            except TimeoutError:
                pass  # it goes on a connection of its own

    # --- the poll loop -------------------------------------------------------------------
    def hold(self, wait: float) -> float:
        """How long the next poll may be held: ``wait``, or until the next heartbeat is due
        when that is sooner (never below MIN_HOLD)."""
        if self.beat_due is None:
            return wait
        left = self.beat_due - self._clock()
        return wait if left >= wait else max(MIN_HOLD, left)

    async def poll_turn(self) -> None:
        """Before a poll: let a heartbeat that is due go first (waiting at most GRACE for it
        to be answered), then mark the poll on the wire."""
        deadline = self._clock() + GRACE
        while (self.beat_due is not None and self._clock() >= self.beat_due - 0.05
               and self._clock() < deadline):
            self._scheduled.clear()
            try:
                await asyncio.wait_for(self._scheduled.wait(), deadline - self._clock())
            except TimeoutError:
                break
        self._poll_free.clear()

    def poll_back(self) -> None:
        self._poll_free.set()
