"""The work items the hub sends match the agent's models in protocol/work.py: items made by
the hub's own code (dispatcher.submit and claim, jobs.claim through the dispatcher, on a
real SQLite database) parse, and no field the hub sends is left out of the models."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from outpost.protocol import work as wire
from outpost.protocol.errors import OutpostError
from outpost.protocol.models import RegisterRequest

pytest.importorskip("fastapi")

from outpost.hub import accounts, db, groups, job_identity, jobs, machines, runbooks  # noqa: E402
from outpost.hub.dispatcher import Dispatcher  # noqa: E402
from outpost.hub.vault import Vault  # noqa: E402

ACCOUNT = "acct-test"


async def _hub(path: Path) -> tuple[Any, Any]:
    engine = db.make_engine(f"sqlite+aiosqlite:///{path}")
    await db.migrate(engine)
    await accounts.seed(engine, {"account_id": ACCOUNT, "account_name": "test",
                                 "primary_key": "p" * 44, "secondary_key": "s" * 44,
                                 "admin_token_hash": "h" * 64, "created_at": time.time()})
    answer = await machines.register(engine, ACCOUNT, RegisterRequest(
        name="web-1", group="web", public_key="k" * 44), 30.0)
    return engine, await machines.by_id(engine, answer["machine_id"])


def test_items_the_hub_makes_parse_with_the_agent_models(tmp_path: Path) -> None:
    async def scenario() -> list[dict[str, Any]]:
        engine, machine = await _hub(tmp_path / "hub.db")
        try:
            await runbooks.publish(engine, ACCOUNT, "hello", "echo hi\n", kind="bash",
                                   filename="hello.sh", description="", param_specs=[],
                                   log_verbose=True, log_progress=False)
            await groups.configure(engine, ACCOUNT, "web", {"run_as": "runbooks",
                                                            "memory_mb": 256, "cpus": 1.5,
                                                            "max_processes": 64})
            job = await jobs.start(engine, ACCOUNT, "hello", "web", {}, timeout="30")
            dispatcher = Dispatcher(engine)
            # The payloads as the hub's routes build them (machine ping, job stop).
            await dispatcher.submit(ACCOUNT, "ping", {"sent_at": time.time()},
                                    machine_id=machine.id)
            await dispatcher.submit(ACCOUNT, "job_control", {
                "job_id": job["id"], "attempt": 1, "action": "stop"}, machine_id=machine.id)
            # As the long-poll's answer carries them: each job with its attempt's token.
            items = await dispatcher.claim(machine, 16, capacity=1)
            await job_identity.add_tokens(engine, Vault(b"m" * 32), items)
            return items
        finally:
            await engine.dispose()

    items = asyncio.run(scenario())
    kinds = {item["kind"]: item for item in items}
    assert set(kinds) == {"ping", "job_control", "job"}
    for raw in items:
        item = wire.parse_item(raw)
        assert item.id == raw["id"]
        # Every key the hub sends is a field of the model: a new one must be added there.
        model = wire.PAYLOADS[item.kind]
        assert set(raw["payload"]) <= set(model.model_fields), item.kind
        assert set(raw) <= set(wire.RawItem.model_fields)
    claim = wire.parse_item(kinds["job"]).payload
    assert isinstance(claim, wire.JobClaim)
    assert set(kinds["job"]["payload"]) == set(wire.JobClaim.model_fields)
    assert claim.type == "bash" and claim.content == "echo hi\n" and claim.log_verbose
    assert claim.timeout == 30 and claim.run_as == "runbooks"
    assert claim.job_token and claim.as_job()["job_token"] == claim.job_token
    assert claim.limits == wire.JobLimits(memory_mb=256, cpus=1.5, processes=64)
    assert claim.as_job()["limits"]["memory_mb"] == 256  # as the sandbox reads it
    control = wire.parse_item(kinds["job_control"]).payload
    assert isinstance(control, wire.JobControlPayload) and control.action == "stop"
    assert isinstance(wire.parse_item(kinds["ping"]).payload, wire.PingPayload)


def test_a_bad_item_is_a_catalogued_error() -> None:
    with pytest.raises(OutpostError) as caught:
        wire.parse_item({"id": "w1", "kind": "reboot", "payload": {}})
    assert caught.value.code == "E8150" and "reboot" in caught.value.message
    with pytest.raises(OutpostError) as caught:
        wire.parse_item({"id": "w2", "kind": "job_control",
                         "payload": {"job_id": "j", "attempt": 1, "action": "explode"}})
    assert caught.value.code == "E8151"
    assert "payload.action" not in caught.value.message and "action" in caught.value.message
    with pytest.raises(OutpostError) as caught:
        wire.parse_item({"kind": "ping"})  # no id
    assert caught.value.code == "E8151"
    result = wire.error_result(caught.value)
    assert result["error"]["code"] == "E8151" and result["error"]["fix"]
