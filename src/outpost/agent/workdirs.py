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
as before. Only jobs that run as the agent's own user use them: a run-as job's directory is
made for that user outside the state directory.
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


def _private_dir(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_mode & 0o7777 == 0o700
            and st.st_uid == os.geteuid())


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
        self._spares: list[Path] = []
        self._count = 0
        self._started = False

    def _start(self) -> None:
        """Spares left by an earlier run of the agent are not trusted: they go."""
        self._started = True
        shutil.rmtree(self.spare_dir, ignore_errors=True)

    def take(self, workdir: Path) -> bool:
        """Put a spare directory at ``workdir``; False if there is none."""
        if not self._started:
            self._start()
        if self._spares and os.path.lexists(workdir):
            shutil.rmtree(workdir, ignore_errors=True)  # an earlier attempt's, cut short
        while self._spares:
            spare = self._spares.pop()
            try:
                os.rename(spare, workdir)
            except OSError:
                shutil.rmtree(spare, ignore_errors=True)
                continue
            if _private_dir(workdir):
                return True
            shutil.rmtree(workdir, ignore_errors=True)
        return False

    def give_back(self, workdir: Path, helper_dir: str, helper_files: frozenset[str],
                  secret: str) -> bool:
        """Keep ``workdir`` as a spare if it holds only a runbook file and the helper
        directory with some of ``helper_files``; the runbook file and the helper's
        ``secret`` file are emptied. Returns whether it was kept; the caller removes it
        otherwise."""
        if len(self._spares) >= self.keep or not self._started or not _private_dir(workdir):
            return False
        try:
            with os.scandir(workdir) as it:
                top = list(it)
            runbooks = [e for e in top if e.name.startswith("runbook") and _plain_file(e)]
            if len(top) != 2 or len(runbooks) != 1:
                return False
            folder = workdir / helper_dir
            if not _private_dir(folder):
                return False
            with os.scandir(folder) as it:
                inner = list(it)
            if not all(_plain_file(e) and e.name in helper_files for e in inner):
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
        self._spares.append(spare)
        return True


@functools.cache
def pool(jobs_dir: Path) -> Workdirs:
    """The one Workdirs of a jobs directory in this process."""
    return Workdirs(jobs_dir)
