"""What an agent loads: its resident memory has a 40 MB budget (bench/agent_memory.py).

The daemon's process (``python -m outpost.cli.agentd``) imports what it needs to heartbeat,
long-poll and take the built-in work (pings, jobs, job control). Pydantic and the wire
models built with it are not imported at all (extensions read theirs with
protocol/extreaders.py); the extensions' reconciler and operations are imported only on a
machine that has extensions (or is asked for an operation); the code that runs a job, at
the first job. The hub's answers and work items are read by protocol/readers.py instead of
the models: the tests at the end hold each reader to the model it stands for.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from outpost.agent import work
from outpost.protocol import readers
from outpost.protocol import work as wire
from outpost.protocol.errors import OutpostError
from outpost.protocol.models import HeartbeatAck
from tests.support import loaded_modules as _loaded_by

# Pydantic and the models it builds cost an agent about 10 MB, the extensions about 2 MB,
# the job runner about 1.5 MB; the CLI's libraries several MB (cli/agentd.py).
PYDANTIC = ("pydantic", "pydantic_core", "outpost.protocol.models", "outpost.protocol.work",
            "outpost.protocol.extensions")
EXTENSIONS = ("outpost.agent.extensions.reconcile", "outpost.agent.extensions.ops",
              "outpost.agent.extensions.handler", "outpost.agent.extensions.runtime",
              "outpost.protocol.extreaders")
RUNNER = ("outpost.agent.runner", "outpost.agent.helper", "outpost.agent.procgroup")
CLI = ("typer", "click", "rich")

# What agentd.run imports before it starts the daemon, and what an idle daemon then reads:
# a poll's answer with a heartbeat's acknowledgement.
IDLE = """
import sys
sys.argv = ["agentd"]
import outpost.cli.agentd as agentd
from outpost.agent import config, joblogs, logs, state, transport
from outpost.agent.daemon import Agent, read_status
from outpost.protocol.readers import HeartbeatAck, PollAnswer
HeartbeatAck.read(PollAnswer.read({"items": [], "heartbeat": {"abandon": []}}).heartbeat)
"""

# The built-in work kinds, through the registry: a ping, a job control, a job claim.
WORK = IDLE + """
import asyncio
from outpost.agent import work
from outpost.agent.state import StateDir
sent, claims = [], []
async def call(method, path, payload=None):
    sent.append(payload)
ctx = work.Context(call=call, jobs={}, state=StateDir("/nonexistent"), spawn=print,
                   start_job=claims.append)
async def main():
    for kind, payload in [
            ("ping", {"sent_at": 1.0}),
            ("job_control", {"job_id": "j1", "attempt": 1, "action": "stop"}),
            ("job", {"job_id": "j1", "runbook": "r", "version": 1, "type": "bash",
                     "content": "true"})]:
        await work.registry.handle({"id": "w-" + kind, "kind": kind, "payload": payload}, ctx)
asyncio.run(main())
assert sent[0]["result"]["received_at"] > 1.0, sent
assert sent[1]["result"] == {"applied": False, "why": "the agent does not run that attempt"}
assert claims[0].as_job()["runbook"] == "r", claims
"""



def test_an_idle_agent_loads_none_of_the_heavy_modules() -> None:
    loaded = _loaded_by(IDLE)
    assert "outpost.agent.daemon" in loaded and "outpost.agent.work" in loaded
    assert "httpx" in loaded and "nacl.signing" in loaded  # what it does use is there
    heavy = PYDANTIC + EXTENSIONS + RUNNER + CLI
    assert sorted(m for m in heavy if m in loaded) == []


def test_the_built_in_work_kinds_are_taken_without_pydantic() -> None:
    loaded = _loaded_by(WORK)
    assert sorted(m for m in PYDANTIC + EXTENSIONS + CLI if m in loaded) == []


def test_an_extension_operation_is_read_without_pydantic() -> None:
    """The ``ext_op`` kind reads its payload with protocol/extreaders.py, imported then."""
    loaded = _loaded_by(IDLE + """
import asyncio
from outpost.agent import work
from outpost.agent.state import StateDir
sent = []
async def call(method, path, payload=None):
    sent.append(payload)
ctx = work.Context(call=call, jobs={}, state=StateDir("/nonexistent"), spawn=print,
                   start_job=print)
asyncio.run(work.registry.handle({"id": "w1", "kind": "ext_op", "payload": {
    "op_id": "o1", "extension": "backup", "operation": "snapshot"}}, ctx))
assert sent[0]["result"]["error"]["code"] == "E9088", sent
""")
    assert "outpost.protocol.extreaders" in loaded
    assert sorted(m for m in PYDANTIC if m in loaded) == []


# --- each reader against its model ------------------------------------------------------
READERS = [(readers.HeartbeatAck, HeartbeatAck), (readers.PollAnswer, wire.PollAnswer),
           (readers.RawItem, wire.RawItem), (readers.PingPayload, wire.PingPayload),
           (readers.JobControlPayload, wire.JobControlPayload),
           (readers.JobLimits, wire.JobLimits), (readers.JobClaim, wire.JobClaim),
           (readers.ModuleCallPayload, wire.ModuleCallPayload)]


def _defaults(model: Any) -> dict[str, Any]:
    return {name: (info.default_factory() if info.default_factory
                   else "required" if info.is_required() else info.default)
            for name, info in model.model_fields.items()}


def _dataclass_defaults(cls: Any) -> dict[str, Any]:
    return {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING
                     else "required" if f.default is dataclasses.MISSING else f.default)
            for f in dataclasses.fields(cls)}


@pytest.mark.parametrize(("reader", "model"), READERS)
def test_each_reader_has_the_fields_and_defaults_of_its_model(reader: Any, model: Any) -> None:
    """A field added to a model fails here until its reader reads it too."""
    assert _dataclass_defaults(reader) == _defaults(model)


CLAIM = {"job_id": "j1", "attempt": 2, "runbook": "deploy", "version": 3, "type": "bash",
         "content": "echo hi\n", "params": {"n": 1}, "timeout": 30, "log_verbose": True,
         "log_progress": False, "run_as": "runbooks",
         "limits": {"memory_mb": 256, "cpus": 1.5, "processes": 64}, "seq_base": 10,
         "job_token": "t0k", "later": "ignored"}
FULL_ACK = {"hub_time": 1700000000.5, "min_agent_version": "0.1", "machine_id": "m-1",
            "abandon": ["j1", "j2"], "extensions_etag": "abc", "unknown": [1]}

SAME = [
    (readers.HeartbeatAck, {}), (readers.HeartbeatAck, FULL_ACK),
    (readers.HeartbeatAck, {"hub_time": 3}),
    (readers.PollAnswer, {}),
    (readers.PollAnswer, {"items": [{"id": "w1", "kind": "ping", "payload": {}}],
                          "heartbeat": FULL_ACK, "extensions_etag": "", "more": True}),
    (readers.PollAnswer, {"heartbeat_error": {"code": "E3013", "message": "overloaded"}}),
    (readers.RawItem, {"id": "w1", "kind": "job", "payload": CLAIM, "created_at": 5}),
    (readers.PingPayload, {"sent_at": 1.5}),
    (readers.JobControlPayload, {"job_id": "j1", "attempt": 1, "action": "suspend"}),
    (readers.JobClaim, CLAIM),
    (readers.JobClaim, {k: CLAIM[k] for k in ("job_id", "runbook", "version", "type",
                                              "content")}),
    (readers.JobClaim, {**CLAIM, "limits": {"cpus": 0}, "attempt": 2.0}),
    (readers.ModuleCallPayload, {"module": "filter", "method": "echo"}),
    (readers.ModuleCallPayload, {"module": "filter", "method": "echo",
                                 "payload": {"a": [1, "x"]}, "timeout_seconds": 300}),
]


@pytest.mark.parametrize(("reader", "data"), SAME)
def test_a_reader_reads_what_its_model_reads_the_same(reader: Any, data: Any) -> None:
    model = dict(READERS)[reader]
    assert dataclasses.asdict(reader.read(data)) == model.model_validate(data).model_dump()


def test_a_claim_is_handed_to_the_runner_as_the_model_hands_it() -> None:
    assert readers.JobClaim.read(CLAIM).as_job() == wire.JobClaim.model_validate(
        CLAIM).as_job()


REFUSED = [
    (readers.HeartbeatAck, {"abandon": "j1"}, ["abandon"]),
    (readers.HeartbeatAck, {"abandon": [1]}, ["abandon: item 0"]),
    (readers.HeartbeatAck, {"hub_time": "soon"}, ["hub_time"]),
    (readers.HeartbeatAck, {"hub_time": float("nan")}, ["hub_time"]),
    (readers.HeartbeatAck, {"extensions_etag": 5}, ["extensions_etag"]),
    (readers.PollAnswer, {"items": [["w1"]]}, ["items: item 0"]),
    (readers.PollAnswer, {"heartbeat": "ok"}, ["heartbeat"]),
    (readers.PollAnswer, [], ["an object was expected"]),
    (readers.RawItem, {"kind": "ping"}, ["id: required"]),
    (readers.RawItem, {"id": "w1", "kind": "k" * 65}, ["kind: at most 64"]),
    (readers.JobControlPayload, {"job_id": "j", "attempt": 0, "action": "explode"},
     ["attempt: 0 is under 1", "action: one of stop, suspend, resume"]),
    (readers.JobClaim, {**CLAIM, "attempt": 2**31}, ["attempt: 2147483648 is over"]),
    (readers.JobClaim, {**CLAIM, "log_verbose": "maybe"}, ["log_verbose"]),
    (readers.JobClaim, {**CLAIM, "limits": {"memory_mb": -1}},
     ["limits.memory_mb: -1 is under 0"]),
    (readers.JobClaim, {**CLAIM, "timeout": float("inf")}, ["timeout"]),
    (readers.JobClaim, {"job_id": "j1"}, ["runbook: required", "version: required",
                                          "type: required", "content: required"]),
    (readers.ModuleCallPayload, {"method": "m" * 129, "timeout_seconds": 0},
     ["module: required", "method: at most 128", "timeout_seconds: 0.0 is not within"]),
    (readers.ModuleCallPayload, {"module": "f", "method": "m", "timeout_seconds": 301},
     ["timeout_seconds: 301.0 is not within"]),
]


@pytest.mark.parametrize(("reader", "data", "named"), REFUSED)
def test_what_does_not_fit_is_refused_naming_each_field(
        reader: Any, data: Any, named: list[str]) -> None:
    with pytest.raises(readers.ReadError) as caught:
        reader.read(data)
    assert [problem for problem in caught.value.problems
            if not any(problem.startswith(name) or name in problem for name in named)] == []
    assert all(any(name in problem for problem in caught.value.problems) for name in named)
    with pytest.raises(ValueError):  # the model refuses it too
        dict(READERS)[reader].model_validate(data)


def test_a_reader_converts_nothing_the_hub_would_not_send() -> None:
    """The model would take "3" for 3; the hub sends numbers, and the reader wants one."""
    with pytest.raises(readers.ReadError, match="version: an integer was expected"):
        readers.JobClaim.read({**CLAIM, "version": "3"})
    assert wire.JobClaim.model_validate({**CLAIM, "version": "3"}).version == 3
    with pytest.raises(readers.ReadError, match="log_verbose: true or false"):
        readers.JobClaim.read({**CLAIM, "log_verbose": "yes"})


def test_a_malformed_item_is_e8151_naming_the_fields_as_before() -> None:
    handler = work.registry._handlers["job_control"]
    raw = {"id": "w2", "kind": "job_control",
           "payload": {"job_id": "j", "attempt": 0, "action": "explode"}}
    with pytest.raises(OutpostError) as caught:
        handler.read(raw)
    assert caught.value.code == "E8151" and caught.value.details["item"] == "w2"
    assert "attempt" in caught.value.message and "action" in caught.value.message
    with pytest.raises(OutpostError) as before:
        wire.parse_item(raw)
    assert before.value.code == caught.value.code
    assert work.error_result(caught.value) == {"error": caught.value.to_body()}
    assert work.error_result(caught.value) == wire.error_result(caught.value)
