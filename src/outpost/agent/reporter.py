"""One channel for every attempt's reports: many reports in one request.

Each attempt's uploader (runner.py) hands its next report to the ``Reporter`` and waits for
the hub's answer to it. The reporter sends what has gathered while its previous requests
were out (at most IN_FLIGHT at once), up to REPORTS_MAX reports or BATCH_BYTES, as one
``POST /v1/agent/reports``; when a
report in it ends an attempt, the request also asks for work for the slots that freed up, and
the hub answers with the jobs it claimed (the long-poll stays for everything else). So an
agent that runs many short jobs makes about one request per batch of ends, not a report and
a long-poll answer per job.

A batch that does not reach the hub is sent again with backoff, whole (the hub keeps each
record once, and an end twice changes nothing); a report the hub refuses fails only its own
attempt's delivery. A hub without the endpoint (older than the agent) gets one request per
report, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from outpost.protocol.errors import HubRefused, OutpostError

from .transport import Backoff

log = logging.getLogger("outpost.agent.job")

Call = Callable[..., Awaitable[Any]]
REPORTS_MAX = 64
# Requests out at once: while one is on its way, the reports that gather go in the next, so
# an attempt's end waits for the hub's answer to its own batch only.
IN_FLIGHT = 2
BATCH_BYTES = 1024 * 1024
PATH = "/v1/agent/reports"


class _Pending:
    __slots__ = ("job_id", "body", "ends", "answer")

    def __init__(self, job_id: str, body: bytes, ends: bool,
                 answer: asyncio.Future[dict[str, Any]]) -> None:
        self.job_id = job_id
        self.body = body
        self.ends = ends
        self.answer = answer


class Reporter:
    """Gathers reports and sends them in batches, at most IN_FLIGHT requests at a time.

    ``capacity`` tells how many jobs the agent takes at once now (0 while it takes none);
    ``take`` is given the work items the hub claimed in an answer.
    """

    def __init__(self, call: Call, capacity: Callable[[], int],
                 take: Callable[[list[dict[str, Any]]], Awaitable[None]]) -> None:
        self.call = call
        self.capacity = capacity
        self.take = take
        self.batched = True  # False once the hub has shown it lacks the endpoint
        self._queue: list[_Pending] = []
        self._more = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def report(self, job_id: str, body: bytes, ends: bool) -> dict[str, Any]:
        """Deliver one attempt's report (a JSON object with ``attempt``, ``started``,
        ``end`` and ``records``); returns the hub's answer, ``{"id", "status"}``. Raises
        HubRefused if the hub refuses this report."""
        if not self.batched:
            return await self._single(job_id, body)
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(job_id, body, ends, answer))
        self._more.set()
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._run(), name=f"reporter-{n}")
                           for n in range(IN_FLIGHT)]
        return await answer

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _single(self, job_id: str, body: bytes) -> dict[str, Any]:
        backoff = Backoff(cap=10)
        while True:
            try:
                answer: dict[str, Any] = await self.call(
                    "POST", f"/v1/agent/jobs/{job_id}/report", body)
                return answer
            except OutpostError as exc:
                if isinstance(exc, HubRefused) and exc.status < 500:
                    raise
                delay = backoff.next()
                log.warning("job %s: report not delivered (%s); again in %.1f s", job_id,
                            exc.message, delay)
                await asyncio.sleep(delay)

    def _next_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        size = 0
        while self._queue and len(batch) < REPORTS_MAX:
            item = self._queue[0]
            if batch and size + len(item.body) > BATCH_BYTES:
                break
            self._queue.pop(0)
            if item.answer.done():  # its uploader was cancelled (the agent is stopping)
                continue
            batch.append(item)
            size += len(item.body)
        return batch

    async def _run(self) -> None:
        backoff = Backoff(cap=10)
        while True:
            await self._more.wait()
            self._more.clear()
            while self._queue:
                batch = self._next_batch()
                if not batch:
                    continue
                try:
                    await self._send(batch)
                except OutpostError as exc:
                    if isinstance(exc, HubRefused) and exc.status == 404 \
                            and exc.message.startswith("No such API path"):
                        self._fall_back(batch)
                        continue
                    if isinstance(exc, HubRefused) and exc.status < 500:
                        for item in batch:  # the whole request was refused (its signature)
                            if not item.answer.done():
                                item.answer.set_exception(exc)
                        continue
                    self._queue[:0] = batch  # again, whole, and first
                    delay = backoff.next()
                    log.warning("%d job reports not delivered (%s); again in %.1f s",
                                len(batch), exc.message, delay)
                    await asyncio.sleep(delay)
                    continue
                backoff.reset()

    async def _send(self, batch: list[_Pending]) -> None:
        claim = self.capacity() if any(item.ends for item in batch) else 0
        body = b'{"claim":%d,"reports":[%s]}' % (claim, b",".join(
            b'{"job_id":"%s",%s' % (item.job_id.encode(), item.body[1:]) for item in batch))
        answer: dict[str, Any] = await self.call("POST", PATH, body)
        for item, result in zip(batch, answer.get("results") or [], strict=False):
            if item.answer.done():
                continue
            if "error" in result:
                item.answer.set_exception(HubRefused(422, result["error"] or {}))
            else:
                item.answer.set_result(result)
        for item in batch:  # an answer that left one out: send that report again
            if not item.answer.done():
                self._queue.append(item)
        items = answer.get("items") or []
        if items:
            await self.take(items)

    def _fall_back(self, batch: list[_Pending]) -> None:
        log.info("the hub has no %s; reporting each job on its own", PATH)
        self.batched = False
        for item in batch + self._queue:
            if not item.answer.done():
                task = asyncio.create_task(self._single(item.job_id, item.body))
                task.add_done_callback(functools.partial(_settle, item.answer))
        self._queue.clear()


def _settle(answer: asyncio.Future[dict[str, Any]], task: asyncio.Task[dict[str, Any]]
            ) -> None:
    if answer.done():
        return
    if task.cancelled():
        answer.cancel()
    elif task.exception() is not None:
        answer.set_exception(task.exception())  # type: ignore[arg-type]
    else:
        answer.set_result(task.result())
