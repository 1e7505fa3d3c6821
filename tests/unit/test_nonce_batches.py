"""Fast tier: signed agent requests' nonces are stored in batches (auth.NonceWriter): a
heartbeat's and a long-poll's wait for others to share one transaction, every other
request's is written at once, and a replay is refused whether it meets its original in the
same batch or in the database."""

from __future__ import annotations

import asyncio

import pytest

from outpost.hub import auth
from outpost.protocol.errors import OutpostError
from tests.inproc import FAST, InprocHub

pytestmark = FAST


async def test_heartbeats_share_a_transaction_and_others_do_not_wait(
        fast_hub: InprocHub) -> None:
    machines = [await fast_hub.machine(f"m{i}") for i in range(6)]
    writer = auth.nonce_writer(fast_hub.hub.engine)
    before = writer.batches
    await asyncio.gather(*(m.heartbeat() for m in machines))
    assert writer.batches - before < len(machines), (
        f"{len(machines)} heartbeats took {writer.batches - before} nonce transactions")

    # A request that does not wait (a job report, here a registration read) is stored at
    # once: it does not sit out the window.
    writer.window = 5.0
    try:
        started = asyncio.get_running_loop().time()
        answer = await machines[0].call("GET", "/v1/agent/registration")
        assert answer.status_code == 200, answer.text
        assert asyncio.get_running_loop().time() - started < 2.0
    finally:
        writer.window = auth.NONCE_WINDOW


async def test_a_nonce_seen_before_is_refused_in_the_same_batch_and_after_it(
        fast_hub: InprocHub) -> None:
    machine = await fast_hub.machine("m1")
    engine = fast_hub.hub.engine

    async def seen(nonce: str, wait: bool) -> str:
        try:
            await auth._first_seen(engine, machine.id, nonce, wait=wait, machine_id=machine.id)
        except OutpostError as exc:
            return exc.code
        return "ok"

    # Twice in one batch: the second is refused before anything is written.
    results = await asyncio.gather(seen("n-1", True), seen("n-1", True), seen("n-2", True))
    assert sorted(results) == ["E1009", "ok", "ok"]
    # Against the database: alone, and in a batch with fresh nonces (which still pass).
    assert await seen("n-1", False) == "E1009"
    results = await asyncio.gather(seen("n-3", True), seen("n-2", True), seen("n-4", True))
    assert results == ["ok", "E1009", "ok"]
    assert await seen("n-3", False) == "E1009" and await seen("n-4", True) == "E1009"


@pytest.mark.parametrize("path", ["/v1/agent/heartbeat", "/v1/agent/poll"])
async def test_a_replayed_batched_request_is_refused(fast_hub: InprocHub, path: str) -> None:
    machine = await fast_hub.machine("m1")
    body = b'{"agent_version": "0.0.0", "heartbeat_interval": 30}' if "heart" in path else b""
    query = "?wait=0&capacity=0" if "poll" in path else ""
    first = await machine.call("POST", path + query, body)
    assert first.status_code == 200, first.text
    again = await machine.replay(first.request)
    assert again.status_code == 401 and again.json()["code"] == "E1009", again.text


async def test_an_outage_while_storing_a_nonce_is_an_outage_not_a_replay(
        fast_hub: InprocHub, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch that fails because the database is gone answers E3007 (so the agent tries the
    next hub), never E1009 (which it would take as its own fault)."""
    from outpost.hub.db import DatabaseUnavailable

    machine = await fast_hub.machine("m1")

    async def gone(self: auth.NonceWriter, batch: object) -> None:
        raise DatabaseUnavailable("refused", "the test cut it")

    monkeypatch.setattr(auth.NonceWriter, "write", gone)
    for wait in (True, False):
        with pytest.raises(DatabaseUnavailable):
            await auth._first_seen(fast_hub.hub.engine, machine.id, f"n-{wait}", wait=wait,
                                   machine_id=machine.id)
