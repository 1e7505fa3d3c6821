"""The agent daemon as a user meets it: config errors (ED-2), ``agent status`` (HW-3),
signals, network failures that never stop it (ED-4), OUTPOST_LOG, and an outdated agent
(HW-5). Real hub and agent processes over HTTPS.

The tests that leave the hub running share one (``module_hub``), each with machines of its
own names; the two that stop or restart it have their own. All run on SQLite: the agent is
the subject here, not the database."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.support import (MODULE_HUB_SQLITE_ONLY, SQLITE_ONLY, Agent, Hub, clean_env, free_port,
                           registered_agent, run_cli, wait_until)


def _run(state: Path, *extra: str, env: dict[str, str] | None = None,
         timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return run_cli("agent", "run", "--state-dir", str(state), *extra, env=env,
                   timeout=timeout)


def _status(state: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli("agent", "status", "--state-dir", str(state), *extra)


def _running(agent: Agent) -> Any:
    """The agent's status once it answers on its socket (fails if the process exits)."""
    def check() -> dict[str, Any] | None:
        assert agent.proc is not None
        if agent.proc.poll() is not None:
            raise AssertionError(f"the agent exited with {agent.proc.returncode}:\n"
                                 f"{agent.log()}")
        return agent.status()
    return wait_until(check, 20, 0.2, f"agent {agent.name} to answer\n{agent.log()}")


def _healthy(hub: Hub, name: str, timeout: float = 20) -> Any:
    def check() -> dict[str, Any] | None:
        machine = hub.machines().get(name)
        return machine if machine and machine["status"] == "Healthy" else None
    return wait_until(check, timeout, 0.2, f"{name} to be Healthy")


def _in_log(agent: Agent, *texts: str, timeout: float = 20) -> Any:
    return wait_until(lambda: all(t in agent.log() for t in texts) and agent.log(), timeout,
                      0.1, f"{texts} in the log of {agent.name}:\n{agent.log()}")


def _alive(agent: Agent) -> None:
    assert agent.proc is not None
    assert agent.proc.poll() is None, f"the agent exited:\n{agent.log()}"


# --- ED-2: config errors name the file, line and column -----------------------------------

def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _assert_config_error(result: subprocess.CompletedProcess[str], where: str,
                         code: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    err = result.stderr
    assert f"error: {where}" in err, err
    assert code in err, err
    assert "fix:" in err, err
    return err


def test_tab_in_config_names_file_line_column_and_says_use_spaces(tmp_path: Path) -> None:
    # The config is read before the registration: an unregistered state dir gets the same
    # answer, and nothing is started.
    state = tmp_path / "state"
    cfg = _write(tmp_path / "agent.yaml", "log_level: info\nhub_urls:\n\t- https://hub:8443\n")
    err = _assert_config_error(_run(state, "--config", str(cfg)), f"{cfg}:3:1:", "E2002")
    assert "tab" in err and "use spaces" in err
    assert "line 3, column 1" in err
    assert not (state / "agent.pid").exists()


def test_bad_value_names_file_line_column_and_setting(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "agent.yaml",
                 "log_level: info\nproxy: null\nheartbeat_interval: fast\n")
    err = _assert_config_error(_run(tmp_path / "state", "--config", str(cfg)),
                               f"{cfg}:3:21: heartbeat_interval: must be a number (found 'fast')",
                               "E2001")
    assert "setting=heartbeat_interval" in err


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "agent.yaml", "log_level: info\n  heartbeat_interval: 3\n")
    err = _assert_config_error(_run(tmp_path / "state", "--config", str(cfg)),
                               f"{cfg}:2:21:", "E2001")
    assert "line 2, column 21" in err


def test_default_config_in_the_state_dir_is_checked_too(tmp_path: Path) -> None:
    state = tmp_path / "state"
    cfg = _write(state / "agent.yaml", "heartbeat_interval: 1\nbogus: 1\n")
    err = _assert_config_error(_run(state), f"{cfg}:2:1: bogus: unknown setting", "E2001")
    assert "outpost explain E2001" in err


def test_missing_config_file_is_bad_input(tmp_path: Path) -> None:
    cfg = tmp_path / "nope.yaml"
    err = _assert_config_error(_run(tmp_path / "state", "--config", str(cfg)), str(cfg),
                               "E2001")
    assert "does not exist" in err


# SQLite only: the agent's config check, not the database.
@MODULE_HUB_SQLITE_ONLY
def test_registered_agent_with_a_bad_config_does_not_start(module_hub: Hub,
                                                           tmp_path: Path) -> None:
    hub = module_hub
    agent = registered_agent(hub, tmp_path, "badcfg")
    cfg = _write(agent.state_dir / "agent.yaml", "heartbeat_interval: 0\n")
    err = _assert_config_error(_run(agent.state_dir), f"{cfg}:1:21: heartbeat_interval: must be "
                               "between 1 and 3600", "E2001")
    assert "Traceback" not in err
    assert hub.machines()["badcfg"]["status"] == "Pending"


def test_run_without_registration_says_how_to_register(tmp_path: Path) -> None:
    result = _run(tmp_path / "state")
    assert result.returncode == 1, result.stderr
    assert "E1011" in result.stderr and "outpost agent register" in result.stderr


# --- HW-3: agent status ----------------------------------------------------------------------

def test_status_when_not_running(tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = _status(state)
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert "not running" in result.stdout
    assert f"outpost agent run --state-dir {state}" in result.stdout

    result = _status(state, "--json")
    assert result.returncode == 3
    info = json.loads(result.stdout)
    assert info["running"] is False
    assert info["pid"] is None
    assert info["start_command"] == f"outpost agent run --state-dir {state}"


def test_status_with_a_stale_pidfile_is_not_running(tmp_path: Path) -> None:
    # The agent was killed (kill -9) and its pid now belongs to another program.
    state = tmp_path / "state"
    state.mkdir()
    other = subprocess.Popen(["sleep", "60"])
    try:
        (state / "agent.pid").write_text(f"{other.pid} 1700000000.0\n")
        result = _status(state, "--json")
        assert result.returncode == 3
        assert json.loads(result.stdout)["pid"] is None
        result = _status(state)
        assert result.returncode == 3
        assert "not running" in result.stdout, result.stdout
    finally:
        other.kill()
        other.wait()


# SQLite only: the agent's status socket, not the database.
@MODULE_HUB_SQLITE_ONLY
def test_status_of_a_running_agent(module_hub: Hub, agents: list[Agent],
                                   tmp_path: Path) -> None:
    hub = module_hub
    agent = registered_agent(hub, tmp_path, "st1", group="db")
    agents.append(agent.start())
    assert agent.proc is not None
    _running(agent)
    wait_until(lambda: (s := agent.status()) and s["last_heartbeat_ack_at"], 15, 0.2,
               "a heartbeat to be acknowledged")
    shown = _status(agent.state_dir, "--json")  # the command's own JSON
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["running"] is True
    assert info["pid"] == agent.proc.pid  # 'agent run' became the daemon: same pid
    assert info["uptime_seconds"] >= 0
    assert info["version"]
    assert info["hub_url"] == hub.url
    assert info["account_id"] == hub.account_id
    assert info["group"] == "db"
    assert info["machine_name"] == "st1"
    assert info["last_heartbeat_ack_at"] <= time.time()
    assert info["last_error"] is None
    assert [p["role"] for p in info["processes"]] == ["agent"]
    assert info["processes"][0]["pid"] == agent.proc.pid

    text = _status(agent.state_dir)
    assert text.returncode == 0, text.stderr
    assert f"running, pid {agent.proc.pid}" in text.stdout
    assert hub.url in text.stdout and "last error:     none" in text.stdout


# --- signals and the pidfile ---------------------------------------------------------------

# SQLite only: the agent's pid file and signals, not the database.
@MODULE_HUB_SQLITE_ONLY
def test_one_agent_per_state_dir_and_sigterm_stops_it(module_hub: Hub, agents: list[Agent],
                                                     tmp_path: Path) -> None:
    hub = module_hub
    agent = registered_agent(hub, tmp_path, "sig1")
    agents.append(agent.start())
    assert agent.proc is not None
    first = _running(agent)
    pidfile = agent.state_dir / "agent.pid"
    assert int(pidfile.read_text().split()[0]) == agent.proc.pid

    # A second 'agent run' on the same state dir is refused and leaves the first alone.
    result = _run(agent.state_dir, "--config", str(agent.state_dir / "agent.yaml"))
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "E2006" in result.stderr
    assert f"pid {agent.proc.pid}" in result.stderr
    _alive(agent)
    assert int(pidfile.read_text().split()[0]) == agent.proc.pid
    again = agent.status()
    assert again is not None and again["pid"] == first["pid"]

    start = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(10) == 0, agent.log()
    assert time.monotonic() - start < 5
    assert not pidfile.exists()
    assert not (agent.state_dir / "agent.sock").exists()
    assert "stopped" in agent.log() and "Traceback" not in agent.log()
    assert _status(agent.state_dir).returncode == 3


# SQLite only: the agent's signal handling, not the database.
@MODULE_HUB_SQLITE_ONLY
def test_sigint_twice_exits_promptly(module_hub: Hub, agents: list[Agent],
                                    tmp_path: Path) -> None:
    hub = module_hub
    agent = registered_agent(hub, tmp_path, "sig2")
    agents.append(agent.start())
    assert agent.proc is not None
    _running(agent)
    start = time.monotonic()
    agent.proc.send_signal(signal.SIGINT)
    agent.proc.send_signal(signal.SIGINT)
    code = agent.proc.wait(10)
    assert time.monotonic() - start < 5
    # Interrupted (130, or killed by the second SIGINT) or a clean stop: never a hang.
    assert code in (0, 130, -signal.SIGINT), (code, agent.log())
    assert "Traceback" not in agent.log()
    assert _status(agent.state_dir).returncode == 3
    # Whatever the second interrupt left behind does not keep the agent from starting.
    agent.start()
    _running(agent)


# --- ED-4: network failures never stop the agent -------------------------------------------

# SQLite only: the agent riding out a hub that is down (the database's outages:
# tests/faults/test_db_outage.py).
@SQLITE_ONLY
def test_agent_outlives_a_hub_outage(hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    agent = registered_agent(hub, tmp_path, "net1", backoff_max=2)
    hub.stop()
    agents.append(agent.start())
    _in_log(agent, "heartbeat failed: hub unreachable (refused)")
    status = _running(agent)
    assert status["last_heartbeat_ack_at"] is None
    assert status["last_error"]["kind"] == "refused"
    assert status["last_error"]["code"] == "E2004"
    _alive(agent)

    hub.start()
    _healthy(hub, "net1")
    _alive(agent)
    # The hub records a heartbeat carried by a poll as the poll arrives; the agent hears
    # of it when the poll returns (within its heartbeat interval, a second here).
    _in_log(agent, "heartbeat acknowledged again")
    after = agent.status()
    assert after is not None and after["pid"] == status["pid"]  # not restarted
    assert after["last_error"] is None


# SQLite only: the agent's name resolution and fail-over, not the database.
@MODULE_HUB_SQLITE_ONLY
def test_unresolvable_hub_and_fail_over(module_hub: Hub, agents: list[Agent],
                                       tmp_path: Path) -> None:
    hub = module_hub
    lost = registered_agent(hub, tmp_path, "net2", backoff_max=2,
                            hub_urls=["https://no-such-host.invalid:8443"])
    dead = f"https://localhost:{free_port()}"
    failover = registered_agent(hub, tmp_path, "net3", hub_urls=[dead, hub.url])
    agents.extend([lost.start(), failover.start()])

    # The first URL refuses, the second is the hub: the machine becomes Healthy.
    _healthy(hub, "net3")
    status = _running(failover)
    assert status["hub_url"] == hub.url
    assert status["hub_urls"] == [dead, hub.url]

    # A name that does not resolve is logged as dns, and the agent keeps trying.
    _in_log(lost, "hub unreachable (dns)", "no-such-host.invalid")
    status = _running(lost)
    assert status["last_error"]["kind"] == "dns"
    assert status["hub_urls"] == ["https://no-such-host.invalid:8443"]
    _alive(lost)
    assert hub.machines()["net2"]["status"] == "Pending"


# --- OUTPOST_LOG ---------------------------------------------------------------------------

# SQLite only: the agent's logging, not the database.
@MODULE_HUB_SQLITE_ONLY
def test_outpost_log_overrides_the_config_log_level(module_hub: Hub, agents: list[Agent],
                                                    tmp_path: Path) -> None:
    hub = module_hub
    loud = registered_agent(hub, tmp_path, "log1", log_level="error")
    loud.env = {"OUTPOST_LOG": "debug"}
    quiet = registered_agent(hub, tmp_path, "log2", log_level="warning")
    agents.extend([loud.start(), quiet.start()])

    log = _in_log(loud, " DEBUG outpost.agent: ")
    assert " INFO outpost.agent: agent " in log  # the start line, below the config's level
    # The JSON-lines file gets the same records (written a moment after the console's).
    wait_until(lambda: '"level": "DEBUG"' in (loud.state_dir / "agent.log").read_text(), 10,
               what="a DEBUG record in agent.log")

    # Without OUTPOST_LOG the config's level applies.
    _running(quiet)
    _healthy(hub, "log2")
    log = quiet.log()
    assert " INFO " not in log and " DEBUG " not in log, log


def test_invalid_outpost_log_is_bad_input(tmp_path: Path) -> None:
    result = _run(tmp_path / "state", env=clean_env(OUTPOST_LOG="chatty"))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "OUTPOST_LOG=chatty" in result.stderr
    assert "debug, info, warning, error" in result.stderr


# --- HW-5: the hub starts requiring a newer agent -----------------------------------------

# SQLite only: the version check and the agent's answer to it, not the database.
@SQLITE_ONLY
def test_outdated_agent_is_told_and_keeps_running(hub: Hub, agents: list[Agent],
                                                  tmp_path: Path) -> None:
    agent = registered_agent(hub, tmp_path, "old1", backoff_max=2)
    agents.append(agent.start())
    _healthy(hub, "old1")
    hub.stop()
    hub.extra_args = ["--min-agent-version", "99.0"]
    hub.start()
    log = _in_log(agent, "out of date", "99.0")
    assert "E1007" in log
    status = _running(agent)
    assert status["last_error"]["code"] == "E1007"
    assert "99.0" in status["last_error"]["message"]
    _alive(agent)

    text = _status(agent.state_dir)
    assert text.returncode == 0
    assert "E1007" in text.stdout and "99.0" in text.stdout


# SQLite only: the agent's own limits, not the database.
@MODULE_HUB_SQLITE_ONLY
def test_constrained_mode_lowers_the_agent_s_limits(module_hub: Hub, agents: list[Agent],
                                                    tmp_path: Path) -> None:
    hub = module_hub
    """ED-8: a constrained device runs one job at a time with a smaller footprint."""
    agent = registered_agent(hub, tmp_path, "small", constrained=True, max_concurrent_jobs=8)
    agents.append(agent.start())
    wait_until(lambda: hub.machines()["small"]["status"] == "Healthy", 15,
               what="the constrained agent to heartbeat")
    status = agent.status()
    assert status is not None
    assert status["constrained"] is True
    assert status["max_concurrent_jobs"] == 1
