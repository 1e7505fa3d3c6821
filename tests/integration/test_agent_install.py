"""The agent installs and runs with the base dependencies alone, without the hub's.

A fresh virtual environment gets exactly ``[project].dependencies`` from pyproject.toml (read
here, so the test follows the file), not the package and not its ``hub`` extra. The agent
then runs from the source tree against a real hub and its machine becomes Healthy.

Slow by nature (a venv and a pip install, about 30 s); it stays in CI because "the agent
does not need the hub's libraries" is a promise nothing else checks.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.support import Hub, clean_env, stop_process, wait_until

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(600)


def _base_dependencies() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps: list[str] = project["dependencies"]
    assert deps, "pyproject.toml lists no base dependencies"
    return deps


def _hub_modules() -> list[str]:
    """Import names of the hub extra that must be absent (fastapi, sqlalchemy, ...)."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["hub"]
    names = {"fastapi", "sqlalchemy"}
    for requirement in extra:
        name = requirement.split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip()
        names.add(name.lower().replace("-", "_"))  # prometheus-client: prometheus_client
    return sorted(names)


@pytest.fixture
def agent_python(tmp_path: Path) -> Path:
    """A venv holding only the base dependencies; its python. This venv's pip installs into
    it (``--python``): a pip of its own would cost a few seconds of CPU to install and is
    nothing the agent uses; and nothing is compiled ahead (the agent compiles what it
    imports), which halves the install's CPU."""
    venv = tmp_path / "agent-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120, capture_output=True)
    python = venv / "bin" / "python"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--disable-pip-version-check", "--no-compile", *_base_dependencies()],
        capture_output=True, text=True, timeout=480, env=clean_env())
    assert result.returncode == 0, result.stdout + result.stderr
    return python


def _agent_env() -> dict[str, str]:
    return clean_env(PYTHONPATH=str(ROOT / "src"), PYTHONNOUSERSITE="1")


@pytest.mark.slow
def test_agent_runs_without_the_hub_dependencies(sqlite_hub: Hub, agent_python: Path,
                                                 tmp_path: Path) -> None:
    env = _agent_env()
    hub = sqlite_hub

    # The venv really lacks the hub's libraries, and really has the agent's.
    for module in _hub_modules():
        probe = subprocess.run([str(agent_python), "-c", f"import {module}"],
                               capture_output=True, text=True, env=env, timeout=60)
        assert probe.returncode != 0, f"{module} is importable in the agent's venv"
        assert "ModuleNotFoundError" in probe.stderr, probe.stderr
    probe = subprocess.run(
        [str(agent_python), "-c",
         "import outpost, outpost.agent.daemon, outpost.cli.main; print(outpost.__file__)"],
        capture_output=True, text=True, env=env, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == str(ROOT / "src" / "outpost" / "__init__.py")

    state = tmp_path / "agent-state"
    outpost = [str(agent_python), "-m", "outpost"]
    result = subprocess.run([*outpost, *hub.register_args(state, "lean", "edge")],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Registered 'lean'" in result.stdout

    (state / "agent.yaml").write_text("heartbeat_interval: 1\n")
    log_path = tmp_path / "agent-run.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([*outpost, "agent", "run", "--state-dir", str(state)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        def healthy() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the agent exited with {proc.returncode}:\n"
                                     f"{log_path.read_text()}")
            machine = hub.machines().get("lean")
            return bool(machine and machine["status"] == "Healthy")

        wait_until(healthy, 30, 0.2, "the lean agent to be Healthy")
        status = subprocess.run([*outpost, "agent", "status", "--state-dir", str(state),
                                 "--json"], capture_output=True, text=True, env=env,
                                timeout=60)
        assert status.returncode == 0, status.stderr
        assert '"running": true' in status.stdout
        machine = hub.machines()["lean"]
        assert machine["group"] == "edge"
    finally:
        assert stop_process(proc) == 0, log_path.read_text()
    assert "Traceback" not in log_path.read_text()
