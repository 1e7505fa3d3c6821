"""The docs that are generated or promised stay true to the code."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from tests.support import run_cli

ROOT = Path(__file__).resolve().parents[2]


def test_error_catalog_doc_is_current() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_error_docs
    finally:
        sys.path.pop(0)
    assert (ROOT / "docs" / "errors.md").read_text() == gen_error_docs.render(), (
        "docs/errors.md is stale: run python scripts/gen_error_docs.py")


def test_readme_opens_with_the_two_commands_and_ci_calls_the_second() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)\n```", readme, re.S)
    assert "outpost up" in blocks[0]
    assert blocks[1].strip() == "./scripts/test"
    assert "exec ./scripts/test" in (ROOT / ".ci" / "run").read_text()


def test_systemd_units_start_the_real_commands() -> None:
    agent = (ROOT / "packaging" / "systemd" / "outpost-agent.service").read_text()
    hub = (ROOT / "packaging" / "systemd" / "outpost-hub.service").read_text()
    assert "outpost agent run --state-dir /var/lib/outpost" in agent
    assert "outpost hub run --data-dir" in hub
    for unit in (agent, hub):
        assert "RestartPreventExitStatus=2" in unit
    # The agent's modules outlive it (adopted by the next agent): systemd must signal the
    # agent alone, in the packaged unit and in the one the install line writes.
    installed = (ROOT / "src" / "outpost" / "hub" / "agent_install.sh").read_text()
    for unit in (agent, installed):
        assert "\nKillMode=process\n" in unit


def test_every_dependency_has_an_upper_bound() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        deps += [d for d in extra if not d.startswith("outpost-fleet[")]
    unbounded = [d for d in deps if "<" not in d]
    assert not unbounded, f"dependencies without an upper bound: {unbounded}"


def test_cli_help_works_for_every_command() -> None:
    for args in (["--help"], ["hub", "--help"], ["agent", "--help"], ["machine", "--help"],
                 ["account", "--help"], ["agent", "register", "--help"]):
        # Forked from the test process's zygote (a fresh interpreter's start is
        # tests/unit/test_cli_startup.py's).
        done = run_cli(*args, timeout=30)
        assert done.returncode == 0, done.stderr
        assert "Usage" in done.stdout
