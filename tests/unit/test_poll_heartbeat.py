"""Fast tier: a long-poll that carries the heartbeat (``PollRequest``). The hub records it
as the poll arrives, exactly as ``POST /v1/agent/heartbeat`` would (the machine's last
heartbeat, the leases it lists), and acknowledges it in the poll's answer; a poll without
one is answered as before; a malformed one is refused with the validation code and
nothing is recorded."""

from __future__ import annotations

import time

from outpost import __version__
from outpost.hub import jobs
from tests.inproc import FAST, Clock, InprocHub

pytestmark = FAST


def _beat(held: list[tuple[str, int]] = (), interval: float = 1.0) -> dict[str, object]:
    return {"agent_version": __version__, "heartbeat_interval": interval,
            "running_jobs": len(held), "jobs": [{"id": j, "attempt": a} for j, a in held]}


async def _last_beat(hub: InprocHub, name: str) -> float | None:
    answer = await hub.http.get("/v1/machines", headers={
        "Authorization": f"Bearer {hub.admin_token}"})
    assert answer.status_code == 200, answer.text
    found = [m for m in answer.json() if m["name"] == name]
    assert found, answer.json()
    value = found[0]["last_heartbeat_at"]
    return None if value is None else float(value)


async def test_a_poll_carries_the_heartbeat_and_its_answer_acknowledges_it(
        fast_hub_any: InprocHub) -> None:
    hub = fast_hub_any
    machine = await hub.machine("m1")
    assert await _last_beat(hub, "m1") is None
    before = time.time()
    answer = await machine.ok("POST", "/v1/agent/poll?wait=0&capacity=1",
                              {"heartbeat": _beat()})
    assert answer["items"] == []
    ack = answer["heartbeat"]
    assert ack["machine_id"] == machine.id and ack["abandon"] == []
    assert ack["hub_time"] >= before and "extensions_etag" in ack
    beat_at = await _last_beat(hub, "m1")
    assert beat_at is not None and beat_at >= before - 1
    # A poll alone records nothing and acknowledges nothing.
    answer = await machine.ok("POST", "/v1/agent/poll?wait=0&capacity=1")
    assert "heartbeat" not in answer
    assert await _last_beat(hub, "m1") == beat_at


async def test_a_carried_heartbeat_renews_leases_and_answers_what_to_abandon(
        fast_hub: InprocHub, hub_clock: Clock) -> None:
    hub = fast_hub
    await hub.stop_task("reap-leases")  # the test's own passes judge the leases
    await hub.runbook()
    machine = await hub.machine("m1")
    await machine.heartbeat(interval=1)
    job_id = await hub.start_job()
    assert await machine.claimed() == [job_id]
    reaper = jobs.Reaper(hub.hub.engine)
    await reaper()
    for _ in range(3):  # three times the lease, renewed by polls only
        hub_clock.advance(jobs.LEASE_MIN - 1)
        answer = await machine.ok("POST", "/v1/agent/poll?wait=0&capacity=0",
                                  {"heartbeat": _beat([(job_id, 1)])})
        assert answer["heartbeat"]["abandon"] == []
        await reaper()
        assert (await hub.job(job_id))["status"] == "Activating"
    hub_clock.advance(jobs.LEASE_MIN + 1)
    await reaper()
    answer = await machine.ok("POST", "/v1/agent/poll?wait=0&capacity=0",
                              {"heartbeat": _beat([(job_id, 1)])})
    assert answer["heartbeat"]["abandon"] == [job_id]


async def test_a_malformed_carried_heartbeat_is_refused_and_records_nothing(
        fast_hub: InprocHub) -> None:
    hub = fast_hub
    machine = await hub.machine("m1")
    for body in ({"heartbeat": {"agent_version": __version__, "heartbeat_interval": -1}},
                 {"heartbeat": "now"}, b"{not json", b"[]"):
        refused = await machine.call("POST", "/v1/agent/poll?wait=0&capacity=1", body)
        assert refused.status_code == 422, (body, refused.text)
        assert refused.json()["code"] == "E3003", refused.json()  # invalid_request
    assert await _last_beat(hub, "m1") is None


async def test_a_heartbeat_that_arrived_before_a_stop_notice_does_not_undo_it(
        fast_hub_any: InprocHub) -> None:
    """A poll that carries a heartbeat is written in a batch, and may commit after the stop
    notice its agent sent next: the stop stands. A heartbeat that arrives after the stop
    ends it, as before."""
    from outpost.hub import heartbeats

    hub = fast_hub_any
    machine = await hub.machine("m1")
    await machine.ok("POST", "/v1/agent/poll?wait=0&capacity=1", {"heartbeat": _beat()})
    arrived = time.time()
    await machine.ok("POST", "/v1/agent/stopping", {})
    # Committed now, but received before the stop notice.
    await heartbeats.writer(hub.hub.engine).record(machine.id, {
        "b_at": arrived, "b_at_stop": arrived, "b_beat": _beat(),
        "b_interval": 1.0, "b_version": __version__, "b_run": None})
    assert await _status(hub, "m1") == "Stopped"
    await machine.ok("POST", "/v1/agent/poll?wait=0&capacity=1", {"heartbeat": _beat()})
    assert await _status(hub, "m1") == "Healthy"


async def test_a_heartbeat_of_the_run_that_stopped_never_undoes_the_stop(
        fast_hub_any: InprocHub) -> None:
    """An agent names its run in heartbeats and in its stop notice. A heartbeat it sent
    before the notice may reach the hub after it (a poll cancelled in flight, handled late):
    however late it arrives, the stop stands. The next run's first heartbeat ends it."""
    hub = fast_hub_any
    machine = await hub.machine("m1")
    await machine.ok("POST", "/v1/agent/poll?wait=0&capacity=1",
                     {"heartbeat": {**_beat(), "run": "run-one"}})
    await machine.ok("POST", "/v1/agent/stopping", {"run": "run-one"})
    assert await _status(hub, "m1") == "Stopped"
    # Arrives after the notice, from the same run: on its own and carried by a poll.
    await machine.ok("POST", "/v1/agent/heartbeat", {**_beat(), "run": "run-one"})
    await machine.ok("POST", "/v1/agent/poll?wait=0&capacity=1",
                     {"heartbeat": {**_beat(), "run": "run-one"}})
    assert await _status(hub, "m1") == "Stopped"
    await machine.ok("POST", "/v1/agent/poll?wait=0&capacity=1",
                     {"heartbeat": {**_beat(), "run": "run-two"}})
    assert await _status(hub, "m1") == "Healthy"
    # Stopped again by the second run; a heartbeat that names no run (an older agent)
    # arriving after the notice ends it, as before.
    await machine.ok("POST", "/v1/agent/stopping", {"run": "run-two"})
    assert await _status(hub, "m1") == "Stopped"
    await machine.ok("POST", "/v1/agent/heartbeat", _beat())
    assert await _status(hub, "m1") == "Healthy"


async def _status(hub: InprocHub, name: str) -> str:
    answer = await hub.http.get("/v1/machines", headers={
        "Authorization": f"Bearer {hub.admin_token}"})
    return str(next(m for m in answer.json() if m["name"] == name)["status"])
