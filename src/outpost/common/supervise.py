"""One supervisor for background tasks, used by the hub and the agent.

A supervised task is a coroutine function run in a loop: ``period`` says how long to wait
between runs (a periodic task) or ``None`` when the body is itself a loop that should run
once and only be started again if it fails. A failure is logged with the task's name and
the body is started again after a backoff that doubles up to ``backoff_cap``; cancelling the
supervisor (``stop``) cancels every task and waits for them, cancelling again any task
that swallowed its cancellation.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

Body = Callable[[], Awaitable[None]]


class Supervisor:
    def __init__(self, log: logging.Logger,
                 quiet: tuple[type[BaseException], ...] = ()) -> None:
        """``quiet``: exception types logged at debug level only (the hub's database outage,
        which the engine's health already logs once)."""
        self._log = log
        self._quiet = quiet
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._busy: set[str] = set()  # tasks inside their body (not between turns)
        self._ending: set[str] = set()

    def start(self, name: str, body: Body, *, period: float | None = None,
              backoff_cap: float = 30.0) -> asyncio.Task[None]:
        async def supervised() -> None:
            delay = 0.0
            while name not in self._ending:
                try:
                    self._busy.add(name)
                    await body()
                except asyncio.CancelledError:
                    raise
                except self._quiet as exc:
                    self._log.debug("task %s: %s", name, exc)
                    delay = min(max(delay * 2, 0.5), backoff_cap)
                except Exception:
                    delay = min(max(delay * 2, 0.5), backoff_cap)
                    self._log.exception("task %s failed; starting it again in %.1f s", name,
                                        period if period is not None else delay)
                else:
                    if period is None:
                        return
                    delay = 0.0
                finally:
                    self._busy.discard(name)
                if name in self._ending:
                    return
                # Jittered, and never past the cap.
                wait = period if period is not None \
                    else min(delay * random.uniform(0.8, 1.2), backoff_cap)
                await asyncio.sleep(wait)

        task = asyncio.create_task(supervised(), name=name)
        self.tasks[name] = task
        return task

    # A task that swallowed its cancellation is cancelled again this often: Python 3.11's
    # asyncio.wait_for returns the result of an inner wait that finished in the same turn as
    # the cancellation instead of raising it, and a loop around it then sleeps on.
    RECANCEL = 0.5

    async def end(self, name: str) -> None:
        """End one task between two turns of its body (a turn that is running finishes
        first: cancelling it could cut a database connection in the middle of a query)."""
        task = self.tasks.pop(name)
        self._ending.add(name)
        if name not in self._busy:
            task.cancel()  # it is sleeping between turns
        await asyncio.gather(task, return_exceptions=True)
        self._ending.discard(name)

    async def stop(self) -> None:
        pending = {task for task in self.tasks.values() if not task.done()}
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=self.RECANCEL)
            for task in pending:
                self._log.debug("task %s did not end when cancelled; cancelling it again",
                                task.get_name())
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        self.tasks.clear()
