"""The operator's view of the fleet: machine status over time, heartbeats, removal, accounts
and their isolation, and work dispatch through the long-poll (``machine ping``)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from outpost import __version__
from tests.support import Agent, Hub, query, register, registered_agent, run_cli, wait_until


def _json(result: Any) -> Any:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return json.loads(result.stdout)


def _listed(hub: Hub, token: str | None = None) -> dict[str, dict[str, Any]]:
    rows = _json(hub.cli("machine", "list", "--json", token=token))
    return {m["name"]: m for m in rows}


def _status(hub: Hub, name: str) -> str | None:
    """The machine's status as GET /v1/machines gives it (what ``machine list --json``
    prints): waited on every 0.2 s, where a command would take longer than the interval."""
    machine = hub.machines().get(name)
    return machine["status"] if machine else None


def _refused(result: Any, code: str, exit_code: int = 1) -> str:
    """The command failed with ``exit_code`` and the error's code, and no traceback."""
    assert result.returncode == exit_code, (result.returncode, result.stdout, result.stderr)
    err: str = result.stderr
    assert f"code:   {code}" in err, err
    assert "fix:" in err, err
    assert "Traceback" not in err, err
    return err


def _table(stdout: str) -> list[list[str]]:
    """The cells of a table the CLI printed: the header first, then one list per row."""
    rows = []
    for line in stdout.splitlines():
        if "\u2503" in line or "\u2502" in line:
            rows.append([cell.strip() for cell in line.replace("\u2503", "\u2502").split("\u2502")])
    return rows


def _row(rows: list[list[str]], name: str) -> list[str]:
    found = [row for row in rows if row[0] == name]
    assert len(found) == 1, rows
    return found[0]


def _healthy(hub: Hub, name: str, token: str | None = None) -> dict[str, Any]:
    def check() -> dict[str, Any]:
        machine = hub.machines(token).get(name) or {}
        return machine if machine.get("status") == "Healthy" else {}

    return wait_until(check, 15, 0.1, f"{name} to be Healthy")


# --- status over time -----------------------------------------------------------------------

def test_status_after_kill_9(hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    state = tmp_path / "agent-m1"
    result = register(hub, state, "m1", "web", "--label", "env=prod", "--label", "tier=db")
    assert result.returncode == 0, result.stderr
    agent = Agent(state, "m1")
    agents.append(agent.start())
    _healthy(hub, "m1")

    machine = _listed(hub)["m1"]
    assert machine["group"] == "web"
    assert machine["labels"] == {"env": "prod", "tier": "db"}
    assert machine["agent_version"] == __version__
    assert machine["status"] == "Healthy"
    assert machine["heartbeat_interval"] == 1

    text = hub.cli("machine", "list")
    assert text.returncode == 0, text.stderr
    rows = _table(text.stdout)
    assert rows[0] == ["NAME", "GROUP", "LABELS", "VERSION", "STATUS", "LAST HEARTBEAT"], rows
    row = _row(rows, "m1")
    assert row[:5] == ["m1", "web", "env=prod,tier=db", __version__, "Healthy"], rows
    assert re.fullmatch(r"[0-9]s ago", row[5]), rows

    assert agent.proc is not None
    agent.proc.kill()  # kill -9: no goodbye to the hub
    agent.proc.wait()
    killed = time.monotonic()

    wait_until(lambda: _status(hub, "m1") == "Unresponsive", 8, 0.2, "m1 to be Unresponsive")
    unresponsive = time.monotonic() - killed
    assert 1.0 <= unresponsive <= 6.0, unresponsive
    assert _row(_table(hub.cli("machine", "list").stdout), "m1")[4] == "Unresponsive"

    wait_until(lambda: _status(hub, "m1") == "Disconnected", 15, 0.2, "m1 to be Disconnected")
    disconnected = time.monotonic() - killed
    assert 8.0 <= disconnected <= 14.0, disconnected
    text = hub.cli("machine", "list")
    assert text.returncode == 0, text.stderr
    row = _row(_table(text.stdout), "m1")
    assert row[:5] == ["m1", "web", "env=prod,tier=db", __version__, "Disconnected"], text.stdout
    assert re.fullmatch(r"[0-9]+s ago", row[5]), text.stdout


def test_heartbeats_show_load_memory_and_disk(hub: Hub, agents: list[Agent],
                                              tmp_path: Path) -> None:
    agents.append(registered_agent(hub, tmp_path, "m1").start())
    agents.append(registered_agent(hub, tmp_path, "m2", "db").start())
    assert register(hub, tmp_path / "agent-m3", "m3").returncode == 0  # never started
    _healthy(hub, "m1")
    _healthy(hub, "m2")

    rows = _json(hub.cli("machine", "heartbeats", "--json"))
    assert [r["name"] for r in rows] == ["m1", "m2", "m3"]
    for row in rows[:2]:
        assert row["status"] == "Healthy"
        assert row["seconds_ago"] is not None and 0 <= row["seconds_ago"] < 5, row
        beat = row["heartbeat"]
        assert beat["agent_version"] == __version__
        assert beat["heartbeat_interval"] == 1
        assert beat["load1"] >= 0
        assert 0 < beat["memory_percent"] <= 100
        assert beat["memory_used_bytes"] > 0
        assert beat["disk_free_bytes"] > 0
        assert 0 <= beat["disk_percent"] <= 100
        assert beat["uptime_seconds"] >= 0
    assert rows[2]["status"] == "Pending"
    assert rows[2]["heartbeat"] is None and rows[2]["last_heartbeat_at"] is None

    text = hub.cli("machine", "heartbeats")
    assert text.returncode == 0, text.stderr
    rows = _table(text.stdout)
    assert rows[0] == ["NAME", "STATUS", "LAST HEARTBEAT", "LOAD", "MEM %", "DISK FREE"], rows
    m1 = _row(rows, "m1")
    assert m1[1] == "Healthy" and re.fullmatch(r"[0-9]s ago", m1[2]), rows
    assert re.fullmatch(r"[0-9]+\.[0-9]{2}", m1[3]) and 0 < float(m1[4]) <= 100, rows
    assert re.fullmatch(r"[0-9]+ (B|KB|MB|GB|TB)", m1[5]), rows
    assert _row(rows, "m3") == ["m3", "Pending", "never", "", "", ""], rows


# --- removal --------------------------------------------------------------------------------

def test_removed_machine_is_refused(hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    agent = registered_agent(hub, tmp_path, "m1")
    agents.append(agent.start())
    assert register(hub, tmp_path / "agent-m2", "m2").returncode == 0
    _healthy(hub, "m1")
    shown = hub.cli("machine", "show", "m1")
    assert shown.returncode == 0, shown.stderr
    # Times as an operator reads them, not seconds since 1970.
    assert re.search(r"last_heartbeat_at: +20\d\d-\d\d-\d\d \d\d:\d\d:\d\d UTC \(\d+s ago\)",
                     shown.stdout), shown.stdout
    assert re.search(r"registered_at: +20\d\d-", shown.stdout)

    removed = hub.cli("machine", "remove", "m1")
    assert removed.returncode == 0, removed.stderr
    assert "Machine 'm1' removed." in removed.stdout
    assert set(_listed(hub)) == {"m2"}
    _refused(hub.cli("machine", "show", "m1"), "E3002")
    _refused(hub.cli("machine", "remove", "m1"), "E3002")

    # The agent still runs; its next signed requests are refused as an unknown machine.
    def refused() -> dict[str, Any]:
        status = agent.status() or {}
        error = status.get("last_error") or {}
        return status if error.get("code") == "E1008" else {}

    status = wait_until(refused, 10, 0.2, "the agent to see E1008")
    assert status["running"] is True
    assert status["last_error"]["kind"] == "machine_unknown"
    assert "outpost agent register" in status["last_error"]["fix"]
    assert "E1008" in agent.log()
    assert agent.proc is not None and agent.proc.poll() is None
    assert set(_listed(hub)) == {"m2"}  # refused requests do not bring it back

    removed = _json(hub.cli("machine", "remove", "m2", "--json"))
    assert removed == {"name": "m2", "removed": True}
    assert _json(hub.cli("machine", "list", "--json")) == []
    assert "No machines are registered" in hub.cli("machine", "list").stdout


# --- accounts and isolation -----------------------------------------------------------------

def test_accounts_are_isolated(hub: Hub, tmp_path: Path) -> None:
    assert register(hub, tmp_path / "agent-m1", "m1").returncode == 0
    second = _json(hub.cli("account", "create", "second", "--json"))
    assert set(second) >= {"id", "name", "primary_key", "secondary_key", "token"}, second
    assert second["name"] == "second" and second["id"] != hub.account_id
    token = second["token"]

    # Text mode of account create, and a duplicate name.
    third = hub.cli("account", "create", "third")
    assert third.returncode == 0, third.stderr
    assert "Account 'third' created." in third.stdout and "token:" in third.stdout
    _refused(hub.cli("account", "create", "third"), "E3009")

    assert _json(hub.cli("machine", "list", "--json", token=token)) == []
    assert "No machines are registered" in hub.cli("machine", "list", token=token).stdout
    for command in (("machine", "show", "m1"), ("machine", "remove", "m1"),
                    ("machine", "ping", "m1", "--timeout", "1"),
                    ("account", "keys", hub.account_id)):
        err = _refused(hub.cli(*command, token=token), "E3002")
        assert "E3002 (not_found)" in err
    m1_id = _listed(hub)["m1"]["id"]
    _refused(hub.cli("machine", "show", m1_id, token=token), "E3002")  # by id neither
    _refused(hub.cli("account", "keys", hub.account_id, "--regenerate", "primary",
                     token=token), "E3002")
    assert _listed(hub)["m1"]["id"] == m1_id  # still there for its own account
    assert _json(hub.cli("account", "keys", hub.account_id, "--json"))["primary_key"] \
        == hub.primary_key

    _refused(hub.cli("account", "create", "x", token=token), "E3004")
    mine = _json(hub.cli("account", "list", "--json", token=token))
    assert [(a["id"], a["name"]) for a in mine] == [(second["id"], "second")]
    everyone = _json(hub.cli("account", "list", "--json"))
    assert {a["name"] for a in everyone} == {"default", "second", "third"}
    keys = _json(hub.cli("account", "keys", second["id"], "--json", token=token))
    assert keys["primary_key"] == second["primary_key"]
    assert keys["secondary_key"] == second["secondary_key"]

    # A bad token: 401 on the API, exit 1 with E3001 in the CLI.
    _refused(hub.cli("machine", "list", token="opt_not-a-token"), "E3001")
    response = hub.api("GET", "/v1/machines", "opt_not-a-token")
    assert response.status_code == 401
    assert response.json()["code"] == "E3001"
    response = hub.api("GET", "/v1/machines/m1", token)
    assert response.status_code == 404 and response.json()["code"] == "E3002"

    # An agent registered with the second account's keys belongs to the second account only.
    args = hub.register_args(tmp_path / "agent-s1", "s1", key=second["primary_key"])
    args[args.index("--account-id") + 1] = second["id"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert set(_listed(hub, token)) == {"s1"}
    assert set(_listed(hub)) == {"m1"}
    _refused(hub.cli("machine", "show", "s1"), "E3002")
    shown = _json(hub.cli("machine", "show", "s1", "--json", token=token))
    assert shown["name"] == "s1" and shown["status"] == "Pending"

    # The first account's key cannot register into the second account.
    args = hub.register_args(tmp_path / "agent-s2", "s2")
    args[args.index("--account-id") + 1] = second["id"]
    _refused(run_cli(*args), "E1002")


# --- dispatch: the long-poll is woken at once -----------------------------------------------

def test_ping_wakes_the_long_poll(hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    agent = registered_agent(hub, tmp_path, "m1", poll_timeout=25)
    agents.append(agent.start())
    _healthy(hub, "m1")

    for _ in range(2):
        started = time.monotonic()
        answer = _json(hub.cli("machine", "ping", "m1", "--json"))
        elapsed = time.monotonic() - started
        # The poll waits 25 s: an answer well within that was woken, not timed out. The wall
        # time includes starting the CLI, which takes seconds on a loaded 2-core machine;
        # the hub's own round trip is the tight measure.
        assert elapsed < 10.0, elapsed
        assert answer["machine"] == "m1"
        assert 0 <= answer["round_trip_ms"] < 1000, answer
        assert answer["agent_received_at"] is not None
        time.sleep(0.3)  # the agent is back in its long-poll

    text = hub.cli("machine", "ping", "m1")
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("m1 answered in ") and text.stdout.rstrip().endswith(" ms")

    assert agent.stop() == 0
    started = time.monotonic()
    result = hub.cli("machine", "ping", "m1", "--timeout", "1")
    assert time.monotonic() - started < 10  # 1 s of waiting, plus starting the CLI
    err = _refused(result, "E3010")
    assert "m1" in err
    response = hub.api("POST", "/v1/machines/m1/ping", params={"timeout": 1})
    assert response.status_code == 504, response.text
    assert response.json()["code"] == "E3010"
    assert "Traceback" not in hub.log()
    # Pings nobody answered are withdrawn: an agent that starts later gets no stale work.
    assert query(hub.database_url,
                 "SELECT count(*) FROM work_items WHERE done_at IS NULL") == [(0,)]
