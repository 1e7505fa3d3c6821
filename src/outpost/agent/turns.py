"""The heartbeat rides on the long-poll: one request, on one connection, for both.

An agent's long-poll holds a connection open almost all the time. A heartbeat sent beside
it would need a second connection (two descriptors on the hub for every agent), and even
on the same connection, between two polls, it is a second request the hub must verify,
route and answer. So the poll carries the heartbeat in its body (``PollRequest``): the hub
records it as the poll arrives and acknowledges it in the poll's answer. An idle agent makes
one request per poll.

``Turns`` decides, before each poll, whether it carries the heartbeat and how long the hub
may hold it:

- heartbeats no more frequent than polls (every 30 s beside polls of 25 s): a poll during
  which the next heartbeat would fall due carries it at once and is held its whole time
  (heartbeats then go every 25 s, one request where there were two);
- heartbeats more frequent than polls: the poll is held only until the next heartbeat is
  due, and the next poll carries it (one due within ``MIN_HOLD`` rides on this one).

The heartbeat loop sends a heartbeat on its own only when one falls due and no poll has
carried it: the poll loop is backing off after a failure, a poll that carried one failed
(``beat_lost``), the hub did not acknowledge it (an older hub), or a poll is held past its
time. It first gives the poll loop ``GRACE`` seconds to carry the heartbeat (a poll on the
wire comes back and the next one takes it), so two requests are on the wire at once only
when a poll is held past its time; neither loop waits for the other longer than that.

A hub that answers a carrying poll without an acknowledgement takes no heartbeat in a poll
(it is older than the agent): from then on (``carrying`` False) each poll is held only
until the next heartbeat is due, and the heartbeat goes on the connection that poll frees,
before the next poll starts: still one connection, two requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from outpost.common.events import first_of

# How long the heartbeat loop waits for a poll on the wire to come back, at most.
GRACE = 2.0
# A poll is not held for less than this (or half the heartbeats' cadence, when shorter): a
# heartbeat due sooner rides on the poll at once.
MIN_HOLD = 1.0
# A heartbeat due this soon counts as due.
SLACK = 0.05


class Turns:
    """Shared by the heartbeat loop and the poll loop of one agent.

    The poll loop calls ``poll_turn`` before each poll: it returns how long to hold the poll
    and whether the poll carries the heartbeat (the next one is then scheduled at once),
    and ``beat_lost`` when a poll that carried the heartbeat was not acknowledged. The
    heartbeat loop waits with ``until_due``, calls ``beat_turn`` and, if ``due()`` still
    holds, sends the heartbeat itself and calls ``next_beat``."""

    def __init__(self, cadence: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # Clock time of the next heartbeat: the first is due at once (the first poll
        # carries it).
        self.beat_due: float = clock()
        self.cadence = cadence  # seconds between heartbeats
        self.carried = 0  # heartbeats the polls have carried
        # False once the hub did not acknowledge a carried heartbeat (a hub older than
        # this agent): heartbeats then go on their own, between polls.
        self.carrying = True
        self._changed = asyncio.Event()  # set when beat_due moves
        # Without carrying: set when a heartbeat was sent (next_beat), and while no poll is
        # on the wire; the two loops take turns on the connection with them.
        self._beat_sent = asyncio.Event()
        self._poll_free = asyncio.Event()
        self._poll_free.set()

    def _move(self, due: float) -> None:
        self.beat_due = due
        self._changed.set()

    # --- the heartbeat loop --------------------------------------------------------------
    def due(self) -> bool:
        return self.beat_due - self._clock() <= SLACK

    async def until_due(self, most: float, stop: asyncio.Event | None = None) -> None:
        """Sleep until the heartbeat is due, ``most`` seconds have passed or ``stop`` is
        set, whichever is first (a poll that carries the heartbeat moves its time on
        meanwhile)."""
        end = self._clock() + most
        while not self.due() and not (stop is not None and stop.is_set()):
            left = min(self.beat_due, end) - self._clock()
            if left <= 0:
                return
            self._changed.clear()
            await first_of([self._changed, stop], left)

    def next_beat(self, delay: float, cadence: float | None = None) -> None:
        """A heartbeat was answered (or failed); the next one is due ``delay`` seconds from
        now (``cadence``: the usual time between them, by default ``delay``)."""
        self.cadence = delay if cadence is None else cadence
        self._move(self._clock() + delay)
        self._beat_sent.set()

    async def beat_turn(self) -> None:
        """A heartbeat is due: give the poll loop GRACE seconds to carry it (the poll on
        the wire comes back and the next one takes it); the caller sends it on its own if
        it is still due after that. Without carrying: wait (GRACE at most) for the poll on
        the wire to come back, and send it on the connection that poll frees."""
        end = self._clock() + GRACE
        if not self.carrying:
            if not self._poll_free.is_set():
                try:
                    await asyncio.wait_for(self._poll_free.wait(), GRACE)
                except TimeoutError:
                    pass  # it goes on a connection of its own
            return
        while self.due() and self._clock() < end:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), end - self._clock())
            except TimeoutError:
                pass

    # --- the poll loop -------------------------------------------------------------------
    async def poll_turn(self, wait: float) -> tuple[float, bool]:
        """Before a poll that would be held ``wait`` seconds: how long to hold it, and
        whether it carries the heartbeat (the next one is then scheduled). Marks the poll
        on the wire until ``poll_back``."""
        if not self.carrying:  # the heartbeat goes first, on this connection (GRACE at most)
            if self.due():
                self._beat_sent.clear()
                try:
                    await asyncio.wait_for(self._beat_sent.wait(), GRACE)
                except TimeoutError:
                    pass
            left = self.beat_due - self._clock()
            self._poll_free.clear()
            return (wait if left >= wait else max(MIN_HOLD, left)), False
        now = self._clock()
        left = self.beat_due - now
        cadence = self.cadence
        # Carried now: a heartbeat due (or about to be), one that would fall due during a
        # poll when heartbeats are no more frequent than polls, or one due sooner than a
        # poll worth holding (MIN_HOLD, or half the cadence when that is shorter).
        soon = MIN_HOLD if cadence is None else min(MIN_HOLD, cadence / 2)
        carry = left <= max(SLACK, soon) or (
            left < wait and (cadence is None or cadence >= wait))
        if carry:
            self.carried += 1
            # The next one a cadence on (before the first answer: after this poll).
            left = cadence if cadence is not None else wait + GRACE
            self._move(now + left)
        self._poll_free.clear()
        return min(wait, left), carry

    def poll_back(self) -> None:
        """The poll is no longer on the wire."""
        self._poll_free.set()

    def beat_lost(self, refused: bool = False) -> None:
        """The heartbeat a poll carried was not acknowledged: it is due again at once.
        ``refused``: the hub answered the poll without an acknowledgement, so it takes no
        heartbeat in a poll; they go on their own from now on."""
        if refused:
            self.carrying = False
        self._move(self._clock())
