"""When a module that ended is started again: a pure schedule, no clock of its own.

After each failure the wait doubles from ``base`` up to ``cap`` (base, 2 base, 4 base, ...);
a run that lasted ``reset_after`` seconds or more clears the count first, so a module that
crashes once a day always waits ``base``; once ``max_restarts`` restarts in a row have been
used up, the next end makes the module ``failed`` (``next_wait`` answers None) until
``reset`` (a new deployment, or ``outpost agent restart MODULE``).
"""

from __future__ import annotations

from dataclasses import dataclass

from outpost.protocol.modreaders import Backoff


@dataclass
class Schedule:
    base: float
    cap: float
    reset_after: float
    max_restarts: int
    restarts: int = 0  # restarts in a row since the last reset

    @classmethod
    def of(cls, spec: Backoff) -> Schedule:
        return cls(spec.base_seconds, spec.cap_seconds, spec.reset_after_seconds,
                   spec.max_restarts)

    def wait_for(self, restarts: int) -> float:
        """The wait before restart number ``restarts + 1`` in a row."""
        if self.base >= self.cap:
            return self.cap
        # 2**restarts overflows a float far beyond any cap: stop doubling at the cap.
        wait = self.base
        for _ in range(restarts):
            wait *= 2
            if wait >= self.cap:
                return self.cap
        return wait

    def next_wait(self, ran_for: float) -> float | None:
        """A run of ``ran_for`` seconds ended: the wait before the next start, counted as a
        restart, or None when the restarts are used up (the module is failed)."""
        if ran_for >= self.reset_after:
            self.restarts = 0
        if self.restarts >= self.max_restarts:
            return None
        wait = self.wait_for(self.restarts)
        self.restarts += 1
        return wait

    def reset(self) -> None:
        self.restarts = 0
