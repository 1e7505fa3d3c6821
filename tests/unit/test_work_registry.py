"""The agent's registry of work kinds (agent/work.py), through its seam: the Context a
handler gets (a call to the hub, the running jobs). The daemon with a real hub is tested in
tests/integration/test_agent_daemon.py and test_jobs.py."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from outpost.agent import work
from outpost.agent.state import StateDir
from outpost.protocol import work as wire
from outpost.protocol.errors import TransportError
from outpost.protocol.models import Wire


class Daemon:
    """What the registry reaches of the daemon: records the hub calls and the jobs
    started."""

    def __init__(self, tmp_path: Path, fail: bool = False) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.started: list[wire.JobClaim] = []
        self.spawned: list[asyncio.Task[Any]] = []
        self.failures: list[str] = []
        self.jobs: dict[str, Any] = {}
        self.fail = fail
        self.ctx = work.Context(call=self.call, jobs=self.jobs, state=StateDir(tmp_path),
                                spawn=self.spawn, start_job=self.started.append,
                                note_failure=lambda exc: self.failures.append(exc.code))

    async def call(self, method: str, path: str, payload: Any = None) -> Any:
        self.calls.append((method, path, payload))
        if self.fail:
            raise TransportError("refused", "https://hub", "connection refused")
        return {"done": True}

    def spawn(self, work: Awaitable[Any], name: str) -> None:
        self.spawned.append(asyncio.ensure_future(work))


class Run:
    """A running attempt as job_control sees it."""

    def __init__(self, job_id: str, attempt: int) -> None:
        self.id, self.attempt = job_id, attempt
        self.actions: list[str] = []

    async def control(self, action: str, why: str = "") -> None:
        self.actions.append(action)


def test_ping_is_answered_with_when_it_was_received(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    before = time.time()
    asyncio.run(work.registry.handle({"id": "w/1", "kind": "ping", "created_at": 1.0,
                                      "payload": {"sent_at": before}}, daemon.ctx))
    [(method, path, body)] = daemon.calls
    assert (method, path) == ("POST", "/v1/agent/work/w%2F1/done")
    assert before <= body["result"]["received_at"] <= time.time()


def test_job_control_reaches_the_running_attempt_only(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon) -> None:
        for attempt in (2, 1):  # another attempt of the job, then the one running
            await work.registry.handle({"id": f"c{attempt}", "kind": "job_control",
                                        "payload": {"job_id": "j1", "attempt": attempt,
                                                    "action": "suspend"}}, daemon.ctx)
        await asyncio.gather(*daemon.spawned)

    daemon = Daemon(tmp_path)
    run = Run("j1", 1)
    daemon.jobs["j1"] = run
    asyncio.run(scenario(daemon))
    assert [body["result"] for _, _, body in daemon.calls] == [
        {"applied": False, "why": "the agent does not run that attempt"}, {"applied": True}]
    assert run.actions == ["suspend"]


def test_a_job_claim_starts_the_job_and_answers_nothing(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    claim = {"job_id": "j1", "attempt": 1, "runbook": "hello", "version": 1, "type": "bash",
             "content": "echo hi", "params": {"N": 2}, "timeout": None,
             "log_verbose": False, "log_progress": False, "run_as": None, "limits": None,
             "seq_base": 0, "job_token": "jt_j1.mac"}
    asyncio.run(work.registry.handle({"id": "j1", "kind": "job", "payload": claim},
                                     daemon.ctx))
    assert daemon.calls == []
    [started] = daemon.started
    assert started.as_job() == claim


def test_an_unknown_kind_is_answered_with_an_error_and_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    daemon = Daemon(tmp_path)
    registry = work.Registry()
    caplog.set_level(logging.INFO, "outpost.agent.work")

    async def scenario() -> None:
        for n in range(3):
            await registry.handle({"id": f"w{n}", "kind": "reboot", "payload": {}},
                                  daemon.ctx)

    asyncio.run(scenario())
    assert [path for _, path, _ in daemon.calls] == [f"/v1/agent/work/w{n}/done"
                                                     for n in range(3)]
    error = daemon.calls[0][2]["result"]["error"]
    assert error["code"] == "E8150" and error["reason"] == "work_kind_unknown"
    assert "reboot" in error["message"] and error["details"]["kind"] == "reboot"
    logged = [r for r in caplog.records if "E8150" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.ERROR


def test_a_malformed_payload_is_answered_with_an_error(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    asyncio.run(work.registry.handle({"id": "w1", "kind": "job_control",
                                      "payload": {"job_id": "j1", "action": "stop"}},
                                     daemon.ctx))
    [(_, _, body)] = daemon.calls
    assert body["result"]["error"]["code"] == "E8151"
    assert "attempt" in body["result"]["error"]["message"]


def test_a_malformed_job_claim_fails_its_attempt(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon) -> None:
        await work.registry.handle({"id": "j9", "kind": "job", "payload": {
            "job_id": "j9", "attempt": 2, "runbook": "x"}}, daemon.ctx)
        await asyncio.gather(*daemon.spawned)

    daemon = Daemon(tmp_path)
    asyncio.run(scenario(daemon))
    assert daemon.started == []
    [(_, path, body)] = daemon.calls
    assert path == "/v1/agent/jobs/j9/report"
    assert body["attempt"] == 2 and body["started"] is False
    assert body["end"]["cause"] == "exit" and "E8151" not in body["end"]["reason"]
    assert "malformed" in body["end"]["reason"]


def test_a_registered_kind_is_handled_without_the_daemon_knowing_it(tmp_path: Path) -> None:
    class Greet(Wire):
        name: str

    class Greeted(Wire):
        text: str

    seen: list[work.Context] = []

    async def greet(item: wire.WorkItem, ctx: work.Context) -> Greeted:
        seen.append(ctx)
        return Greeted(text=f"hello {item.payload.name}")

    registry = work.Registry()
    registry.register("greet", greet, payload=Greet)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("greet", greet, payload=Greet)
    assert registry.kinds() == ["greet"]
    daemon = Daemon(tmp_path)
    asyncio.run(registry.handle({"id": "g1", "kind": "greet", "payload": {"name": "web-1"}},
                                daemon.ctx))
    assert seen == [daemon.ctx]
    assert daemon.calls == [("POST", "/v1/agent/work/g1/done",
                             {"result": {"text": "hello web-1"}})]
    # The private registry left the agent's own alone (which extensions add ext_op to).
    assert "greet" not in work.registry.kinds()
    assert {"job", "ping", "job_control"} <= set(work.registry.kinds())


def test_an_answer_the_hub_does_not_take_is_noted_not_raised(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, fail=True)
    asyncio.run(work.registry.handle({"id": "w1", "kind": "ping",
                                      "payload": {"sent_at": 1.0}}, daemon.ctx))
    assert daemon.failures == ["E2004"]  # hub unreachable: shown in 'outpost agent status'
    assert len(daemon.calls) == 1


def test_a_handler_that_raises_is_answered_and_the_next_item_still_taken(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Empty(Wire):
        pass

    async def broken(item: wire.WorkItem, ctx: work.Context) -> None:
        raise KeyError("missing")

    registry = work.Registry()
    registry.register("broken", broken, payload=Empty)
    registry.register("ping", work.registry._handlers["ping"].run, payload=wire.PingPayload)
    daemon = Daemon(tmp_path)

    async def scenario() -> None:
        await registry.handle({"id": "b1", "kind": "broken", "payload": {}}, daemon.ctx)
        await registry.handle({"id": "p1", "kind": "ping", "payload": {"sent_at": 1.0}},
                              daemon.ctx)

    with caplog.at_level(logging.ERROR, "outpost.agent.work"):
        asyncio.run(scenario())
    first, second = (body["result"] for _, _, body in daemon.calls)
    assert first["error"]["code"] == "E8152" and "KeyError" in first["error"]["message"]
    assert "received_at" in second
    assert any(r.exc_info is not None for r in caplog.records)
