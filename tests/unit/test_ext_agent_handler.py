"""One command of an installed extension run to its end (agent/extensions/handler.py), as
operations will use it: real processes, real timeouts, the extension's own log."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

from outpost.agent import procgroup
from outpost.agent.extensions import handler
from outpost.agent.extensions.outlog import ExtensionLog, secret_values
from outpost.protocol.extreaders import Command


def spec(tmp_path: Path, body: str, *, timeout: float = 10, name: str = "snapshot",
         log: ExtensionLog | None = None, protected: dict[str, str] | None = None
         ) -> handler.Spec:
    package = tmp_path / "pkg"
    (package / "bin").mkdir(parents=True, exist_ok=True)
    script = package / "bin" / name
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return handler.Spec(
        name="backup", version="1.2.0", handler=name, seq=3,
        command=Command(run=f"bin/{name}", args=["--fast"], timeout_seconds=timeout),
        package_dir=package, config_dir=tmp_path / "config", status_dir=tmp_path / "status",
        log_dir=tmp_path / "logs",
        output=log or ExtensionLog(tmp_path / "ext.log", secrets=secret_values(protected)),
        settings={"paths": ["/srv"]}, protected=protected)


STATUS = 'printf \'{"status":"%s","code":%s,"message":"%s"}\' "$1" "$2" "$3" ' \
         '> "$OUTPOST_EXT_STATUS_DIR/$OUTPOST_EXT_SEQ.status"'


def test_an_operation_runs_with_its_arguments_and_reports_its_status(tmp_path: Path) -> None:
    body = (f'status() {{ {STATUS}; }}\n'
            'echo "args: $*"; echo "to stderr" >&2\n'
            'status success 0 "snapshot 42 taken"')
    outcome = asyncio.run(handler.run(spec(tmp_path, body)))
    assert (outcome.result, outcome.message, outcome.exit_code) == \
        ("success", "snapshot 42 taken", 0)
    assert outcome.ok and outcome.seconds < 10
    text = (tmp_path / "ext.log").read_text()
    assert "snapshot: args: --fast" in text and "snapshot: to stderr" in text
    assert "snapshot: --- success: snapshot 42 taken" in text


def test_an_earlier_status_file_is_not_taken_for_this_commands(tmp_path: Path) -> None:
    s = spec(tmp_path, "exit 0", timeout=0.5)
    s.status_dir.mkdir()
    s.status_file.write_text('{"status": "success"}')
    outcome = asyncio.run(handler.run(s))
    assert outcome.result == "timeout"
    assert "it wrote no status file" in outcome.message


def test_a_status_file_that_is_a_link_is_not_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text('{"status": "success", "message": "from a file of root\'s"}')
    outcome = asyncio.run(handler.run(spec(
        tmp_path, f'ln -s {secret} "$OUTPOST_EXT_STATUS_DIR/$OUTPOST_EXT_SEQ.status"')))
    assert outcome.result == "error"
    assert outcome.message.startswith(str(tmp_path / "status" / "3.status"))
    assert "cannot be read" in outcome.message


def test_cancelling_a_run_ends_its_whole_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"

    async def scenario() -> None:
        task = asyncio.create_task(handler.run(spec(
            tmp_path, f"sleep 300 & echo $! >> {pids}; echo $$ >> {pids}; sleep 300",
            timeout=300)))
        deadline = time.monotonic() + 60  # a loaded machine starts processes slowly
        # The command may write its pids before run() has noted it as running (its start
        # returns to run() only after the child is under way): wait for both.
        while (not pids.exists() or len(pids.read_text().split()) < 2
               or not handler.running) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert pids.exists() and len(pids.read_text().split()) == 2, "the command never ran"
        assert list(handler.running.values()) == ["extension backup 1.2.0: snapshot"]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert handler.running == {}

    asyncio.run(scenario())
    found = [int(p) for p in pids.read_text().split()]
    assert len(found) == 2
    assert all(procgroup.state(pid) in (None, "Z") for pid in found)
    assert "--- ended: the agent cancelled it" in (tmp_path / "ext.log").read_text()


def test_a_command_that_cannot_start_is_an_error_saying_why(tmp_path: Path) -> None:
    s = spec(tmp_path, "exit 0")
    (s.package_dir / "bin" / "snapshot").chmod(0o644)
    outcome = asyncio.run(handler.run(s))
    assert outcome.result == "error"
    assert "bin/snapshot of backup 1.2.0 could not be started: Permission denied" in \
        outcome.message


def test_the_extension_log_is_bounded_and_keeps_secrets_out(tmp_path: Path) -> None:
    log = ExtensionLog(tmp_path / "ext.log", max_bytes=64 * 1024, secrets=["hunter2-pass"])
    body = (f'status() {{ {STATUS}; }}\n'
            'i=0; while [ $i -lt 4000 ]; do echo "line $i of output hunter2-pass"; '
            'i=$((i+1)); done\nstatus success 0 ""')
    outcome = asyncio.run(handler.run(spec(tmp_path, body, log=log)))
    assert outcome.ok
    current, older = tmp_path / "ext.log", tmp_path / "ext.log.1"
    assert current.stat().st_size <= 64 * 1024 and older.stat().st_size <= 64 * 1024
    both = older.read_text() + current.read_text()
    assert "line 3999 of output [redacted]" in both and "hunter2-pass" not in both


def test_settings_arrive_on_stdin_even_when_the_command_ignores_them(tmp_path: Path) -> None:
    # A command that never reads its stdin must not hang the agent's writer.
    s = spec(tmp_path, f'status() {{ {STATUS}; }}\nstatus success 0 ""')
    s.settings = {"big": "x" * 200_000}
    outcome = asyncio.run(asyncio.wait_for(handler.run(s), 20))
    assert outcome.ok


def test_the_environment_names_the_update_source_only_when_given(tmp_path: Path) -> None:
    s = spec(tmp_path, "exit 0")
    s.extra_env = {"OUTPOST_EXT_UPDATE_FROM": "1.1.0"}
    env = handler.environment(s)
    assert env["OUTPOST_EXT_UPDATE_FROM"] == "1.1.0"
    assert env["OUTPOST_EXT_SEQ"] == "3" and "HOME" not in env
    assert env["OUTPOST_AGENT_PYTHON"] == sys.executable
    assert set(env) - {"PATH", "OUTPOST_EXT_UPDATE_FROM", "OUTPOST_AGENT_PYTHON"} == {
        f"OUTPOST_EXT_{k}" for k in ("NAME", "VERSION", "HANDLER", "SEQ", "CONFIG_DIR",
                                     "STATUS_DIR", "LOG_DIR")}
    assert os.environ.get("OUTPOST_EXT_NAME") is None


def test_a_process_left_running_keeps_its_output_read_after_the_command_ends(
        tmp_path: Path) -> None:
    marker = tmp_path / "alive"

    async def scenario() -> None:
        body = (f'status() {{ {STATUS}; }}\n'
                f'(sleep 5; echo "still here"; touch {marker}) &\n'
                'status success 0 "service started"')
        outcome = await handler.run(spec(tmp_path, body, name="enable"))
        assert outcome.ok
        assert len(handler._lingering) == 1, (tmp_path / "ext.log").read_text()
        assert outcome.seconds < 4  # not held until the process it left is gone
        deadline = time.monotonic() + 15
        while not marker.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        while handler._lingering and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await handler.close_all()

    asyncio.run(scenario())
    # It wrote after the command had ended, and did not die of a closed pipe.
    assert marker.exists()
    assert "enable: still here" in (tmp_path / "ext.log").read_text()
