"""Heartbeats and the long-poll take turns on one connection.

An agent's long-poll holds a connection open almost all the time, and a heartbeat sent
meanwhile needs a second one: two descriptors on the hub for every agent, which is what
limits how many agents one hub process serves (its descriptor limit; 20,000 allows 9,900
agents). Instead the heartbeat goes out on the connection the poll has just freed, before
the next poll starts. When the next heartbeat would fall due while the next poll is held,
the poll loop asks for it at once (``early``) if heartbeats are no more frequent than
polls (a heartbeat every 30 s beside polls of 25 s: both every 25 s, two requests where
the two connections made 2.2 per 30 s); when heartbeats are the more frequent, the poll is
held only until the next one is due. An idle agent then keeps one connection; one with
running jobs opens a second for its reports, as before.

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
    """The heartbeat loop sleeps until its next beat or until ``early`` is set, calls
    ``beat_turn`` before sending and ``next_beat`` once answered (or failed). The poll loop
    calls ``poll_turn`` (which says how long to hold the poll) before sending it and
    ``poll_back`` when it returns."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # Clock time of the next heartbeat: the first is due at once, so the first poll
        # waits for it (GRACE at most).
        self.beat_due: float = clock()
        self.cadence: float | None = None  # seconds between heartbeats
        self.early = asyncio.Event()  # set: send the heartbeat now
        self._poll_free = asyncio.Event()  # set while no poll is on the wire
        self._poll_free.set()
        self._scheduled = asyncio.Event()  # set when the next heartbeat is scheduled

    # --- the heartbeat loop --------------------------------------------------------------
    def next_beat(self, delay: float, cadence: float | None = None) -> None:
        """The heartbeat is answered (or failed); the next one is due ``delay`` seconds from
        now (``cadence``: the usual time between them, by default ``delay``)."""
        self.beat_due = self._clock() + delay
        self.cadence = delay if cadence is None else cadence
        self.early.clear()
        self._scheduled.set()

    async def beat_turn(self) -> None:
        """A heartbeat is due: wait (at most GRACE) for the poll on the wire to come back."""
        if not self._poll_free.is_set():
            try:
                await asyncio.wait_for(self._poll_free.wait(), GRACE)
            except TimeoutError:
                pass  # it goes on a connection of its own

    # --- the poll loop -------------------------------------------------------------------
    async def poll_turn(self, wait: float) -> float:
        """Before a poll that would be held ``wait`` seconds: let a heartbeat that is due,
        or would fall due meanwhile, go first (waiting at most GRACE for its answer); mark
        the poll on the wire, and return how long to hold it."""
        left = self.beat_due - self._clock()
        if left < wait:
            asked = left > 0.05 and self.cadence is not None and self.cadence >= wait
            if asked or left <= 0.05:
                self._scheduled.clear()
                if asked:
                    self.early.set()  # beat now, then hold the poll its whole time
                try:  # until the heartbeat is answered and the next one scheduled
                    await asyncio.wait_for(self._scheduled.wait(), GRACE)
                except TimeoutError:
                    pass
                left = self.beat_due - self._clock()
        self._poll_free.clear()
        return wait if left >= wait else max(MIN_HOLD, left)

    def poll_back(self) -> None:
        self._poll_free.set()
