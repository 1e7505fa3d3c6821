"""Fast tier: a waiting long-poll looks at the database again only when woken; a lost
notification is made good by the hub's catch-up pass (dispatcher.catch_up)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from outpost.hub import notify
from outpost.hub.dispatcher import Dispatcher
from tests.inproc import FAST, InprocHub

pytestmark = FAST


def _stop_background_catch_up(hub: InprocHub) -> None:
    """The test runs each pass itself, so none happens behind its back."""
    assert hub.hub.tasks is not None
    hub.hub.tasks.tasks["catch-up"].cancel()


async def _waiting(hub: InprocHub, key: str) -> None:
    for _ in range(200):
        if hub.hub.notifier._waiters.get(key):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no poller waits on {key}")


async def test_a_job_whose_wake_up_was_lost_is_found_by_the_next_pass(
        fast_hub: InprocHub, monkeypatch: pytest.MonkeyPatch) -> None:
    _stop_background_catch_up(fast_hub)
    await fast_hub.runbook()
    machine = await fast_hub.machine("m1")
    poll = asyncio.create_task(machine.poll(capacity=1, wait=20))
    await _waiting(fast_hub, notify.group(fast_hub.init.account_id, "web"))

    async def lost(_conn: Any, _keys: tuple[str, ...]) -> None:
        return None

    monkeypatch.setattr(fast_hub.hub.notifier, "publish_wake", lost)
    job_id = await fast_hub.start_job()
    monkeypatch.undo()
    await asyncio.sleep(0.3)
    assert not poll.done(), "the poller was woken although the wake-up was dropped"

    await fast_hub.hub.dispatcher.catch_up()
    assert fast_hub.hub.dispatcher.caught_up == 1
    items = await asyncio.wait_for(poll, 5)
    assert [item["id"] for item in items] == [job_id]
    # Claimed: nothing is open any more, and the next pass wakes nobody.
    await fast_hub.hub.dispatcher.catch_up()
    assert fast_hub.hub.dispatcher.caught_up == 0


async def test_work_nobody_could_take_wakes_nobody_again(
        fast_hub: InprocHub, monkeypatch: pytest.MonkeyPatch) -> None:
    _stop_background_catch_up(fast_hub)
    await fast_hub.runbook()
    machine = await fast_hub.machine("m1")
    await fast_hub.start_job()
    claims = 0
    claim = Dispatcher.claim

    async def counted(self: Dispatcher, *args: Any, **kw: Any) -> list[dict[str, Any]]:
        nonlocal claims
        claims += 1
        return await claim(self, *args, **kw)

    monkeypatch.setattr(Dispatcher, "claim", counted)
    # A machine with no free slot: it looks once and waits.
    poll = asyncio.create_task(machine.poll(capacity=0, wait=20))
    await _waiting(fast_hub, notify.machine(machine.id))
    assert claims == 1
    await fast_hub.hub.dispatcher.catch_up()  # the queued job is new to the pass: a look
    await asyncio.sleep(0.1)
    assert claims == 2
    for _ in range(3):  # the same open work: no look at all
        await fast_hub.hub.dispatcher.catch_up()
        assert fast_hub.hub.dispatcher.caught_up == 0
    await asyncio.sleep(0.1)
    assert claims == 2
    poll.cancel()


async def test_a_poll_after_an_empty_one_skips_its_claim_until_a_wake_up(
        fast_hub: InprocHub, monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle fleet's long-polls cost no claim each: a poll whose machine and group heard
    no wake-up since its machine last found nothing goes straight to waiting."""
    _stop_background_catch_up(fast_hub)
    await fast_hub.runbook()
    machine = await fast_hub.machine("m1")
    dispatcher = fast_hub.hub.dispatcher
    claims = 0
    claim = Dispatcher.claim

    async def counted(self: Dispatcher, *args: Any, **kw: Any) -> list[dict[str, Any]]:
        nonlocal claims
        claims += 1
        return await claim(self, *args, **kw)

    monkeypatch.setattr(Dispatcher, "claim", counted)
    assert await machine.poll(capacity=1) == []
    assert claims == 1
    for _ in range(3):
        assert await machine.poll(capacity=1) == []
    assert claims == 1 and dispatcher.skipped == 3

    # Another capacity is another question: it looks.
    assert await machine.poll(capacity=2) == []
    assert claims == 2

    # A job queued for its group wakes the group's key: the next poll looks, and takes it.
    job_id = await fast_hub.start_job()
    items = await machine.poll(capacity=2)
    assert [item["id"] for item in items] == [job_id]
    assert claims == 3

    # Work addressed to the machine (a ping's work item) wakes the machine's key.
    assert await machine.poll(capacity=2) == []  # its slot holds the job: nothing new
    before = claims
    await dispatcher.submit(fast_hub.init.account_id, "ping", {"sent_at": 0.0},
                            machine_id=machine.id)
    items = await machine.poll(capacity=2)
    assert [item["kind"] for item in items] == ["ping"] and claims == before + 1

    # Everything woken at once (a replica that reconnected): every poll looks again.
    assert await machine.poll(capacity=2) == []
    before = claims
    fast_hub.hub.notifier.wake_all()
    assert await machine.poll(capacity=2) == []
    assert claims == before + 1

    # A poll that waits out its time unwoken does not look again before it answers.
    fast_hub.hub.notifier.wake_all()
    before = claims
    assert await machine.poll(capacity=2, wait=0.3) == []
    assert claims == before + 1


async def test_a_wake_up_lost_between_polls_is_found_by_the_catch_up_pass(
        fast_hub: InprocHub, monkeypatch: pytest.MonkeyPatch) -> None:
    """A skipped claim never hides work for longer than a lost notification does: the
    catch-up pass wakes the group, which counts as a wake-up for the next poll."""
    _stop_background_catch_up(fast_hub)
    await fast_hub.runbook()
    machine = await fast_hub.machine("m1")
    assert await machine.poll(capacity=1) == []

    async def lost(_conn: Any, _keys: tuple[str, ...]) -> None:
        return None

    monkeypatch.setattr(fast_hub.hub.notifier, "publish_wake", lost)
    job_id = await fast_hub.start_job()
    monkeypatch.undo()
    assert await machine.poll(capacity=1) == [], "a poll looked although nothing woke it"
    await fast_hub.hub.dispatcher.catch_up()
    items = await machine.poll(capacity=1)
    assert [item["id"] for item in items] == [job_id]
