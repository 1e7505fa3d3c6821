"""Waiting for the first of several asyncio events."""

from __future__ import annotations

import asyncio


async def first_of(events: list[asyncio.Event | None], timeout: float) -> None:
    """Return when one of ``events`` (None ones left out) is set, or after ``timeout``
    seconds, whichever comes first."""
    waits = [asyncio.ensure_future(event.wait()) for event in events if event is not None]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
