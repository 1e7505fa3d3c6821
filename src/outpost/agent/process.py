"""A runbook's process, watched from the agent's event loop without asyncio's subprocess
transports.

``subprocess.Popen`` starts it (with vfork where it can: no preexec function), in a session
of its own, stdin from /dev/null. Its stdout and stderr are two files in the spool directory
(``output-K.out`` and ``output-K.err``, a pair used again by later runbooks: ``Outputs``),
not pipes: what the runbook wrote is on disk the moment
its write returns, so an agent that dies loses none of it, and a runbook that outlives its
agent goes on writing (a pipe would have lost what it held and killed the runbook with
SIGPIPE at its next write). The agent tails the two files (``Tail``) and turns them into
records; a restarted agent reads on from where the spool says the last one stopped
(runner.py). A regular file has no readiness to wait for, so the tail looks again after a
short sleep that grows while nothing comes (5 ms to 100 ms) and at once when the runbook
exits. Its end is where a pipe's would be: when no process has the file open for writing
any more, which a read lease tells (``F_SETLEASE`` succeeds only then). Its exit is learnt
from a pidfd. asyncio's ``create_subprocess_exec`` (pipes, a transport, a protocol and a
stream reader per pipe) is used where pidfds do not work.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

CHUNK = 64 * 1024


def available() -> bool:
    """pidfds (Linux 5.3 and later); without them the agent uses asyncio's subprocesses."""
    if not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    return True


POLL_MIN = 0.005  # seconds between looks at a file that has just grown
POLL_MAX = 0.1  # ... and at one that has not grown for a while


class Tail:
    """The agent's read end of one of the runbook's output files."""

    def __init__(self, fd: int, exited: asyncio.Future[int]) -> None:
        self._fd = fd
        self._exited = exited
        self._eof = False
        self.offset = 0  # bytes read so far
        self._delay = POLL_MIN
        self.clean = False  # ended because no process had the file open for writing

    async def read(self, _n: int = CHUNK) -> bytes:
        """The next chunk of output; b"" at the end (the runbook exited and no process has
        the file open for writing any more)."""
        while True:
            data = self._take()
            if data:
                self._delay = POLL_MIN
                await asyncio.sleep(0)  # a file always reads at once: let others run
                return data
            if self._eof:
                return b""
            if self._exited.done() and self._no_writers():
                data = self._take()  # written between the read above and the check
                if not data:
                    self.close()
                return data
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._exited), self._delay)
            self._delay = min(self._delay * 2, POLL_MAX)

    def _take(self) -> bytes:
        if self._eof:
            return b""
        data = os.read(self._fd, CHUNK)
        self.offset += len(data)
        return data

    def _no_writers(self) -> bool:
        """Whether no process has the file open for writing: a read lease is granted only
        then, and given back at once. Where leases cannot be had (a file system without
        them), the runbook's exit is the end."""
        try:
            fcntl.fcntl(self._fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError as exc:
            return exc.errno != errno.EAGAIN
        fcntl.fcntl(self._fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        self.clean = True
        return True

    def close(self) -> None:
        if not self._eof:
            self._eof = True
            os.close(self._fd)


class Started:
    """A runbook process just started by ``spawn``, not watched yet; ``Process`` watches it
    from the event loop."""

    def __init__(self, popen: subprocess.Popen[bytes], stdout: int, stderr: int) -> None:
        self.popen = popen
        self.stdout = stdout
        self.stderr = stderr


class Outputs:
    """The pairs of files runbooks write their stdout and stderr to, in one directory.

    A pair is used again by a later runbook: making a file costs the kernel up to a
    millisecond of CPU where writing over one costs microseconds (architecture.md). It is
    given back emptied, and only if its runbook's output ended with no process holding it
    open for writing, so nothing left of one job can write into the next one's output.
    Pairs left by an earlier run of the agent are removed before the first is taken (its
    leftover attempts were read to their end first: runner.end_leftover).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._free: list[int] = []
        self._next = 0
        self._swept = False

    def paths(self, number: int) -> tuple[Path, Path]:
        return self.root / f"output-{number}.out", self.root / f"output-{number}.err"

    def take(self) -> int:
        if not self._swept:
            self._swept = True
            for path in self.root.glob("output-*"):
                with contextlib.suppress(OSError):
                    path.unlink()
        if self._free:
            return self._free.pop()
        self._next += 1
        return self._next - 1

    def give_back(self, number: int, reuse: bool) -> None:
        """Emptied (the disk's space and the job's output go at once) and kept for the next
        runbook; removed instead when something may still write to it."""
        for path in self.paths(number):
            with contextlib.suppress(OSError):
                if reuse:
                    os.truncate(path, 0)
                else:
                    path.unlink()
        if reuse:
            self._free.append(number)


@functools.cache
def outputs(root: Path) -> Outputs:
    """The one Outputs of a spool directory in this process."""
    return Outputs(root)


def spawn(argv: list[str], cwd: Path, env: dict[str, str],
          identity: tuple[int, int] | None, out: Path, err: Path,
          preexec: Callable[[], None] | None = None) -> Started:
    """Start the runbook with its stdout in ``out`` and its stderr in ``err`` (emptied, or
    made: the agent's, 0600; the runbook writes through what it inherits, never by name).
    ``preexec`` runs in the child after the change of user, before exec (sandbox.py: join
    the job's control group, or set its rlimits)."""
    made = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    w_out = os.open(out, made, 0o600)
    w_err = r_out = -1
    try:
        w_err = os.open(err, made, 0o600)
        r_out = os.open(out, os.O_RDONLY | os.O_CLOEXEC)
        r_err = os.open(err, os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        for fd in (w_out, w_err, r_out):
            if fd >= 0:
                os.close(fd)
        raise
    try:
        popen = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=w_out,
            stderr=w_err, start_new_session=True,
            user=identity[0] if identity else None,
            group=identity[1] if identity else None,
            extra_groups=[] if identity else None, preexec_fn=preexec)
    except BaseException:
        os.close(r_out)
        os.close(r_err)
        raise
    finally:
        os.close(w_out)
        os.close(w_err)
    return Started(popen, r_out, r_err)


class Process:
    """What the runner uses of a started runbook: ``pid``, ``returncode`` (negative for a
    signal), ``stdout`` and ``stderr`` (``read``), ``wait()`` and ``close()``. Made in the
    event loop's thread."""

    def __init__(self, started: Started) -> None:
        loop = asyncio.get_running_loop()
        self._popen = started.popen
        self.pid = self._popen.pid
        self.returncode: int | None = None
        self._loop = loop
        self._exited: asyncio.Future[int] = loop.create_future()
        self.stdout = Tail(started.stdout, self._exited)
        self.stderr = Tail(started.stderr, self._exited)
        self._pidfd: int | None = os.pidfd_open(self.pid)
        loop.add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        if self._pidfd is None:
            return
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED)
        except ChildProcessError:  # reaped by someone else: its status is lost
            info = None
        if info is None:
            code = 255
        elif info.si_code == os.CLD_EXITED:
            code = info.si_status
        else:  # killed, or killed and dumped core
            code = -info.si_status
        self.returncode = self._popen.returncode = code
        if not self._exited.done():
            self._exited.set_result(code)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def close(self) -> None:
        """Stop watching: the pipes and the pidfd are closed (the process is not touched)."""
        self.stdout.close()
        self.stderr.close()
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = None


def watch_children_with_pidfd(loop: asyncio.AbstractEventLoop) -> bool:
    """On Python 3.11, learn of a runbook's exit through a pidfd in the event loop instead
    of a thread per child waiting in waitpid() (3.12 and later do this by themselves).
    Returns whether it is in use; where pidfds cannot be opened the default stays."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(loop)
    asyncio.get_event_loop_policy().set_child_watcher(watcher)
    return True
