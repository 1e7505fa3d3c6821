"""Every command's --help shows every word of its help and of every option's.

The help is rendered with Rich markup, where text in square brackets that starts with a
letter is taken for a style and silently dropped: "[default: the latest]" vanished from the
help. This walks every command of the real ``outpost`` app, renders its help as an operator
sees it, and looks for each word of each option's help.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import typer.main
import typer.testing
from typer.testing import CliRunner

from outpost.cli.main import app


def _commands(command: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    found = [(path, command)]
    for name, sub in sorted((getattr(command, "commands", None) or {}).items()):
        if not getattr(sub, "hidden", False):
            found += _commands(sub, (*path, name))
    return found


COMMANDS = _commands(typer.main.get_command(app))


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[A-Za-z0-9_./~-]+", text) if len(w) > 1}


def test_the_walk_finds_the_commands() -> None:
    paths = {" ".join(p) for p, _ in COMMANDS}
    assert {"job start", "runbook publish", "agent status", "schedule create"} <= paths
    assert len(paths) > 40


@pytest.fixture(scope="module", autouse=True)
def _built_once() -> Iterator[None]:
    """``CliRunner.invoke`` turns the Typer app into click commands on every call (about
    0.06 s of CPU); here it gets the one built for COMMANDS, from the same app."""
    built = typer.main.get_command(app)
    build = typer.testing._get_command
    typer.testing._get_command = lambda typer_app: (  # type: ignore[assignment]
        built if typer_app is app else build(typer_app))
    try:
        yield
    finally:
        typer.testing._get_command = build  # type: ignore[assignment]


@pytest.mark.parametrize("path,command", COMMANDS, ids=[" ".join(p) or "outpost"
                                                        for p, _ in COMMANDS])
def test_help_shows_every_word_of_every_option(path: tuple[str, ...], command: Any) -> None:
    shown = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"},
                               terminal_width=200)
    assert shown.exit_code == 0, shown.output
    rendered = _words(shown.output)
    missing = _words((command.help or "").split("\f")[0]) - rendered
    assert not missing, f"{' '.join(path)}: {sorted(missing)} of its help not shown"
    for param in command.params:
        if getattr(param, "hidden", False) or not getattr(param, "help", None):
            continue
        missing = _words(param.help) - rendered
        assert not missing, f"{' '.join(path)} {param.opts}: {sorted(missing)} not shown"
