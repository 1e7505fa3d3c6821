"""What an idle agent loads: its resident memory has a 40 MB budget (bench/agent_memory.py).

The daemon's process (``python -m outpost.cli.agentd``) imports what it needs to heartbeat
and long-poll. Pydantic and the wire models built with it, the extensions' reconciler and
operations, and the code that runs a job are imported when the hub first hands the agent
work (or names extensions for the machine), never by an agent that only polls. The poll's
and heartbeat's answers are read by protocol/answers.py instead: the last tests here hold
those readers to the models they stand for.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from typing import Any

import pytest

from outpost.protocol import answers
from outpost.protocol import work as wire
from outpost.protocol.models import HeartbeatAck
from tests.support import clean_env

# Each of these cost an idle agent memory it does not use (about 10 MB for pydantic and
# the models it builds, 2 MB for the extensions, 1 MB for the job runner).
HEAVY = ("pydantic", "pydantic_core", "outpost.protocol.models", "outpost.protocol.work",
         "outpost.protocol.extensions", "outpost.agent.extensions.reconcile",
         "outpost.agent.extensions.ops", "outpost.agent.extensions.handler",
         "outpost.agent.extensions.runtime", "outpost.agent.runner",
         "outpost.agent.helper", "outpost.agent.procgroup",
         # the CLI's libraries (agentd's docstring)
         "typer", "click", "rich")

# What agentd.run imports before it starts the daemon, and the daemon imports in its first
# turns with nothing to do (a status answer, a heartbeat acknowledged through a poll).
IDLE = """
import sys
sys.argv = ["agentd"]
import outpost.cli.agentd as agentd
from outpost.agent import config, joblogs, logs, state, transport
from outpost.agent.daemon import Agent, read_status
from outpost.protocol.answers import HeartbeatAck, PollAnswer
PollAnswer.read({"items": [], "heartbeat": {"hub_time": 1.0, "abandon": []}})
"""


def _loaded_by(code: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys\n"
         "print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, timeout=60, env=clean_env())
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_an_idle_agent_loads_none_of_the_heavy_modules() -> None:
    loaded = _loaded_by(IDLE)
    assert "outpost.agent.daemon" in loaded and "outpost.agent.work" in loaded
    assert "httpx" in loaded and "nacl.signing" in loaded  # what it does use is there
    assert sorted(m for m in HEAVY if m in loaded) == []


def test_the_first_work_item_loads_the_models_it_needs() -> None:
    """A ping parsed by the agent's registry imports the models then, and answers."""
    loaded = _loaded_by(IDLE + """
import asyncio
from outpost.agent import work
from outpost.agent.state import StateDir
sent = []
async def call(method, path, payload=None):
    sent.append(payload)
ctx = work.Context(call=call, jobs={}, state=StateDir("/nonexistent"), spawn=print,
                   start_job=print)
asyncio.run(work.registry.handle({"id": "w1", "kind": "ping",
                                  "payload": {"sent_at": 1.0}}, ctx))
assert sent[0]["result"]["received_at"] > 1.0, sent
""")
    assert {"pydantic", "outpost.protocol.work"} <= loaded


def _defaults(model: Any) -> dict[str, Any]:
    return {name: (info.default_factory() if info.default_factory else info.default)
            for name, info in model.model_fields.items()}


def _dataclass_defaults(cls: Any) -> dict[str, Any]:
    return {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING
                     else f.default) for f in dataclasses.fields(cls)}


@pytest.mark.parametrize(("light", "model"), [(answers.HeartbeatAck, HeartbeatAck),
                                              (answers.PollAnswer, wire.PollAnswer)])
def test_each_light_reader_has_the_fields_and_defaults_of_its_model(
        light: Any, model: Any) -> None:
    assert _dataclass_defaults(light) == _defaults(model)


FULL_ACK = {"hub_time": 1700000000.5, "min_agent_version": "0.1", "machine_id": "m-1",
            "abandon": ["j1", "j2"], "extensions_etag": "abc", "unknown": [1]}


@pytest.mark.parametrize("data", [{}, FULL_ACK, {"hub_time": 3}])
def test_an_acknowledgement_reads_as_the_model_reads_it(data: dict[str, Any]) -> None:
    read = dataclasses.asdict(answers.HeartbeatAck.read(data))
    assert read == HeartbeatAck.model_validate(data).model_dump()


@pytest.mark.parametrize("data", [
    {}, {"items": [{"id": "w1", "kind": "ping", "payload": {}}], "heartbeat": FULL_ACK,
         "extensions_etag": "", "more": True},
    {"heartbeat_error": {"code": "E3013", "message": "overloaded"}}])
def test_a_poll_answer_reads_as_the_model_reads_it(data: dict[str, Any]) -> None:
    read = dataclasses.asdict(answers.PollAnswer.read(data))
    assert read == wire.PollAnswer.model_validate(data).model_dump()


@pytest.mark.parametrize(("reader", "data", "named"), [
    (answers.HeartbeatAck, {"abandon": "j1"}, "abandon"),
    (answers.HeartbeatAck, {"abandon": [1]}, "abandon.0"),
    (answers.HeartbeatAck, {"hub_time": "soon"}, "hub_time"),
    (answers.HeartbeatAck, {"hub_time": float("nan")}, "hub_time"),
    (answers.HeartbeatAck, {"extensions_etag": 5}, "extensions_etag"),
    (answers.PollAnswer, {"items": [["w1"]]}, "items.0"),
    (answers.PollAnswer, {"heartbeat": "ok"}, "heartbeat"),
    (answers.PollAnswer, [], "poll answer"),
])
def test_an_answer_that_does_not_fit_is_refused_naming_the_field(
        reader: Any, data: Any, named: str) -> None:
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        reader.read(data)
    model = HeartbeatAck if reader is answers.HeartbeatAck else wire.PollAnswer
    with pytest.raises(ValueError):  # the model refuses it too
        model.model_validate(data)
