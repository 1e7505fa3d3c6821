"""The agent's state directory: atomic checked files, the machine key, the pidfile."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from outpost.agent import state as state_mod
from outpost.agent.state import (
    CorruptFile,
    Registration,
    StateDir,
    atomic_write,
    read_checked,
    write_checked,
)
from outpost.protocol import signing
from outpost.protocol.errors import OutpostError


def _registration(**over: object) -> Registration:
    values: dict[str, object] = dict(
        machine_id="m-123", account_id="acc-1", name="web-1", group="web",
        hub_urls=["https://hub:8443", "https://hub2:8443"], ca_pem="-----BEGIN...",
        ca_fingerprint="ab" * 32, labels={"zone": "a"}, registered_at=1700000000.5)
    values.update(over)
    return Registration(**values)  # type: ignore[arg-type]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- atomic, checked files -----------------------------------------------------------------
def test_atomic_write_replaces_content_with_mode_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new"
    assert _mode(path) == 0o600
    atomic_write(path, b"public", 0o644)
    assert _mode(path) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_atomic_write_into_a_missing_directory_fails_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "absent" / "f", b"x")
    assert list(tmp_path.iterdir()) == []


def test_checked_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    data = {"b": [1, 2], "a": {"x": "é"}, "n": None}
    write_checked(path, data)
    assert read_checked(path) == data
    wrapper = json.loads(path.read_text())
    body = json.dumps(data, sort_keys=True, separators=(",", ":"))
    assert wrapper["sha256"] == hashlib.sha256(body.encode()).hexdigest()


def _tamper(path: Path) -> None:
    wrapper = json.loads(path.read_text())
    wrapper["data"]["name"] = "someone-else"
    path.write_text(json.dumps(wrapper))


@pytest.mark.parametrize("damage", [
    pytest.param(_tamper, id="edited"),
    pytest.param(lambda p: p.write_bytes(p.read_bytes()[:20]), id="torn"),
    pytest.param(lambda p: p.write_bytes(b""), id="empty"),
    pytest.param(lambda p: p.write_bytes(b"\xff\xfe\x00garbage"), id="binary"),
    pytest.param(lambda p: p.write_text("[1, 2]"), id="list"),
    pytest.param(lambda p: p.write_text('{"data": {}}'), id="no-checksum"),
    pytest.param(lambda p: p.write_text('{"sha256": 5, "data": {}}'), id="checksum-type"),
    pytest.param(lambda p: p.write_text(json.dumps(
        {"sha256": hashlib.sha256(b"[1]").hexdigest(), "data": [1]})), id="data-not-mapping"),
])
def test_a_damaged_checked_file_is_detected(tmp_path: Path,
                                            damage: Callable[[Path], object]) -> None:
    path = tmp_path / "c.json"
    write_checked(path, {"name": "web-1"})
    damage(path)
    with pytest.raises(CorruptFile, match=str(path)):
        read_checked(path)


# --- registration --------------------------------------------------------------------------
def test_registration_round_trip_and_clear(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "deep" / "state")
    assert state.registration() is None
    reg = _registration()
    state.save_registration(reg)
    assert state.registration() == reg
    assert _mode(state.root) == 0o700
    assert _mode(state.registration_path) == 0o600
    state.new_key()
    state.clear_registration()
    assert state.registration() is None
    assert not state.key_path.exists()
    state.clear_registration()  # clearing twice is fine


def test_a_registration_with_wrong_fields_is_corrupt(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    data = _registration().to_dict()
    del data["group"]
    data["unexpected"] = 1
    write_checked(state.registration_path, data)
    with pytest.raises(CorruptFile):
        state.registration()


# --- machine key ---------------------------------------------------------------------------
def test_new_key_is_private_and_loads_back_as_the_same_key(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "s")
    key = state.new_key()
    assert _mode(state.key_path) == 0o600
    loaded = state.load_key()
    public = bytes(key.verify_key)
    assert bytes(loaded.verify_key) == public
    sig = signing.sign_machine(loaded, "POST", "/v1/agent/heartbeat", "t", "n", b"{}")
    assert signing.verify_machine(public, sig, "POST", "/v1/agent/heartbeat", "t", "n", b"{}")


def test_each_new_key_is_different(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    assert bytes(state.new_key().verify_key) != bytes(state.new_key().verify_key)


def test_missing_key_means_not_registered(tmp_path: Path) -> None:
    with pytest.raises(OutpostError) as caught:
        StateDir(tmp_path).load_key()
    assert caught.value.reason == "not_registered"
    assert str(tmp_path) in caught.value.message


@pytest.mark.parametrize("content", [
    b"", b"garbage", b"\xff\xfe\xfd",
    b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
])
def test_corrupt_key_says_so_and_how_to_recover(tmp_path: Path, content: bytes) -> None:
    state = StateDir(tmp_path)
    state.new_key()
    state.key_path.write_bytes(content)
    with pytest.raises(OutpostError) as caught:
        state.load_key()
    assert "corrupt" in caught.value.message
    assert str(state.key_path) in caught.value.message
    assert "--force" in caught.value.fix


def test_truncated_key_seed_is_corrupt(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.new_key()
    lines = state.key_path.read_text().splitlines()
    lines[1] = signing.b64(signing.unb64(lines[1])[:31])
    state.key_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(OutpostError, match="corrupt"):
        state.load_key()


# --- pidfile -------------------------------------------------------------------------------
def _dead_pid() -> int:
    pid = 4_000_000
    while psutil.pid_exists(pid):
        pid -= 1
    return pid


@pytest.fixture
def looks_like_outpost(monkeypatch: pytest.MonkeyPatch) -> None:
    """This test process passes for an agent (its real command line is pytest's)."""
    monkeypatch.setattr(psutil.Process, "cmdline",
                        lambda self: ["python", "-m", "outpost.cli.agentd"])


@pytest.mark.usefixtures("looks_like_outpost")
def test_write_and_remove_pid(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    assert state.running_pid() is None
    state.write_pid()
    assert state.running_pid() == os.getpid()
    assert _mode(state.pidfile) == 0o644
    state.remove_pid()
    assert not state.pidfile.exists()
    state.remove_pid()  # nothing to remove is fine


@pytest.mark.usefixtures("looks_like_outpost")
def test_remove_pid_leaves_another_process_pidfile(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.pidfile.write_text(f"{os.getppid()} 1700000000.0\n")
    state.remove_pid()
    assert state.pidfile.exists()


@pytest.mark.usefixtures("looks_like_outpost")
@pytest.mark.parametrize("content", ["", "\n", "abc", "12x 5", "0 1700000000", "-1 1",
                                     "DEAD"])
def test_stale_or_garbage_pidfile_is_not_a_running_agent(tmp_path: Path, content: str) -> None:
    state = StateDir(tmp_path)
    state.pidfile.write_text(content.replace("DEAD", str(_dead_pid())))
    assert state.running_pid() is None


def test_a_reused_pid_of_another_program_is_not_a_running_agent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = StateDir(tmp_path)
    state.write_pid()
    monkeypatch.setattr(psutil.Process, "cmdline", lambda self: ["/usr/sbin/sshd", "-D"])
    assert state.running_pid() is None
    monkeypatch.setattr(psutil.Process, "cmdline",
                        lambda self: ["/usr/bin/python3", "/usr/bin/outpost", "agent", "run"])
    assert state.running_pid() == os.getpid()


# --- paths ---------------------------------------------------------------------------------
def test_socket_in_the_state_dir_or_abstract_when_the_path_is_too_long(tmp_path: Path) -> None:
    short = StateDir(tmp_path / "s")
    assert short.socket_address == str((tmp_path / "s").resolve() / "agent.sock")
    long_root = tmp_path / ("x" * 120)
    address = StateDir(long_root).socket_address
    assert address.startswith("\0outpost-")
    assert len(address.encode()) < 108
    assert address == StateDir(long_root).socket_address  # stable
    assert address != StateDir(tmp_path / ("y" * 120)).socket_address


def test_default_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert state_mod.default_state_dir() == tmp_path / "outpost"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert state_mod.default_state_dir() == tmp_path / "home" / ".local" / "state" / "outpost"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert state_mod.default_state_dir() == Path("/var/lib/outpost")


# --- the cache and its report (HW-9) ---------------------------------------------------------
def test_cache_report_names_each_file_and_its_condition(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    assert {r["name"]: r["state"] for r in state.cache_report()} == {
        "machine.key": "missing", "identity.json": "missing", "registration.json": "missing",
        "hub.json": "missing"}
    state.new_key()
    state.save_registration(_registration())
    state.save_hub_cache({"min_agent_version": "0.1.0"})
    report = {r["name"]: r for r in state.cache_report()}
    assert {n: r["state"] for n, r in report.items()} == dict.fromkeys(report, "ok")
    assert report["machine.key"]["refetchable"] is False
    assert report["registration.json"]["kind"] == "cache"
    assert state.identity() == {k: getattr(_registration(), k) for k in state_mod.IDENTITY_FIELDS}

    state.hub_cache_path.write_bytes(b"\x00garbage")
    text = state.registration_path.read_text()
    state.registration_path.write_text(text.replace('"web-1"', '"web-2"'))  # valid JSON
    state.key_path.write_text(state.key_path.read_text()[:20])
    report = {r["name"]: r for r in state.cache_report()}
    assert report["hub.json"]["state"] == "corrupt"
    assert "checksum mismatch" in report["registration.json"]["detail"]
    assert report["machine.key"]["state"] == "corrupt"
    assert "register" in report["machine.key"]["detail"] or "corrupt" in report[
        "machine.key"]["detail"]
    assert report["identity.json"]["state"] == "ok"


def test_quarantine_and_clear_cache_keep_key_and_identity(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.new_key()
    state.save_registration(_registration())
    state.identity_path.unlink()  # a state directory written before identity.json existed
    state.save_hub_cache({"min_agent_version": "0.1.0"})
    moved = state.quarantine(state.hub_cache_path)
    again = state.quarantine(state.registration_path.rename(state.hub_cache_path))
    assert moved != again and moved.name.startswith("hub.json.corrupt-")
    assert state.corrupt_copies() == sorted([moved, again])
    state.save_registration(_registration())
    state.identity_path.unlink()
    removed = state.clear_cache()
    assert removed == [state.registration_path]
    assert state.key_path.exists() and state.identity()["machine_id"] == "m-123"  # type: ignore[index]


def test_clear_cache_refuses_when_nothing_holds_the_identity(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.save_registration(_registration())
    state.identity_path.unlink()
    state.registration_path.write_bytes(b"{}")
    with pytest.raises(CorruptFile):
        state.clear_cache()
    assert state.registration_path.exists()
