"""Backpressure (HW-1b, EX-7): take no new job while the machine is short of CPU or memory.

A machine that accepts jobs it cannot serve starves them until they time out. The agent
samples CPU and memory, and when either stays above its threshold for the configured time it
stops claiming jobs and says why; the hub shows that reason in the machine list.
"""

from __future__ import annotations

import time

import psutil


class Pressure:
    def __init__(self, max_cpu: float, max_memory: float, seconds: float) -> None:
        self.max_cpu = max_cpu
        self.max_memory = max_memory
        self.seconds = seconds
        self._since: dict[str, float] = {}
        self._last: tuple[float, str | None] = (0.0, None)
        psutil.cpu_percent(interval=None)  # the first reading only starts the count

    def reason(self, now: float | None = None) -> str | None:
        """Why no job should be claimed now, or None. Sampled at most once a second."""
        now = time.monotonic() if now is None else now
        if now - self._last[0] < 1.0:
            return self._last[1]
        readings = {"CPU": (psutil.cpu_percent(interval=None), self.max_cpu),
                    "memory": (psutil.virtual_memory().percent, self.max_memory)}
        why = None
        for name, (value, limit) in readings.items():
            if value <= limit:
                self._since.pop(name, None)
                continue
            since = self._since.setdefault(name, now)
            if now - since >= self.seconds and why is None:
                why = (f"{name} at {value:.0f}% has been above the {limit:g}% threshold for "
                       f"{now - since:.0f} s")
        self._last = (now, why)
        return why
