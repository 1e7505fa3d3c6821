"""The agent's report channel (agent/reporter.py), through its one seam: the call that
sends a request to the hub. The hub side of POST /v1/agent/reports is tested for real in
tests/integration/test_reports.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from outpost.agent.reporter import Reporter
from outpost.protocol.errors import HubRefused, TransportError


class Hub:
    """Answers like the hub would; records every request; can fail the next ones."""

    def __init__(self, lacks_endpoint: bool = False) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.fail_next = 0
        self.lacks_endpoint = lacks_endpoint
        self.gate: asyncio.Event | None = None  # holds the first request until set
        self.items: list[dict[str, Any]] = []

    async def call(self, method: str, path: str, payload: Any = None) -> Any:
        body = json.loads(payload)
        self.requests.append((path, body))
        if self.gate is not None:
            gate, self.gate = self.gate, None
            await gate.wait()
        if self.fail_next:
            self.fail_next -= 1
            raise TransportError("refused", "https://hub", "connection refused")
        if path == "/v1/agent/reports":
            if self.lacks_endpoint:
                raise HubRefused(404, {"code": "E3002", "message": "No such API path."})
            results = []
            for report in body["reports"]:
                if report["job_id"] == "refused":
                    results.append({"id": "refused", "error": {
                        "code": "E3002", "message": "No attempt 1 of job 'refused'."}})
                else:
                    status = "Completed" if report["end"] else "Running"
                    results.append({"id": report["job_id"], "status": status})
            items, self.items = (self.items, []) if body["claim"] else ([], self.items)
            return {"results": results, "items": items}
        job_id = path.split("/")[4]
        return {"id": job_id, "status": "Completed" if body["end"] else "Running"}


def _body(end: bool) -> bytes:
    return b'{"attempt":1,"started":true,"end":%s,"records":[]}' % (
        b'{"exit_code":0}' if end else b"null")


def _reporter(hub: Hub, capacity: int = 8) -> tuple[Reporter, list[dict[str, Any]]]:
    taken: list[dict[str, Any]] = []

    async def take(items: list[dict[str, Any]]) -> None:
        taken.extend(items)
    return Reporter(hub.call, lambda: capacity, take), taken


def test_reports_that_gather_while_one_is_out_go_in_one_request() -> None:
    async def scenario() -> None:
        hub = Hub()
        gate = hub.gate = asyncio.Event()
        hub.items = [{"id": "next", "kind": "job", "payload": {"job_id": "next"}}]
        reporter, taken = _reporter(hub, capacity=6)
        first = asyncio.create_task(reporter.report("a", _body(False), False))
        await asyncio.sleep(0.01)  # the first request is out, held by the hub
        rest = [asyncio.create_task(reporter.report(j, _body(True), True))
                for j in ("b", "c", "d")]
        await asyncio.sleep(0.01)
        gate.set()
        assert await first == {"id": "a", "status": "Running"}
        assert [await t for t in rest] == [{"id": j, "status": "Completed"} for j in "bcd"]
        assert [[r["job_id"] for r in body["reports"]] for _, body in hub.requests] == [
            ["a"], ["b", "c", "d"]]
        # A batch that ends attempts asks for work for the freed slots; one that ends none
        # does not, and what the hub claimed is taken.
        assert [body["claim"] for _, body in hub.requests] == [0, 6]
        assert taken == [{"id": "next", "kind": "job", "payload": {"job_id": "next"}}]
        await reporter.close()
    asyncio.run(scenario())


def test_a_batch_that_does_not_arrive_is_sent_again_whole(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    async def no_wait(_seconds: float) -> None:
        return None

    async def scenario() -> None:
        hub = Hub()
        hub.fail_next = 2
        reporter, _ = _reporter(hub)
        monkeypatch.setattr("outpost.agent.reporter.asyncio.sleep", no_wait)
        answers = await asyncio.gather(*(reporter.report(j, _body(True), True)
                                         for j in ("a", "b")))
        assert answers == [{"id": "a", "status": "Completed"},
                           {"id": "b", "status": "Completed"}]
        assert [[r["job_id"] for r in body["reports"]] for _, body in hub.requests] == [
            ["a", "b"]] * 3
        await reporter.close()
    asyncio.run(scenario())


def test_a_refused_report_fails_only_its_own_delivery() -> None:
    async def scenario() -> None:
        hub = Hub()
        reporter, _ = _reporter(hub)
        good = asyncio.create_task(reporter.report("a", _body(True), True))
        bad = asyncio.create_task(reporter.report("refused", _body(True), True))
        assert await good == {"id": "a", "status": "Completed"}
        with pytest.raises(HubRefused) as refused:
            await bad
        assert refused.value.status == 422 and "refused" in refused.value.message
        await reporter.close()
    asyncio.run(scenario())


def test_a_hub_without_the_endpoint_gets_one_request_per_report() -> None:
    async def scenario() -> None:
        hub = Hub(lacks_endpoint=True)
        reporter, _ = _reporter(hub)
        answers = await asyncio.gather(reporter.report("a", _body(True), True),
                                       reporter.report("b", _body(False), False))
        assert answers == [{"id": "a", "status": "Completed"}, {"id": "b", "status": "Running"}]
        assert not reporter.batched
        later = await reporter.report("c", _body(True), True)
        assert later == {"id": "c", "status": "Completed"}
        paths = [path for path, _ in hub.requests]
        assert paths[0] == "/v1/agent/reports"
        assert sorted(paths[1:]) == ["/v1/agent/jobs/a/report", "/v1/agent/jobs/b/report",
                                     "/v1/agent/jobs/c/report"]
        await reporter.close()
    asyncio.run(scenario())
