"""What an ``outpost`` process loads before it runs its command.

Every command, the hub (``outpost hub run``) and the agent (``outpost agent run``, which
becomes the daemon) start by importing the CLI. The libraries only some commands need
(pydantic's wire models, cryptography, the agent's registration and daemon) are imported by
those commands, so the rest do not pay for them at each start.
"""

from __future__ import annotations

import json
import subprocess

from outpost.cli.output import EXIT_NOT_RUNNING
from tests.support import OUTPOST, clean_env
from tests.support import loaded_modules as _loaded_by

# Each costs a command tens of milliseconds of CPU or more at start-up.
HEAVY = ("pydantic", "cryptography", "sqlalchemy", "fastapi", "uvicorn", "psutil",
         "outpost.protocol.models", "outpost.agent.daemon", "outpost.agent.registration",
         "outpost.agent.transport", "outpost.hub.app")



def test_the_cli_loads_no_heavy_library_before_its_command_runs() -> None:
    loaded = _loaded_by("import outpost.cli.main")
    assert "outpost.cli.agent_cmd" in loaded  # the commands themselves are all there
    assert sorted(m for m in HEAVY if m in loaded) == []


def test_a_command_that_needs_the_agent_modules_imports_them_itself() -> None:
    """``agent status`` reads the status socket through the daemon's module, imported in its
    body: it still answers (here, that no agent runs in that state directory)."""
    done = subprocess.run([*OUTPOST, "agent", "status", "--state-dir", "/nonexistent/state",
                           "--json"], capture_output=True, text=True, timeout=60,
                          env=clean_env())
    assert done.returncode == EXIT_NOT_RUNNING, done.stdout + done.stderr
    assert json.loads(done.stdout)["running"] is False
