"""Every command speaks the same way: --json wherever a command prints data, -f wherever
--follow is, --output json kept as --json's alias. The sets are read from the real app, so
a command added without --json or -f fails here."""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any

import pytest
import typer.main

from outpost.cli.main import app
from tests.support import run_cli


def _leaves(command: Any, path: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    subs = getattr(command, "commands", None)
    if subs is None:
        return [(" ".join(path), command)]
    found = []
    for name, sub in sorted(subs.items()):
        if not getattr(sub, "hidden", False):
            found += _leaves(sub, (*path, name))
    return found


LEAVES = dict(_leaves(typer.main.get_command(app)))


def _opts(command: Any) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)}


# Commands that print no data to read back: they serve until stopped, start a shell
# session of their own, or write a file the user named. Each must exist and lack --json,
# so this list cannot go stale in silence.
NO_DATA = {
    "agent run": "the agent daemon, in the foreground",
    "hub run": "the hub daemon, in the foreground",
    "up": "a hub and an agent in the foreground",
    "runbook get": "writes the runbook to the file given with -o",
}


def test_the_walk_finds_every_group() -> None:
    groups = {path.split()[0] for path in LEAVES if " " in path}
    assert {"job", "runbook", "schedule", "webhook", "asset", "machine", "agent",
            "account", "group", "hub"} <= groups
    assert len(LEAVES) > 40


def test_every_command_with_follow_has_f() -> None:
    following = [path for path, cmd in LEAVES.items() if "--follow" in _opts(cmd)]
    assert {"job start", "job output", "agent logs"} <= set(following)
    for path in following:
        param = next(p for p in LEAVES[path].params if "--follow" in p.opts)
        assert "-f" in param.opts, f"{path}: --follow without -f"


@pytest.mark.parametrize("path", sorted(LEAVES))
def test_every_command_that_prints_data_has_json(path: str) -> None:
    options = _opts(LEAVES[path])
    if path in NO_DATA:
        assert "--json" not in options, f"{path} has --json now: take it off NO_DATA"
        return
    assert "--json" in options, f"{path} prints data but has no --json"


def test_listing_and_show_commands_are_among_them() -> None:
    listings = [path for path in LEAVES
                if path.rsplit(" ", 1)[-1] in ("list", "show", "status", "heartbeats")
                or path.endswith("-list")]
    assert len(listings) >= 15, listings
    assert not [p for p in listings if "--json" not in _opts(LEAVES[p])]


def test_output_json_stays_an_alias_of_json() -> None:
    # --output whose choices (an Enum) hold json; not -o FILE of 'runbook get'.
    with_output = [path for path, cmd in LEAVES.items()
                   if any("--output" in p.opts and isinstance(p.default, enum.Enum)
                          and "json" in type(p.default).__members__ for p in cmd.params)]
    assert {"check", "hub check"} <= set(with_output)
    for path in with_output:
        assert "--json" in _opts(LEAVES[path]), path


def test_no_data_names_real_commands() -> None:
    assert set(NO_DATA) <= set(LEAVES)


def test_check_json_is_check_output_json(tmp_path: Path) -> None:
    """The alias prints the same document (an unregistered state directory: no network)."""
    by_json = run_cli("check", "--json", "--state-dir", str(tmp_path))
    by_output = run_cli("check", "--output", "json", "--state-dir", str(tmp_path))
    assert by_json.returncode == by_output.returncode == 1, by_json.stderr
    first, second = json.loads(by_json.stdout), json.loads(by_output.stdout)
    assert [c["id"] for c in first["checks"]] == [c["id"] for c in second["checks"]]
    # The machine's CPU and memory pressure may change between the two runs (a loaded test
    # machine); every other check reads the same state directory and must agree.
    steady = [(c["id"], c["result"]) for c in first["checks"] if c["id"] != "pressure"]
    assert steady == [(c["id"], c["result"]) for c in second["checks"] if c["id"] != "pressure"]
    assert ("agent-running", "error") in steady
