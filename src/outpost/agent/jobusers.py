"""The unprivileged users a root agent runs runbooks as: one per job slot.

``outpost-job1`` to ``outpost-jobN`` (N the agent's ``max_concurrent_jobs``) are system
users with a group of their own, no home directory, no login shell and no other group. A
job gets the user of its slot for as long as it runs, so no two running jobs share a user,
and neither can read the other's directory or token (each is 0700, its user's own); none of
them can read the agent's state, the hub's data directory or any file of root's that is not
readable by everyone. They are made with ``useradd`` the first time an agent needs them, and
found by name afterwards, so every agent on the machine shares them.
"""

from __future__ import annotations

import logging
import pwd
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from outpost.protocol.errors import OutpostError

log = logging.getLogger("outpost.agent.jobusers")

PREFIX = "outpost-job"
NOLOGIN = ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false")


@dataclass(frozen=True)
class JobUser:
    name: str
    uid: int
    gid: int


def _useradd(name: str, comment: str = "Outpost runbook job") -> None:
    """Make the system user ``name`` (and its group). useradd refuses while another holds
    the lock on /etc/passwd (several agents starting at once): tried again for a while."""
    useradd = shutil.which("useradd", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if useradd is None:
        raise OutpostError(
            "job_users_unavailable", f"The agent cannot make the job user '{name}': useradd "
            "is not installed.", user=name)
    shell = next((s for s in NOLOGIN if shutil.which(s)), "/bin/false")
    argv = [useradd, "--system", "--user-group", "--no-create-home", "--home-dir",
            "/nonexistent", "--shell", shell, "--comment", comment, name]
    done: subprocess.CompletedProcess[str] | None = None
    for _ in range(50):
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode in (0, 9):  # 9: made by another agent meanwhile
            return
        if done.returncode != 10:  # 10: /etc/passwd is locked
            break
        time.sleep(0.1)
    assert done is not None
    raise OutpostError(
        "job_users_unavailable", f"The agent could not make the job user '{name}': "
        f"{done.stderr.strip() or 'useradd exited with ' + str(done.returncode)}", user=name)


class JobUsers:
    """The job users of one agent, handed to jobs one per slot."""

    def __init__(self, make: Callable[[str], None] = _useradd) -> None:
        self._make = make
        self._users: list[JobUser] = []

    def ensure(self, count: int) -> None:
        """Find or make users 1 to ``count``."""
        while len(self._users) < count:
            name = f"{PREFIX}{len(self._users) + 1}"
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                log.info("making the job user %s", name)
                self._make(name)
                entry = pwd.getpwnam(name)
            if entry.pw_uid == 0:
                raise OutpostError("job_users_unavailable", f"The job user '{name}' has uid 0 "
                                   "on this machine; the agent will not run jobs as root "
                                   "under another name.", user=name)
            self._users.append(JobUser(name, entry.pw_uid, entry.pw_gid))

    def user(self, index: int) -> JobUser:
        """The user of slot ``index`` (1-based), made if the agent has more slots now."""
        self.ensure(index)
        return self._users[index - 1]
