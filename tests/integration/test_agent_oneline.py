"""The one line that puts the agent on a new machine, run for real in a fresh directory.

A real hub serves its agent (a wheel it builds from its own installation) and the install
script; the line that ``outpost machine install-line`` prints pins the hub's CA, downloads
both, installs the agent into a venv of its own with the dependencies from a wheelhouse
(made here from this venv's installed distributions, so no network), registers the machine
and starts the agent, whose machine becomes Healthy on the hub. As root the test points the
venv and the state directory into the test's directory with OUTPOST_AGENT_VENV and
OUTPOST_STATE_DIR, so nothing is written to /opt or /var/lib.

About 20 s on two busy cores (a venv and an offline pip install of 25 wheels).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from outpost.hub import install
from tests.support import Hub, clean_env, run_cli, wait_until

pytestmark = pytest.mark.timeout(300)


def _closure(dist_name: str) -> list[metadata.Distribution]:
    """The installed distributions the base install of ``dist_name`` needs."""
    found: dict[str, metadata.Distribution] = {}
    todo = [Requirement(r) for r in metadata.requires(dist_name) or []]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = req.name.lower().replace("_", "-")
        if key in found:
            continue
        dist = metadata.distribution(req.name)
        found[key] = dist
        todo += [Requirement(r) for r in dist.requires or []]
    return list(found.values())


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The agent's dependencies as wheels, rebuilt from this venv (no network)."""
    house = tmp_path_factory.mktemp("wheelhouse")
    for dist in _closure(install.DIST_NAME):
        name, data = install.wheel_from_installed(dist)
        (house / name).write_bytes(data)
    return house


def _machine_env(home: Path, **extra: str) -> dict[str, str]:
    """A plain shell on a new machine: no venv on PATH, a home of its own."""
    env = {k: v for k, v in clean_env().items()
           if not k.startswith(("XDG_", "VIRTUAL_ENV", "PYTHON", "PIP_"))}
    env.update(HOME=str(home), PATH="/usr/local/bin:/usr/bin:/bin",
               # The interpreter this venv was made from (a pyenv shim needs the real HOME).
               PYTHON=os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
               PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def _run_line(line: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", line], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)


def _agent_pid(venv: Path, state: Path) -> int:
    status = subprocess.run([str(venv / "bin" / "outpost"), "agent", "status", "--state-dir",
                             str(state), "--json"], capture_output=True, text=True,
                            timeout=30, env=clean_env())
    assert status.returncode == 0, status.stdout + status.stderr
    return int(json.loads(status.stdout)["pid"])


def _stop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_the_printed_line_installs_registers_and_starts_the_agent(
        sqlite_hub: Hub, wheelhouse: Path, tmp_path: Path) -> None:
    hub = sqlite_hub
    machine = tmp_path / "new-machine"
    home, cwd = machine / "home", machine / "cwd"
    home.mkdir(parents=True)
    cwd.mkdir()
    venv, state = machine / "opt" / "outpost-agent", machine / "state"
    env = _machine_env(home, OUTPOST_AGENT_VENV=str(venv), OUTPOST_STATE_DIR=str(state))

    printed = run_cli("machine", "install-line", "--group", "edge", "--name", "oneline",
                      "--wheelhouse", str(wheelhouse), "--no-service", "--start", "--json",
                      "--data-dir", str(hub.data_dir))
    assert printed.returncode == 0, printed.stderr
    line = json.loads(printed.stdout)["line"]
    # The key goes to the script in the environment, never as an argument.
    assert line.startswith(f"OUTPOST_ACCOUNT_KEY={hub.primary_key} sh -c ")
    assert line.count(hub.primary_key) == 1

    started = time.monotonic()
    done = _run_line(line, cwd, env)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dependencies from " + str(wheelhouse) in done.stdout
    assert "registered 'oneline' in group 'edge'" in done.stdout
    assert took < 120, f"the install took {took:.0f} s"

    def healthy() -> bool:
        found = hub.machines().get("oneline")
        return bool(found and found["status"] == "Healthy")

    pid = _agent_pid(venv, state)
    try:
        wait_until(healthy, 30, 0.2, "the installed agent's machine to be Healthy")
        assert hub.machines()["oneline"]["group"] == "edge"
        # The agent runs from its own venv, not from the test's, and holds no account key.
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[0].decode().startswith(str(venv)), cmdline
        assert b"OUTPOST_ACCOUNT_KEY" not in Path(f"/proc/{pid}/environ").read_bytes()
        for args in (["--version"], ["agent", "--help"]):
            ran = subprocess.run([str(venv / "bin" / "outpost"), *args], capture_output=True,
                                 text=True, timeout=60, env=_machine_env(home))
            assert ran.returncode == 0, ran.stderr
        assert "Usage" in ran.stdout
        machine_id = hub.machines()["oneline"]["id"]

        # Run again: the agent is upgraded in place and restarted; the registration stays.
        again = _run_line(line, cwd, env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "already registered" in again.stdout
        assert "registering with" not in again.stdout
        new_pid = _agent_pid(venv, state)
        assert new_pid != pid
        pid = new_pid
        wait_until(healthy, 30, 0.2, "the restarted agent's machine to be Healthy")
        assert hub.machines()["oneline"]["id"] == machine_id
        assert list(hub.machines()) == ["oneline"]
    finally:
        _stop(pid)
    print(f"install line: {took:.1f} s")


def test_a_wrong_fingerprint_refuses_before_downloading_anything(
        sqlite_hub: Hub, tmp_path: Path) -> None:
    hub = sqlite_hub
    home = tmp_path / "home"
    home.mkdir()
    venv, state = tmp_path / "venv", tmp_path / "state"
    env = _machine_env(home, OUTPOST_AGENT_VENV=str(venv), OUTPOST_STATE_DIR=str(state))
    wrong = "ab" * 32
    line = install.install_line(hub.url, wrong, hub.account_id, "edge",
                                account_key=hub.primary_key, extra=["--no-service"])

    done = _run_line(line, tmp_path, env)

    assert done.returncode == 1
    assert f"did not present the CA with fingerprint {wrong}; nothing was installed" \
        in done.stderr
    assert not venv.exists() and not state.exists()
    # The hub built no wheel and served no script: nothing past /v1/ca was asked for.
    assert not (hub.data_dir / "agent-dist").exists()
    # The same line with the right fingerprint gets past that point.
    right = install.install_line(hub.url, hub.fingerprint, hub.account_id, "edge",
                                 extra=["--no-service", "--python", "/nonexistent/python3"])
    done = _run_line(right, tmp_path, env)
    assert done.returncode == 1
    assert "/nonexistent/python3 is not installed" in done.stderr
    assert (hub.data_dir / "agent-dist").exists()


def test_the_hub_serves_one_deterministic_wheel_of_outpost_fleet(sqlite_hub: Hub) -> None:
    hub = sqlite_hub
    name = install.agent_wheel_name()
    with hub.client() as client:
        first = client.get(f"/v1/agent/{name}")
        alias = client.get(install.WHEEL_ALIAS)
        script = client.get(install.SCRIPT_PATH)
    assert first.status_code == 200 and alias.status_code == 200
    assert first.content == alias.content == install.agent_wheel()[1]
    assert name.startswith("outpost_fleet-") and name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(io.BytesIO(first.content)) as wheel:
        names = wheel.namelist()
        dist_info = name.removesuffix("-py3-none-any.whl") + ".dist-info"
        assert wheel.read(f"{dist_info}/METADATA").decode().count("Name: outpost-fleet") == 1
        assert "outpost/cli/main.py" in names and "outpost/agent/daemon.py" in names
        assert f"{dist_info}/RECORD" == names[-1]
        assert "console_scripts" in wheel.read(f"{dist_info}/entry_points.txt").decode()
        assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert script.status_code == 200
    assert script.text.startswith("#!/bin/sh")
    assert f"WHEEL='{name}'" in script.text


def test_hub_init_prints_the_install_line_whole(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    result = run_cli("hub", "init", "--data-dir", str(data), "--hostname", "hub.example",
                     env=clean_env(COLUMNS="80"))
    assert result.returncode == 0, result.stderr
    init = json.loads(run_cli("hub", "init", "--data-dir", str(data), "--json").stdout)
    line = install.install_line("https://hub.example:8443", init["ca_fingerprint"],
                                init["account_id"], "default",
                                account_key=init["primary_key"])
    # One line, unwrapped at 80 columns, so that it can be copied as it is.
    assert line in [s.strip() for s in result.stdout.splitlines()], result.stdout
    assert "outpost machine install-line --group GROUP" in result.stdout
