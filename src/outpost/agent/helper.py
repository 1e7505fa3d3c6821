"""What a job's sandbox gets besides its script: the runbook helper and its job identity.

The helper directory (``JOB_DIR/.outpost``, mode 0700) holds the job token, the hub's CA,
the hub's address, the Python helper module and the shell helper, each mode 0600. The
runbook's environment names only the directory and the hub's URL: the token stays in its
file, so ``env`` in a runbook, or a child process that logs its environment, shows no secret.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Any

DIR_NAME = ".outpost"
TOKEN_FILE = "job.token"
CA_FILE = "ca.pem"
CONFIG_FILE = "helper.json"
MODULE_FILE = "outpost_runbook.py"
SHELL_FILE = "outpost.sh"
_PYTHON_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _write(path: Path, text: str) -> None:
    """Write a new file that only the job's user can read, created with that mode (the
    directory is new and private, so nothing else can have made the name first)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


@functools.cache
def _sources() -> tuple[str, str]:
    """The helper module and the shell helper, read from the package once per agent."""
    source = resources.files(__package__ or "outpost.agent").joinpath("runbook_helper")
    # The shell helper runs the Python helper with the machine's python3, as Python
    # runbooks run; without one, the agent's own interpreter serves (standard library only).
    python = shutil.which("python3", path=_PYTHON_PATH) or sys.executable
    return (source.joinpath(MODULE_FILE).read_text(),
            source.joinpath(SHELL_FILE).read_text().replace("@OUTPOST_PYTHON@",
                                                             shlex.quote(python)))


def prepare(workdir: Path, job: dict[str, Any], hub_url: str, ca_pem: str) -> dict[str, str]:
    """Write the helper's files into the job directory; return the variables to add."""
    folder = workdir / DIR_NAME
    folder.mkdir(mode=0o700)
    module, shell = _sources()
    _write(folder / MODULE_FILE, module)
    _write(folder / SHELL_FILE, shell)
    _write(folder / CA_FILE, ca_pem)
    _write(folder / CONFIG_FILE, json.dumps({"hub_url": hub_url, "job_id": job["job_id"]}))
    token = job.get("job_token")
    if token:
        _write(folder / TOKEN_FILE, str(token) + "\n")
    return {"OUTPOST_HELPER_DIR": str(folder), "OUTPOST_HUB_URL": hub_url,
            "PYTHONPATH": str(folder)}
