"""A real agent given work items it cannot take: a kind it has no handler for (a newer hub's,
or an extension's that is not installed) and a payload of the wrong shape. Each is answered
with an error result the hub stores, the agent logs the kind once, and goes on working.

The items are written into the hub's SQLite database as a newer hub would queue them (no
route queues an arbitrary kind); the hub's long-poll finds them at its next look."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

from tests.support import Agent, Hub, query, registered_agent, wait_until


def _queue(hub: Hub, machine: str, kind: str, payload: dict[str, Any]) -> str:
    [(machine_id, account_id)] = query(
        hub.database_url, f"SELECT id, account_id FROM machines WHERE name = '{machine}'")
    item_id = str(uuid.uuid4())
    conn = sqlite3.connect(hub.database_url[len("sqlite:///"):], timeout=10)
    try:
        with conn:
            conn.execute("INSERT INTO work_items (id, account_id, machine_id, kind, payload, "
                         "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                         (item_id, account_id, machine_id, kind, json.dumps(payload),
                          time.time()))
    finally:
        conn.close()
    return item_id


def _result(hub: Hub, item_id: str) -> dict[str, Any] | None:
    rows = query(hub.database_url,
                 f"SELECT result FROM work_items WHERE id = '{item_id}' AND done_at IS NOT NULL")
    if not rows:
        return None
    result = rows[0][0]
    return json.loads(result) if isinstance(result, str) else result


def test_unknown_and_malformed_work_is_answered_with_an_error(
        sqlite_hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    hub = sqlite_hub
    agent = registered_agent(hub, tmp_path, "m1", poll_timeout=25)
    agents.append(agent.start())
    wait_until(lambda: (hub.machines().get("m1") or {}).get("status") == "Healthy", 30,
               what="m1 healthy")

    first = _queue(hub, "m1", "reboot", {"now": True})
    second = _queue(hub, "m1", "reboot", {})
    bad = _queue(hub, "m1", "job_control", {"job_id": "j1", "action": "explode"})
    # The long-poll looks for work at least every 5 s, also when no wake-up reaches it.
    for item in (first, second, bad):
        wait_until(lambda item=item: _result(hub, item), 30, what=f"item {item} answered")

    error = (_result(hub, first) or {})["error"]
    assert error["code"] == "E8150" and error["reason"] == "work_kind_unknown", error
    assert "'reboot'" in error["message"] and error["fix"]
    assert (_result(hub, second) or {})["error"]["code"] == "E8150"
    malformed = (_result(hub, bad) or {})["error"]
    assert malformed["code"] == "E8151", malformed
    assert "attempt" in malformed["message"] and "action" in malformed["message"]

    log = agent.log()
    assert log.count("E8150") == 1, log[-3000:]  # once per kind, not per item
    assert "Traceback" not in log, log[-3000:]
    # The agent still takes work: a ping is answered.
    ping = hub.cli("machine", "ping", "m1", "--json")
    assert ping.returncode == 0, ping.stderr
    assert json.loads(ping.stdout)["agent_received_at"] is not None
    assert agent.proc is not None and agent.proc.poll() is None
