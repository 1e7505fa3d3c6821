"""Several real hub processes on one PostgreSQL database: wake-ups, cache invalidation,
ping and job control across replicas, scheduler failover, agents failing over between hub
URLs, and the listening connection's reconnection."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import Agent, Hub, init_hub, machine_calls, publish_script, query
from tests.support import registered_agent, wait_until

Replicas = Callable[[int], list[Hub]]


@pytest.fixture
def replicas(postgres_url: str, tmp_path: Path) -> Iterator[Replicas]:
    """``replicas(n)``: n running hub processes on one database and data directory (the
    first initialises both), each on its own port; all are stopped after the test."""
    started: list[Hub] = []

    def start(count: int) -> list[Hub]:
        first = init_hub(tmp_path / "hub", postgres_url)
        started.append(first.start())  # runs the migrations alone
        for _ in range(count - 1):
            started.append(first.replica().start())
        return list(started)

    try:
        yield start
    finally:
        for hub in started:
            hub.stop()


def _agent(hub: Hub, tmp_path: Path, agents: list[Agent], name: str, urls: list[str],
           **config: Any) -> Agent:
    """An agent registered through ``hub`` that talks to ``urls`` (in that order), Healthy."""
    agent = registered_agent(hub, tmp_path, name, hub_urls=urls, **config)
    agents.append(agent.start())
    wait_until(lambda: hub.machines()[name]["status"] == "Healthy", 15,
               what=f"{name} healthy:\n{agent.log()}")
    return agent


def _job(hub: Hub, runbook: str, **extra: Any) -> str:
    made = hub.api("POST", "/v1/jobs", json={"runbook": runbook, "group": "web", **extra})
    assert made.status_code == 201, made.text
    return str(made.json()["id"])


def _status(hub: Hub, job_id: str) -> str:
    return str(hub.api("GET", f"/v1/jobs/{job_id}").json()["status"])


def _health(hub: Hub) -> dict[str, Any]:
    with hub.client() as client:
        answer: dict[str, Any] = client.get("/healthz", timeout=5).json()
        return answer


def test_a_job_submitted_on_one_replica_starts_at_once_on_an_agent_polling_another(
        replicas: Replicas, agents: list[Agent], tmp_path: Path) -> None:
    a, b = replicas(2)
    assert _health(a)["notifications"] == _health(b)["notifications"] == "listening"
    publish_script(a, tmp_path, "stamp", 'echo "$EPOCHREALTIME"\n')
    # Polling B only, with a long-poll far longer than the test: only a wake-up that
    # crosses from A to B starts the job before B's own look again (notify.RECHECK, 5 s).
    _agent(a, tmp_path, agents, "w1", [b.url], poll_timeout=60)
    latencies = []
    for _ in range(6):
        with a.client(a.admin_token) as client:
            made = client.post("/v1/jobs", json={"runbook": "stamp", "group": "web"})
            answered = time.time()
        assert made.status_code == 201, made.text
        job_id = made.json()["id"]
        wait_until(lambda j=job_id: _status(a, j) == "Completed", 10, what=f"job {job_id}")
        output = a.api("GET", f"/v1/jobs/{job_id}/output").json()
        latencies.append(float(output[0]["text"]) - answered)
    figures = ", ".join(f"{x * 1e3:.1f}" for x in latencies)
    print(f"\nsubmitted on replica A, started on an agent polling replica B: {figures} ms")
    # The first one included, which also fetched the runbook.
    assert max(latencies) < 1.0, figures


def test_a_revoked_token_is_refused_on_the_other_replica_within_a_second(
        replicas: Replicas) -> None:
    a, b = replicas(2)
    made = a.cli("token", "create", "ci", "--json")
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)
    assert token["token"].startswith("opt_") and token["admin"] is False
    with b.client(token["token"]) as on_b:
        assert on_b.get("/v1/machines").status_code == 200  # B now holds it in its cache
        revoked = a.cli("token", "revoke", "ci", "--json")
        assert revoked.returncode == 0, revoked.stderr
        at = time.monotonic()
        wait_until(lambda: on_b.get("/v1/machines").status_code == 401, 1.0, 0.01,
                   what="replica B to refuse the revoked token")
        took = time.monotonic() - at
    print(f"\nrevoked on A, refused on B after {took * 1e3:.1f} ms")
    listed = json.loads(a.cli("token", "list", "--json").stdout)
    assert [t["name"] for t in listed] == ["admin"]


def test_a_machine_removed_on_one_replica_is_refused_on_the_other_within_a_second(
        replicas: Replicas, tmp_path: Path) -> None:
    a, b = replicas(2)
    call = machine_calls(a, tmp_path / "m1", "m1", urls=[b.url])
    call("POST", "/v1/agent/poll?wait=0&capacity=0")  # B now holds its row in its cache
    assert a.api("DELETE", "/v1/machines/m1").status_code == 200
    at = time.monotonic()

    def refused() -> bool:
        try:
            call("POST", "/v1/agent/poll?wait=0&capacity=0")
        except Exception as exc:  # HubRefused: the machine is unknown
            return getattr(exc, "status", None) in (401, 403)
        return False

    wait_until(refused, 1.0, 0.01, what="replica B to refuse the removed machine")
    print(f"\nremoved on A, refused on B after {(time.monotonic() - at) * 1e3:.1f} ms")


def test_ping_and_job_stop_through_one_replica_reach_an_agent_polling_another(
        replicas: Replicas, agents: list[Agent], tmp_path: Path) -> None:
    a, b = replicas(2)
    _agent(a, tmp_path, agents, "w1", [b.url], poll_timeout=60)
    pinged = a.cli("machine", "ping", "w1", "--timeout", "5s", "--json")
    assert pinged.returncode == 0, pinged.stderr
    round_trip = json.loads(pinged.stdout)["round_trip_ms"]
    print(f"\nping through A to an agent polling B: {round_trip} ms")
    assert round_trip < 1000

    publish_script(a, tmp_path, "long", "sleep 60\n")
    job_id = _job(a, "long")
    wait_until(lambda: _status(a, job_id) == "Running", 10, what="the job to run")
    at = time.monotonic()
    stopped = a.cli("job", "stop", job_id, "--json")
    assert stopped.returncode == 0, stopped.stderr
    detail = wait_until(lambda: (d := a.api("GET", f"/v1/jobs/{job_id}").json())["status"]
                        == "Stopped" and d["attempts"][-1].get("ended_at") and d, 10,
                        what="the agent on B to stop the job")
    print(f"stop through A ended the job on an agent polling B in "
          f"{(time.monotonic() - at) * 1e3:.0f} ms")
    assert detail["status"] == "Stopped"


def test_schedule_failover_after_kill_9_of_the_leader_loses_and_doubles_no_run(
        replicas: Replicas, tmp_path: Path) -> None:
    hubs = replicas(3)
    publish_script(hubs[0], tmp_path, "noop", "true\n")
    wait_until(lambda: sum(_health(h)["scheduler"] == "leader" for h in hubs) == 1, 10,
               what="one leader")
    leader = next(h for h in hubs if _health(h)["scheduler"] == "leader")
    others = [h for h in hubs if h is not leader]
    made = others[0].cli("schedule", "create", "every3", "--runbook", "noop", "--group",
                         "web", "--cron", "*/3 * * * * *", "--json")
    assert made.returncode == 0, made.stderr

    def runs() -> list[tuple[float, str | None, int]]:
        return [(float(due), job, int(missed)) for due, job, missed in query(
            leader.database_url,
            "SELECT due_at, job_id, missed FROM schedule_runs ORDER BY due_at")]

    wait_until(lambda: len(runs()) >= 2, 10, what="two runs fired by the leader")
    assert leader.proc is not None
    leader.proc.send_signal(signal.SIGKILL)
    leader.proc.wait()
    killed = time.monotonic()
    before = len(runs())
    new = wait_until(lambda: [h for h in others if _health(h)["scheduler"] == "leader"], 10,
                     what="another replica to lead")
    took = time.monotonic() - killed
    assert len(new) == 1
    wait_until(lambda: len(runs()) >= before + 3, 15, what="three runs after the failover")
    fired = runs()
    dues = [due for due, _job, _missed in fired]
    print(f"\nleader killed; replica took over after {took:.2f} s; runs due at +"
          + ", +".join(f"{d - dues[0]:.0f}" for d in dues))
    assert len(set(dues)) == len(dues)  # no due time twice
    gaps = [later - earlier for earlier, later in zip(dues, dues[1:], strict=False)]
    assert gaps == [3] * len(gaps)  # none lost
    assert all(missed == 0 for _due, _job, missed in fired)
    jobs = [job for _due, job, _missed in fired]
    assert None not in jobs and len(set(jobs)) == len(jobs)
    (count,), = query(leader.database_url, "SELECT count(*) FROM jobs")
    assert count == len(fired)


def test_agents_listing_two_hub_urls_fail_over_and_every_job_runs_once(
        replicas: Replicas, agents: list[Agent], tmp_path: Path, shared: Path) -> None:
    a, b = replicas(2)
    ledger = shared / "ledger"
    ledger.touch()
    os.chmod(ledger, 0o666)  # appended to by every job user
    publish_script(a, tmp_path, "tally", f'sleep 0.05\necho "$OUTPOST_JOB_ID" >> "{ledger}"\n')
    for i in range(3):  # talking to A first: A's death is theirs to ride out
        _agent(a, tmp_path, agents, f"w{i}", [a.url, b.url], max_concurrent_jobs=4)
    ids: list[str] = []
    with b.client(b.admin_token) as client:
        for _ in range(3):
            made = client.post("/v1/jobs/batch", json={"jobs": [
                {"runbook": "tally", "group": "web"} for _ in range(50)]})
            assert made.status_code in (200, 201), made.text
            ids += [j["id"] for j in made.json()["jobs"]]
        wait_until(lambda: len(ledger.read_text().split()) >= 20, 20,
                   what="jobs under way")
        assert a.proc is not None
        a.proc.send_signal(signal.SIGKILL)  # with jobs claimed, running and reporting
        a.proc.wait()

        def all_ended() -> bool:
            listed = client.get("/v1/jobs", params={"limit": 1000}).json()
            return sum(j["status"] == "Completed" for j in listed) == len(ids)

        wait_until(all_ended, 60, 0.5, what="every job to complete through replica B")
    lines = Counter(ledger.read_text().split())
    assert set(lines) == set(ids)
    assert [i for i, n in lines.items() if n != 1] == []  # each id exactly once
    for agent in agents:
        status = agent.status()
        assert status is not None and status["hub_url"] == b.url.rstrip("/"), status


def test_the_listener_reconnects_after_its_connection_is_killed(
        replicas: Replicas, agents: list[Agent], tmp_path: Path) -> None:
    a, b = replicas(2)
    assert b.proc is not None
    name = f"outpost-listener pid={b.proc.pid}"
    (before,), = query(b.database_url, "SELECT count(*) FROM pg_stat_activity "
                                       f"WHERE application_name = '{name}'")
    assert before == 1
    killed = query(b.database_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                   f"WHERE application_name = '{name}'")
    assert killed == [(True,)]
    wait_until(lambda: query(b.database_url, "SELECT count(*) FROM pg_stat_activity WHERE "
                             f"application_name = '{name}'") == [(1,)], 10,
               what="replica B to listen again")
    wait_until(lambda: _health(b)["notifications"] == "listening", 5, what="B listening")
    # Wake-ups from A reach B again: a job submitted on A starts at once on B's agent.
    publish_script(a, tmp_path, "stamp", 'echo "$EPOCHREALTIME"\n')
    _agent(a, tmp_path, agents, "w1", [b.url], poll_timeout=60)
    with a.client(a.admin_token) as client:
        made = client.post("/v1/jobs", json={"runbook": "stamp", "group": "web"})
        answered = time.time()
    job_id = made.json()["id"]
    wait_until(lambda: _status(a, job_id) == "Completed", 10, what="the job")
    started = float(a.api("GET", f"/v1/jobs/{job_id}/output").json()[0]["text"])
    print(f"\nafter the listener's reconnection: started {(started - answered) * 1e3:.1f} ms "
          "after it was submitted on the other replica")
    assert started - answered < 1.0
    assert "listening for other hub replicas again" in b.log()


def test_tokens_are_managed_per_account_and_never_across(hub: Hub) -> None:
    other = hub.api("POST", "/v1/accounts", json={"name": "other"}).json()
    theirs = other["token"]
    # An account sees and revokes only its own tokens; the admin's are not found to it.
    listed = hub.api("GET", "/v1/tokens", theirs).json()
    assert [t["name"] for t in listed] == ["default"]
    assert all("token" not in t and "hash" not in t for t in listed)
    admin_tokens = hub.api("GET", "/v1/tokens").json()
    assert [t["name"] for t in admin_tokens] == ["admin"]
    gone = hub.api("DELETE", f"/v1/tokens/{admin_tokens[0]['id']}", theirs)
    assert gone.status_code == 404 and gone.json()["code"] == "E3002", gone.text
    gone = hub.api("DELETE", f"/v1/tokens/{listed[0]['id']}")
    assert gone.status_code == 404, gone.text
    # Only an admin makes admin tokens.
    refused = hub.api("POST", "/v1/tokens", theirs, json={"name": "root", "admin": True})
    assert refused.status_code == 403 and refused.json()["code"] == "E8100", refused.text
    # Names: valid and unique in the account.
    bad = hub.api("POST", "/v1/tokens", theirs, json={"name": "no spaces"})
    assert bad.status_code == 422 and bad.json()["code"] == "E8104", bad.text
    made = hub.api("POST", "/v1/tokens", theirs, json={"name": "ci"})
    assert made.status_code == 201, made.text
    again = hub.api("POST", "/v1/tokens", theirs, json={"name": "ci"})
    assert again.status_code == 409 and again.json()["code"] == "E8103", again.text
    # A new token works; the same name in another account is another token.
    assert hub.api("GET", "/v1/whoami", made.json()["token"]).json()["account_id"] == other["id"]
    assert hub.api("POST", "/v1/tokens", json={"name": "ci"}).status_code == 201
    # The last admin token stays; so does an account's last token.
    last_admin = hub.api("DELETE", "/v1/tokens/admin")
    assert last_admin.status_code == 409 and last_admin.json()["code"] == "E8101"
    assert hub.api("DELETE", "/v1/tokens/default", theirs).status_code == 200
    last = hub.api("DELETE", "/v1/tokens/ci", made.json()["token"])
    assert last.status_code == 409 and last.json()["code"] == "E8102", last.text
    # Revoked on this hub: refused at once, though it was just used.
    assert hub.api("GET", "/v1/whoami", theirs).status_code == 401
    cli = hub.cli("token", "revoke", "nope")
    assert cli.returncode == 1 and "E3002" in cli.stderr, cli.stderr


def test_healthz_and_metrics_say_a_single_hub_leads(hub: Hub) -> None:
    health = httpx.get(f"{hub.url}/healthz", verify=hub.ssl_context()).json()
    assert health["scheduler"] == "leader"
    assert health["notifications"] in ("in-process", "listening")
    metrics = hub.api("GET", "/metrics").text
    assert "outpost_scheduler_leader 1.0" in metrics


def test_a_notification_is_delivered_at_commit_and_never_for_a_rollback(
        postgres_url: str) -> None:
    """The notifier itself, on a real database: two replicas' notifiers in one process."""
    import asyncio

    from outpost.hub import db, notify

    async def scenario() -> None:
        engine = db.make_engine(postgres_url)
        other_engine = db.make_engine(postgres_url)
        mine, other = notify.create(engine), notify.create(other_engine)
        assert isinstance(mine, notify.PgNotifier) and isinstance(other, notify.PgNotifier)
        notify.attach(engine, mine)
        await mine.start()
        await other.start()
        forgotten: list[str] = []
        other.on_invalidate("token", forgotten.append)
        try:
            key = notify.group("acct", "web")
            with other.waiting(key) as woken:
                async with engine.connect() as conn:
                    await notify.wake(conn, key)
                    await notify.invalidate(conn, "token", "t1")
                    await conn.rollback()
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(woken.wait(), 0.5)
                assert forgotten == []
                async with engine.begin() as conn:
                    await notify.wake(conn, key)
                    await notify.invalidate(conn, "token", "t2")
                    await asyncio.sleep(0.2)
                    assert not woken.is_set()  # not before the commit
                await asyncio.wait_for(woken.wait(), 1.0)
                await asyncio.sleep(0.1)
                assert forgotten == ["t2"]
            # Without a transaction (the change already committed): this replica at once,
            # the other through the listening connection.
            with mine.waiting(key) as here, other.waiting(key) as there:
                mine.wake_committed(key)
                assert here.is_set()
                await asyncio.wait_for(there.wait(), 1.0)
        finally:
            await mine.close()
            await other.close()
            await engine.dispose()
            await other_engine.dispose()

    asyncio.run(scenario())
