"""Backpressure (HW-1b, EX-7): take no new job while the machine is short of CPU or memory.

A machine that accepts jobs it cannot serve starves them until they time out. The agent
samples CPU and memory, and when either stays above its threshold for the configured time it
stops claiming jobs and says why; the hub shows that reason in the machine list.

CPU is counted without the agent and its own runbooks: a busy agent is the machine doing the
work it was given, and counting it would make an agent at full capacity stop itself, then
start again once idle, over and over. What the threshold watches is everything else on the
machine, the load that would starve the jobs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import psutil


def own_cpu_seconds(leaders: Callable[[], list[int]]) -> Callable[[], float]:
    """CPU seconds used by this process and its runbooks so far: the ones that ended (and
    were waited for) through os.times(), the running ones through their process leaders,
    whose own ended children are counted in theirs."""
    def total() -> float:
        mine = os.times()
        used = mine.user + mine.system + mine.children_user + mine.children_system
        for pid in leaders():
            try:
                t = psutil.Process(pid).cpu_times()
            except psutil.Error:
                continue
            used += t.user + t.system + t.children_user + t.children_system
        return used
    return total


class Pressure:
    def __init__(self, max_cpu: float, max_memory: float, seconds: float,
                 own_cpu: Callable[[], float] | None = None) -> None:
        self.max_cpu = max_cpu
        self.max_memory = max_memory
        self.seconds = seconds
        self._own = own_cpu
        self._cpus = psutil.cpu_count() or 1
        self._since: dict[str, float] = {}
        self._last: tuple[float, str | None] = (0.0, None)
        self._own_at = (time.monotonic(), own_cpu() if own_cpu else 0.0)
        psutil.cpu_percent(interval=None)  # the first reading only starts the count

    def retune(self, max_cpu: float, max_memory: float, seconds: float) -> None:
        """New thresholds, judged from the next look on (the config read again on SIGHUP);
        how long each reading has been over its threshold is kept."""
        self.max_cpu, self.max_memory, self.seconds = max_cpu, max_memory, seconds
        self._last = (0.0, None)

    def _cpu_of_others(self, now: float) -> float:
        busy = psutil.cpu_percent(interval=None)
        if self._own is None:
            return busy
        used = self._own()
        then, before = self._own_at
        self._own_at = (now, used)
        if now <= then:
            return busy
        mine = 100.0 * (used - before) / ((now - then) * self._cpus)
        return max(0.0, busy - mine)

    def reason(self, now: float | None = None) -> str | None:
        """Why no job should be claimed now, or None. Sampled at most once a second."""
        now = time.monotonic() if now is None else now
        if now - self._last[0] < 1.0:
            return self._last[1]
        readings = {"CPU": (self._cpu_of_others(now), self.max_cpu),
                    "memory": (psutil.virtual_memory().percent, self.max_memory)}
        why = None
        for name, (value, limit) in readings.items():
            if value <= limit:
                self._since.pop(name, None)
                continue
            since = self._since.setdefault(name, now)
            if now - since >= self.seconds and why is None:
                what = "CPU used by other processes than this agent and its jobs" \
                    if name == "CPU" and self._own else name
                why = (f"{what} at {value:.0f}% has been above the {limit:g}% threshold for "
                       f"{now - since:.0f} s")
        self._last = (now, why)
        return why
