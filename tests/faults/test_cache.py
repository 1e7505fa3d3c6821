"""HW-9: a corrupt local cache heals itself; a corrupt machine key says how to re-register.

Each test corrupts a file of a real agent's state directory for real (garbage bytes, a
truncation, one flipped byte that keeps the JSON valid but fails the checksum) while the
agent heartbeats to a real hub, and watches the hub's last heartbeat, the file moved aside,
the agent's log and the fresh file.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from outpost.agent.state import StateDir, read_checked
from tests.support import SQLITE_ONLY, Agent, Hub, last_beat, registered_agent, run_cli, wait_until


def beats_after(hub: Hub, name: str, moment: float, timeout: float = 30) -> None:
    wait_until(lambda: last_beat(hub, name) > moment, timeout,
               what=f"a heartbeat of {name} after {moment}")


def beat_after_stop(hub: Hub, name: str) -> float:
    """The machine's last heartbeat once its stopped agent's last one has landed: a
    heartbeat sent before the stop (carried by a poll cut short) can still be recorded a
    moment after ``agent.stop()`` returns."""
    seen = [last_beat(hub, name)]

    def settled() -> bool:
        time.sleep(0.3)
        seen.append(last_beat(hub, name))
        return seen[-1] == seen[-2]

    wait_until(settled, 10, 0, what=f"the last heartbeat of {name} to land")
    return seen[-1]


def running(hub: Hub, tmp_path: Path, agents: list[Agent], name: str = "c1") -> Agent:
    agent = registered_agent(hub, tmp_path, name)
    agents.append(agent.start())
    beats_after(hub, name, 0)
    # hub.json is written after the first acknowledged heartbeat.
    wait_until(lambda: (agent.state_dir / "hub.json").exists(), 10, what="hub.json")
    return agent


def _replace(path: Path, data: bytes) -> None:
    """The damaged content in place at once: written in place, the agent could read the
    file empty in between and report that instead of the damage under test."""
    tmp = path.with_name(path.name + ".damage")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def garbage(path: Path) -> None:
    _replace(path, os.urandom(64) + b"\x00\xff not json")


def truncate(path: Path) -> None:
    data = path.read_bytes()
    _replace(path, data[: len(data) // 2])


def flip(path: Path) -> None:
    """One byte of a string value changes; the file is still valid JSON."""
    data = bytearray(path.read_bytes())
    at = data.index(b'"', data.index(b'"data"') + 8) + 1  # first string key inside "data"
    at = data.index(b'": "', at) + 4  # ... and its value's first character
    data[at] ^= 0x01
    _replace(path, bytes(data))
    json.loads(data)  # still JSON; only the checksum tells


def corrupt_copies(agent: Agent, name: str) -> list[Path]:
    return sorted(agent.state_dir.glob(f"{name}.corrupt-*"))


@pytest.mark.parametrize("name", ["registration.json", "identity.json", "hub.json"])
def test_a_corrupt_cache_file_heals_while_the_agent_runs(
        sqlite_hub: Hub, agents: list[Agent], tmp_path: Path, name: str) -> None:
    agent = running(sqlite_hub, tmp_path, agents)
    path = agent.state_dir / name
    good = read_checked(path)
    for n, damage in enumerate((garbage, truncate, flip), start=1):
        time.sleep(1.1)  # a new modification time even on a coarse file system
        damage(path)
        moment = time.time()
        wait_until(lambda: len(corrupt_copies(agent, name)) == n, 10,  # noqa: B023
                   what=f"{name} moved aside after {damage.__name__}")
        beats_after(sqlite_hub, "c1", moment)
        wait_until(lambda: path.exists(), 10, what=f"a fresh {name}")
        fresh = read_checked(path)  # the checksum holds again
        keep = set(good) - {"registered_at", "written_at", "hub_clock_offset"}
        assert {k: fresh[k] for k in keep} == {k: good[k] for k in keep}
        assert f"cache file {name} is corrupt" in agent.log()
    log = agent.log()
    assert "checksum mismatch" in log  # the flipped byte
    if name == "registration.json":
        assert "registration.json fetched again from https://localhost" in log
    assert agent.proc is not None and agent.proc.poll() is None  # it never stopped


# SQLite only: the agent's state directory, not the database.
@SQLITE_ONLY
def test_an_agent_started_on_a_corrupt_registration_fetches_it_again(
        hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    """The seed's symptom: the worker runs yet no heartbeat arrives. Here, it heals."""
    agent = running(hub, tmp_path, agents)
    agent.stop()
    before = beat_after_stop(hub, "c1")
    state = StateDir(agent.state_dir)
    good = state.registration()
    truncate(state.registration_path)
    truncate(state.hub_cache_path)
    agent.start()
    beats_after(hub, "c1", before)
    assert len(corrupt_copies(agent, "registration.json")) == 1
    assert len(corrupt_copies(agent, "hub.json")) == 1
    fresh = state.registration()
    assert fresh is not None and good is not None
    assert (fresh.machine_id, fresh.name, fresh.group, fresh.ca_pem, fresh.hub_urls) == \
        (good.machine_id, good.name, good.group, good.ca_pem, good.hub_urls)
    assert "registration.json fetched again from the hub" in agent.log()
    # hub.json is written from the heartbeat's answer, a moment after the hub records it.
    wait_until(lambda: {r["name"]: r["state"] for r in state.cache_report()} == {
        "machine.key": "ok", "identity.json": "ok", "registration.json": "ok",
        "hub.json": "ok"}, 15, what="every cached file intact again")


def test_a_corrupt_machine_key_refuses_to_start_and_says_how_to_register(
        sqlite_hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    agent = running(sqlite_hub, tmp_path, agents)
    agent.stop()
    truncate(agent.state_dir / "machine.key")
    before = beat_after_stop(sqlite_hub, "c1")
    result = run_cli("agent", "run", "--state-dir", str(agent.state_dir), timeout=30)
    assert result.returncode == 2, result.stderr  # the service unit does not restart on 2
    assert "E1013" in result.stderr
    assert "cannot be fetched again" in result.stderr
    assert "outpost agent register ... --force" in result.stderr
    assert "Traceback" not in result.stderr
    time.sleep(1.5)
    assert last_beat(sqlite_hub, "c1") == before
    report = {r["name"]: r for r in StateDir(agent.state_dir).cache_report()}
    assert report["machine.key"]["state"] == "corrupt"
    assert report["machine.key"]["refetchable"] is False


def test_a_machine_key_corrupted_under_a_running_agent_is_written_back_from_memory(
        sqlite_hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    agent = running(sqlite_hub, tmp_path, agents)
    key = agent.state_dir / "machine.key"
    original = key.read_bytes()
    garbage(key)
    moment = time.time()
    wait_until(lambda: corrupt_copies(agent, "machine.key"), 10, what="machine.key aside")
    wait_until(lambda: key.read_bytes() == original, 10, what="the key written back")
    assert "E1013 machine_key_corrupt" in agent.log()
    beats_after(sqlite_hub, "c1", moment)
    agent.stop()
    stopped = beat_after_stop(sqlite_hub, "c1")
    agent.start()  # and it starts again on the key it wrote back
    beats_after(sqlite_hub, "c1", stopped)


def test_registration_and_identity_both_corrupt_needs_registering_again(
        sqlite_hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    agent = running(sqlite_hub, tmp_path, agents)
    agent.stop()
    garbage(agent.state_dir / "registration.json")
    flip(agent.state_dir / "identity.json")
    result = run_cli("agent", "run", "--state-dir", str(agent.state_dir), timeout=30)
    assert result.returncode == 2, result.stderr
    assert "E7001" in result.stderr and "--force" in result.stderr
    assert len(corrupt_copies(agent, "identity.json")) == 1
    again = run_cli(*sqlite_hub.register_args(agent.state_dir, "c1"), "--force")
    assert again.returncode == 0, again.stderr
    agent.start()
    beats_after(sqlite_hub, "c1", time.time())


# --- outpost agent reset-cache -------------------------------------------------------------
def test_reset_cache_stops_clears_and_starts_the_running_agent(
        sqlite_hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    agent = running(sqlite_hub, tmp_path, agents)
    state = StateDir(agent.state_dir)
    key, identity = state.key_path.read_bytes(), state.identity()
    assert agent.proc is not None
    old_pid = agent.proc.pid
    result = run_cli("agent", "reset-cache", "--state-dir", str(agent.state_dir), timeout=60)
    new_pid = state.running_pid()
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        out = result.stdout
        assert f"The agent runs as pid {old_pid}, started by process" in out
        assert f"Stopped the agent (pid {old_pid})" in out
        assert "Removed registration.json, hub.json" in out
        assert "Kept machine.key and identity.json" in out
        assert "Started the agent again, detached" in out
        assert agent.proc.wait(5) == 0  # the old agent stopped gracefully
        assert new_pid is not None and new_pid != old_pid
        assert f"The agent runs again (pid {new_pid})" in out
        # What was cleared is fetched again; what cannot be fetched was never touched.
        wait_until(lambda: state.registration_path.exists()
                   and state.hub_cache_path.exists(), 15, what="the cache fetched again")
        assert state.registration() is not None
        assert state.key_path.read_bytes() == key and state.identity() == identity
        beats_after(sqlite_hub, "c1", time.time())
        assert "registration.json fetched again from the hub" in agent.log()
    finally:
        if new_pid:
            os.kill(new_pid, signal.SIGTERM)
            wait_until(lambda: state.running_pid() is None, 10, what="the new agent to stop")


def test_reset_cache_of_a_stopped_agent_says_how_to_start_it(
        sqlite_hub: Hub, tmp_path: Path) -> None:
    agent = registered_agent(sqlite_hub, tmp_path, "c2")
    result = run_cli("agent", "reset-cache", "--state-dir", str(agent.state_dir), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["removed"] == ["registration.json"] and data["was_running"] is False
    assert data["start_command"] == f"outpost agent run --state-dir {agent.state_dir}"
    assert (agent.state_dir / "machine.key").exists()
    assert (agent.state_dir / "identity.json").exists()

    # The identity still counts as a registration...
    again = run_cli(*sqlite_hub.register_args(agent.state_dir, "c2-other"))
    assert again.returncode == 1
    assert "Machine is already registered" in again.stdout + again.stderr
    assert "'c2'" in again.stdout + again.stderr
    # ...and the agent starts on the identity alone and fetches its registration.
    agent.start()
    try:
        beats_after(sqlite_hub, "c2", 0)
    finally:
        agent.stop()

    missing = run_cli("agent", "reset-cache", "--state-dir", str(tmp_path / "nowhere"))
    assert missing.returncode == 1
    assert "E1011" in missing.stdout + missing.stderr
