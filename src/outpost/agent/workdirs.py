"""Job working directories, used again instead of made anew.

Making a file or a directory costs the kernel far more than writing into one that exists or
renaming one (0.4 to 1 ms of CPU each on the ext4 disks measured, against about 10 µs), and
a job's directory holds five such entries it gets alike every time: itself, its runbook
file, the helper directory, ``helper.json`` and ``job.token`` (the helper's module, shell
helper and CA are hard links: helper.py). So a job that leaves its directory exactly as it
got it gives it back: the runbook file and the token are emptied in place (no runbook
content and no token stays on disk after the job), and the directory is renamed into
``JOBS/.spare/``; the next job renames it to its own name and writes into the files that
are there. A directory that holds anything else, or whose mode or owner changed, is removed
as before. A spare goes only to a job of the user it belongs to: the agent's own, or one job
slot's user (sandbox.py), whose directories lie in the jobs directory, and only once nothing
of that user's last job can still run (its group emptied); the runbook file and the token
must then have no other name (a hard link the job made elsewhere would show the next job's
runbook and token there). A group's run-as user's directory is never kept.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import stat
from pathlib import Path

SPARE = ".spare"
KEEP = 32  # spare directories at most


def _plain_file(entry: os.DirEntry[str]) -> bool:
    return entry.is_file(follow_symlinks=False)


def _private_dir(path: Path, uid: int) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_mode & 0o7777 == 0o700
            and st.st_uid == uid)


def _single(entry: os.DirEntry[str] | Path) -> bool:
    """A plain file with no other name."""
    try:
        st = entry.stat(follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1


def _wipe(path: Path) -> None:
    """Overwrite the file's content with zeros, without following a link a job may have put
    in its place. Not a truncation: freeing a file's blocks costs as much as making it, and
    the next job writes over them (overwrite)."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        if size:
            os.pwrite(fd, bytes(size), 0)
    finally:
        os.close(fd)


def overwrite(path: Path, data: bytes) -> None:
    """Write ``data`` as the whole content of the file at ``path`` (made if missing, mode
    0600, never through a link), into the blocks it already has where it can."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        offset = 0
        while offset < len(view):
            offset += os.pwrite(fd, view[offset:], offset)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


class Workdirs:
    """The spare working directories under ``jobs_dir`` (one per agent process)."""

    def __init__(self, jobs_dir: Path, keep: int = KEEP) -> None:
        self.jobs_dir = jobs_dir
        self.spare_dir = jobs_dir / SPARE
        self.keep = keep
        self._spares: dict[int, list[Path]] = {}  # by owner
        self._count = 0
        self._started = False

    def _start(self) -> None:
        """Spares left by an earlier run of the agent are not trusted: they go."""
        self._started = True
        shutil.rmtree(self.spare_dir, ignore_errors=True)

    def take(self, workdir: Path, uid: int | None = None) -> bool:
        """Put a spare directory of user ``uid`` (the agent's by default) at ``workdir``;
        False if there is none."""
        if not self._started:
            self._start()
        uid = os.geteuid() if uid is None else uid
        spares = self._spares.get(uid, [])
        if spares and os.path.lexists(workdir):
            shutil.rmtree(workdir, ignore_errors=True)  # an earlier attempt's, cut short
        while spares:
            spare = spares.pop()
            try:
                os.rename(spare, workdir)
            except OSError:
                shutil.rmtree(spare, ignore_errors=True)
                continue
            if _private_dir(workdir, uid):
                return True
            shutil.rmtree(workdir, ignore_errors=True)
        return False

    def give_back(self, workdir: Path, helper_dir: str, helper_files: frozenset[str],
                  secret: str, uid: int | None = None) -> bool:
        """Keep ``workdir`` as a spare if it holds only a runbook file and the helper
        directory with some of ``helper_files``; the runbook file and the helper's
        ``secret`` file are emptied. ``uid``: the user it must belong to (the agent's by
        default). Returns whether it was kept; the caller removes it otherwise."""
        uid = os.geteuid() if uid is None else uid
        kept = sum(len(v) for v in self._spares.values())
        if kept >= self.keep or not self._started or not _private_dir(workdir, uid):
            return False
        try:
            with os.scandir(workdir) as it:
                top = list(it)
            runbooks = [e for e in top if e.name.startswith("runbook") and _single(e)]
            if len(top) != 2 or len(runbooks) != 1:
                return False
            folder = workdir / helper_dir
            if not _private_dir(folder, uid):
                return False
            with os.scandir(folder) as it:
                inner = list(it)
            if not all(_plain_file(e) and e.name in helper_files for e in inner):
                return False
            if any(e.name == secret and not _single(e) for e in inner):
                return False
            _wipe(Path(runbooks[0].path))
            with contextlib.suppress(FileNotFoundError):
                _wipe(folder / secret)
            if not self.spare_dir.is_dir():
                self.spare_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._count += 1
            spare = self.spare_dir / str(self._count)
            os.rename(workdir, spare)
        except OSError:
            return False
        self._spares.setdefault(uid, []).append(spare)
        return True


@functools.cache
def pool(jobs_dir: Path) -> Workdirs:
    """The one Workdirs of a jobs directory in this process."""
    return Workdirs(jobs_dir)
