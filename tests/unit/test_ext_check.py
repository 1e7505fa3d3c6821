"""The 'extensions' check of ``outpost check``, over state files written as the agent writes
them (its Store), without an agent: each state gives its result, code and fix."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from outpost.agent import checks
from outpost.agent.extensions.store import Record, Store
from outpost.agent.state import StateDir
from outpost.protocol.checks import Outcome, run_checks


def run(root: Path, *records: Record, running: bool = True) -> Outcome:
    """The check over a state.json holding ``records``; ``running`` fakes nothing but the
    answer of the agent's status socket, which the check reads as 'the agent runs'."""
    store = Store(root / "extensions")
    store.records = {r.name: r for r in records}
    store.save()
    ctx = checks.AgentContext(StateDir(root), None)
    ctx.status = {"pid": 1} if running else None
    outcome = checks.extensions(ctx)
    assert isinstance(outcome, Outcome)
    return outcome


def one(outcome: Outcome) -> dict[str, Any]:
    rows: list[dict[str, Any]] = outcome.data["extensions"]
    assert len(rows) == 1, rows
    return rows[0]


def test_no_state_file_and_ready_extensions_are_ok(tmp_path: Path) -> None:
    outcome = checks.extensions(checks.AgentContext(StateDir(tmp_path), None))
    assert (outcome.result, outcome.details) == ("ok", "no extension on this machine")
    outcome = run(tmp_path, Record("hello", version="1.0.0", stage="installed",
                                   state="Ready", last_ready="1.0.0"),
                  Record("quiet", version="2.0.0", stage="installed", state="NotReady",
                         message="2.0.0 is installed and disabled: its goal says "
                                 "enabled=false"))
    assert outcome.result == "ok", outcome
    assert outcome.details == ("hello: Ready at 1.0.0; quiet: installed at 2.0.0 and "
                               "disabled, as its goal says")
    assert [r["state"] for r in outcome.data["extensions"]] == ["Ready", "NotReady"]


def test_a_hung_enable_is_an_error_naming_step_code_and_the_retry_command(
        tmp_path: Path) -> None:
    message = ("E9030: the enable handler hung: it was still running after 300 s (its "
               "timeout_seconds), so its process group was killed")
    outcome = run(tmp_path, Record("web", version="1.1.0", stage="installed", state="Failed",
                                   step="enable", message=message, failed={"1.1.0": 0},
                                   target="1.1.0"))
    assert (outcome.result, outcome.code) == ("error", "E9030")
    assert "web: Failed at step enable at 1.1.0: E9030: the enable handler hung" in \
        outcome.details
    assert outcome.fix is not None
    assert "outpost extension retry web --machine " in outcome.fix
    assert str(tmp_path / "logs" / "extensions" / "web.log") in outcome.fix
    row = one(outcome)
    assert (row["result"], row["code"], row["step"]) == ("error", "E9030", "enable")


def test_an_agent_too_old_says_to_upgrade_it(tmp_path: Path) -> None:
    outcome = run(tmp_path, Record(
        "new", state="Failed", step="verify", target="3.0.0", failed={"3.0.0": 0},
        message="E9038: new 3.0.0 needs agent 99.0 or newer; this agent is 0.9.0"))
    assert (outcome.result, outcome.code) == ("error", "E9038")
    assert outcome.fix is not None and outcome.fix.startswith("Upgrade the agent")
    assert "outpost extension retry new --machine" in outcome.fix


def test_a_rolled_back_update_is_a_warning_saying_what_it_went_back_to(
        tmp_path: Path) -> None:
    message = ("E9033: the update to 2.0.0 failed at step enable (E9031: ...) and was rolled "
               "back to 1.0.0; 2.0.0 is not tried again until 'outpost extension retry'")
    outcome = run(tmp_path, Record("app", version="1.0.0", stage="installed", state="Ready",
                                   message=message, failed={"2.0.0": 0}, last_ready="1.0.0"))
    assert (outcome.result, outcome.code) == ("warning", "E9033")
    assert "rolled back to 1.0.0" in outcome.details
    assert outcome.fix is not None and "outpost extension retry app" in outcome.fix


def test_a_failure_without_a_code_and_a_handler_warning(tmp_path: Path) -> None:
    outcome = run(tmp_path, Record("odd", state="Failed", step="verify", target="1.0.0",
                                   message="the package's manifest says x 1, not odd 1.0.0"))
    assert (outcome.result, outcome.code) == ("error", "E9094")
    outcome = run(tmp_path, Record("warm", version="1.0.0", stage="installed",
                                   state="NotReady", message="cache is cold"))
    assert (outcome.result, outcome.code) == ("warning", "E9095")
    assert "warm: NotReady at 1.0.0: cache is cold" == outcome.details


@pytest.mark.parametrize("state,step", [("Transitioning", "enable"),
                                        ("Installing", "download")])
def test_a_step_is_ok_while_it_may_run_and_a_warning_past_its_limit(
        tmp_path: Path, state: str, step: str) -> None:
    fresh = Record("slow", version="1.0.0", state=state, step=step,  # type: ignore[arg-type]
                   message=f"running the {step} handler of 1.0.0")
    assert run(tmp_path, fresh).result == "ok"
    stale = Record("slow", version="1.0.0", state=state, step=step,  # type: ignore[arg-type]
                   message="", changed_at=time.time() - 3600)
    outcome = run(tmp_path, stale)
    assert (outcome.result, outcome.code) == ("warning", "E9096"), outcome
    assert "longer than the step may take" in outcome.details
    # An agent that is not running: the step goes on when it starts, whatever the time.
    outcome = run(tmp_path, fresh, running=False)
    assert outcome.result == "warning" and "the agent is not running" in outcome.details


def test_the_handler_timeout_from_the_manifest_sets_the_limit(tmp_path: Path) -> None:
    package = tmp_path / "extensions" / "long" / "1.0.0"
    package.mkdir(parents=True)
    (package / "outpost-extension.json").write_text(json.dumps(
        {"handlers": {"install": {"run": "bin/i", "timeout_seconds": 7200}}}))
    rec = Record("long", version="1.0.0", state="Installing", step="install",
                 changed_at=time.time() - 3600)
    assert run(tmp_path, rec).result == "ok"  # 1 h into a 2 h install
    rec.changed_at = time.time() - 7300
    assert run(tmp_path, rec).result == "warning"


def test_the_worst_extension_sets_the_result_and_every_fix_is_named(tmp_path: Path) -> None:
    outcome = run(tmp_path,
                  Record("a", version="1.0.0", stage="installed", state="Ready"),
                  Record("b", state="Failed", step="install", target="1.0.0",
                         message="E9031: the install handler of 1.0.0 failed: exit code 3"),
                  Record("c", state="Failed", step="enable", target="1.0.0",
                         message="E9030: the enable handler hung"))
    assert (outcome.result, outcome.code) == ("error", "E9031")
    assert outcome.fix is not None
    assert outcome.fix.startswith("b: ") and " | c: " in outcome.fix
    assert [r["result"] for r in outcome.data["extensions"]] == ["ok", "error", "error"]


def test_an_unreadable_state_file_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "extensions").mkdir()
    (tmp_path / "extensions" / "state.json").write_text("{not json")
    ctx = checks.AgentContext(StateDir(tmp_path), None)
    only = [c for c in checks.checks.checks if c.id == "extensions"]
    [found] = asyncio.run(run_checks(only, ctx))  # as 'outpost check' runs it
    assert (found.result, found.code) == ("error", "E9094")
    assert "state.json cannot be read" in found.details
