"""What a job's sandbox gets besides its script: the runbook helper and its job identity.

The helper directory (``JOB_DIR/.outpost``, mode 0700) holds the job token, the hub's CA,
the hub's address, the Python helper module and the shell helper, each mode 0600. The
runbook's environment names only the directory and the hub's URL: the token stays in its
file, so ``env`` in a runbook, or a child process that logs its environment, shows no secret.

The module, the shell helper and the CA are the same for every job of an agent: the agent
keeps one copy of each in ``STATE/helper/`` (0700, files 0600; see SharedFiles) and gives a
job a hard link to it, a new name for the same file, so a job costs two new files here
(``helper.json``, ``job.token``) instead of five. A job run as another user gets copies of
its own, since its files are handed to that user. A job slot's user (sandbox.py) links to
a copy kept in the jobs directory (``JOBS/.helper/``) whose files are readable by everyone
(0644) and writable by root only: they hold nothing secret (the module, the shell helper,
the hub's CA certificate), and the job's user cannot change them through its link.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import shlex
import shutil
import stat
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from . import workdirs

log = logging.getLogger("outpost.agent.helper")

DIR_NAME = ".outpost"
SHARED_DIR = "helper"  # STATE/helper/: the copies every job links to
TOKEN_FILE = "job.token"
CA_FILE = "ca.pem"
CONFIG_FILE = "helper.json"
MODULE_FILE = "outpost_runbook.py"
SHELL_FILE = "outpost.sh"
FILES = frozenset({TOKEN_FILE, CA_FILE, CONFIG_FILE, MODULE_FILE, SHELL_FILE})
_PYTHON_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _write(path: Path, text: str, fresh: bool = True) -> None:
    """Write a file that only the job's user can read. A ``fresh`` one is created with that
    mode (the directory is new and private, so nothing else can have made the name first);
    otherwise the file a reused directory holds is written over (workdirs.py)."""
    if not fresh:
        workdirs.overwrite(path, text.encode())
        return
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


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    """What changes when a file is replaced, written to or chmodded (not its ctime: making
    or removing a link changes that)."""
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode


def _current(path: Path) -> tuple[int, int, int, int] | None:
    try:
        return _signature(os.lstat(path))
    except OSError:
        return None


_STALE = (-1, -1, -1, -1)  # matches no file: written again before the next link


class SharedFiles:
    """The helper files alike for every job of an agent, kept once in ``root``
    (``STATE/helper/``, mode 0700, files 0600) for jobs to hard-link.

    A file is written when its content is new (a temporary file renamed over the old one),
    so jobs that linked the old one keep it, and a CA that changes reaches the next job.
    Before each link the file's inode, size, mtime and mode are checked against what was
    written: a job that wrote into or chmodded its link changed the shared file, which is
    then written again before another job gets it.
    """

    def __init__(self, root: Path, mode: int = 0o600) -> None:
        self.root = root
        self.mode = mode
        self._known: dict[str, tuple[str, tuple[int, int, int, int]]] = {}
        self._ready = False
        self._warned = False

    def path(self, name: str, text: str) -> Path | None:
        """The shared file ``name`` holding ``text``; None when it cannot be kept (each job
        then gets a copy)."""
        path = self.root / name
        known = self._known.get(name)
        if known is not None and known[0] == text and _current(path) == known[1]:
            return path
        try:
            found = self._found(path, text) if known is None else None
            self._known[name] = (text, found or self._replace(path, text))
            return path
        except OSError as exc:
            self._known.pop(name, None)
            self._warn(exc)
            return None

    def forget(self, name: str, exc: OSError) -> None:
        """Linking the shared file failed; at its link limit, the next job gets a new one."""
        if exc.errno == errno.EMLINK and name in self._known:
            self._known[name] = (self._known[name][0], _STALE)
        self._warn(exc)

    def _found(self, path: Path, text: str) -> tuple[int, int, int, int] | None:
        """The signature of a file left by the agent's last run, if it holds ``text``."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        with os.fdopen(fd) as fh:  # the encoding _write and _replace write with
            st = os.fstat(fd)
            if (not stat.S_ISREG(st.st_mode) or st.st_mode & 0o7777 != self.mode
                    or st.st_uid != os.geteuid()):
                return None
            try:
                same = fh.read() == text
            except ValueError:  # not text at all
                return None
            return _signature(st) if same else None

    def _replace(self, path: Path, text: str) -> tuple[int, int, int, int]:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self._ready:
            for stale in self.root.glob(".*.tmp"):  # a write the last run did not finish
                stale.unlink(missing_ok=True)
            self._ready = True
        fd, temp = tempfile.mkstemp(dir=self.root, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fchmod(fh.fileno(), self.mode)
                st = os.fstat(fh.fileno())
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        return _signature(st)

    def _warn(self, exc: OSError) -> None:
        if not self._warned:
            self._warned = True
            log.warning("the runbook helper's files cannot be shared from %s (%s); each job "
                        "gets its own copies", self.root, exc)


@functools.cache
def shared_files(root: Path, mode: int = 0o600) -> SharedFiles:
    """The one SharedFiles of a directory in this process."""
    return SharedFiles(root, mode)


def _place(path: Path, text: str, shared: SharedFiles | None, fresh: bool = True) -> None:
    """A hard link to the shared copy of the file, or a copy of its own. In a reused
    directory a link to the current shared copy is kept as it is."""
    source = shared.path(path.name, text) if shared is not None else None
    if not fresh:
        if source is not None and _same_file(path, source):
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    if source is not None:
        assert shared is not None
        try:
            os.link(source, path)
            return
        except OSError as exc:  # another file system, the link limit, protected_hardlinks
            shared.forget(path.name, exc)
    _write(path, text)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samestat(os.lstat(a), os.lstat(b))
    except OSError:
        return False


def prepare(workdir: Path, job: dict[str, Any], hub_url: str, ca_pem: str,
            shared: SharedFiles | None = None, fresh: bool = True) -> dict[str, str]:
    """Write the helper's files into the job directory; return the variables to add.

    With ``shared``, the module, the shell helper and the CA are hard links to its copies
    where a link can be made. Never pass it for a job whose files are then chowned to
    another user: a shared file must keep its owner.
    """
    folder = workdir / DIR_NAME
    if fresh:
        folder.mkdir(mode=0o700)
    module, shell = _sources()
    _place(folder / MODULE_FILE, module, shared, fresh)
    _place(folder / SHELL_FILE, shell, shared, fresh)
    _place(folder / CA_FILE, ca_pem, shared, fresh)
    _write(folder / CONFIG_FILE, json.dumps({"hub_url": hub_url, "job_id": job["job_id"]}),
           fresh)
    token = job.get("job_token")
    if token:
        _write(folder / TOKEN_FILE, str(token) + "\n", fresh)
    elif not fresh:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / TOKEN_FILE)
    return {"OUTPOST_HELPER_DIR": str(folder), "OUTPOST_HUB_URL": hub_url,
            "PYTHONPATH": str(folder)}
