"""Output that is safe and faithful: a runbook's control characters are shown escaped in
the text view and kept as they are in --json; a line longer than a record comes back as
pieces marked ``continues`` in --json and joined in the text view.

One SQLite hub serves the module (``module_hub``): each test publishes its own runbook
and starts its own agent, under its own name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from outpost.agent.runner import LINE_MAX
from tests.support import (MODULE_HUB_SQLITE_ONLY, Agent, Hub, healthy_agent, publish_script,
                           run_cli)

# SQLite only: the CLI's output and the agent's records, not the database.
pytestmark = MODULE_HUB_SQLITE_ONLY


def _run(hub: Hub, name: str) -> str:
    done = hub.cli("job", "start", name, "--group", "web", "--wait", "--json")
    assert done.returncode == 0, (done.stdout, done.stderr)
    job: dict[str, Any] = json.loads(done.stdout)
    return str(job["id"])


def test_control_characters_are_escaped_in_the_text_view_and_raw_in_json(
        module_hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    hub = module_hub
    publish_script(hub, tmp_path, "paint",
                   r"printf '\033[31mred\033[0m bell\a nul\0 tab\tend\r\n'" "\n"
                   r"printf 'clear\033[2J\n' >&2" "\n")
    agent = healthy_agent(hub, tmp_path, agents, "paint-w")
    job_id = _run(hub, "paint")

    raw = json.loads(hub.cli("job", "output", job_id, "--json").stdout)
    texts = {r["stream"]: r["text"] for r in raw}
    # --json: the text as the hub holds it (NUL, which PostgreSQL cannot store, is U+FFFD).
    assert texts == {"Output": "\x1b[31mred\x1b[0m bell\x07 nul\ufffd tab\tend",
                     "Error": "clear\x1b[2J"}, raw

    text = hub.cli("job", "output", job_id)
    assert text.returncode == 0, text.stderr
    assert "\x1b" not in text.stdout and "\x07" not in text.stdout
    assert text.stdout.splitlines() == [
        r"\x1b[31mred\x1b[0m bell\x07 nul" "\ufffd" " tab\tend", r"ERROR: clear\x1b[2J"]

    followed = hub.cli("job", "start", "paint", "--group", "web", "--follow")
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout.splitlines()[:2] == text.stdout.splitlines()
    lines = hub.cli("job", "start", "paint", "--group", "web", "--follow", "--json")
    assert json.loads(lines.stdout.splitlines()[0])["text"].startswith("\x1b[31mred")

    # The agent's own copy of the job's log keeps the NUL: escaped in text, raw in --json.
    kept = run_cli("agent", "logs", "--job", job_id, "--state-dir", str(agent.state_dir))
    assert kept.returncode == 0, kept.stderr
    assert r"\x1b[31mred\x1b[0m bell\x07 nul\x00 tab" in kept.stdout, kept.stdout
    assert "\x1b" not in kept.stdout and "\x00" not in kept.stdout
    kept_json = run_cli("agent", "logs", "--job", job_id, "--state-dir",
                        str(agent.state_dir), "--json")
    assert any(json.loads(line).get("message") == "\x1b[31mred\x1b[0m bell\x07 nul\x00 tab\tend"
               for line in kept_json.stdout.splitlines()), kept_json.stdout


def test_a_line_longer_than_a_record_is_marked_and_joined(
        module_hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    hub = module_hub
    size = 3 * LINE_MAX + 100
    publish_script(hub, tmp_path, "long",
                   f"echo before\nhead -c {size} /dev/zero | tr '\\0' x\necho\necho after\n")
    healthy_agent(hub, tmp_path, agents, "long-w")
    job_id = _run(hub, "long")

    records = json.loads(hub.cli("job", "output", job_id, "--json").stdout)
    assert [len(r["text"]) for r in records] == [6, LINE_MAX, LINE_MAX, LINE_MAX, 100, 5]
    assert [r["continues"] for r in records] == [False, True, True, True, False, False]
    assert "".join(r["text"] for r in records[1:5]) == "x" * size

    text = hub.cli("job", "output", job_id)
    assert text.returncode == 0, text.stderr
    assert text.stdout.split("\n") == ["before", "x" * size, "after", ""]
    followed = hub.cli("job", "start", "long", "--group", "web", "--follow")
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout.split("\n")[:3] == ["before", "x" * size, "after"]


def test_values_are_shown_as_json_and_quoted_text_escaped(module_hub: Hub,
                                                          agents: list[Agent],
                                                          tmp_path: Path) -> None:
    hub = module_hub
    publish_script(hub, tmp_path, "hello", 'echo "Hello $name"\n', "--param",
                   "name=World", "--param", "verbose:bool=false", "--param", 'cfg:json={"a": 1}',
                   "--log-verbose")
    shown = hub.cli("runbook", "show", "hello")
    assert shown.returncode == 0, shown.stderr
    assert 'parameters:   name:string="World" verbose:bool=false cfg:json={"a": 1}' \
        in shown.stdout, shown.stdout
    assert "log verbose:  true   log progress: false" in shown.stdout, shown.stdout

    healthy_agent(hub, tmp_path, agents, "hello-w")
    job_id = _run(hub, "hello")
    job = hub.cli("job", "show", job_id)
    assert 'params: {"name": "World", "verbose": false, "cfg": {"a": 1}}' in job.stdout, \
        job.stdout

    # An error that quotes what was typed (or what a hub or runbook said) is escaped too.
    refused = hub.cli("job", "start", "\x1b[2Jnope", "--group", "web")
    assert refused.returncode == 1
    assert r"No runbook '\x1b[2Jnope'" in refused.stderr, refused.stderr
    assert "\x1b" not in refused.stderr
