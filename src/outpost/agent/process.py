"""A runbook's process, watched from the agent's event loop without asyncio's subprocess
transports.

``subprocess.Popen`` starts it (with vfork where it can: no preexec function), in a session
of its own, stdin from /dev/null and stdout and stderr into two pipes. The pipes are read
with ``os.read`` when the loop says they are readable, one chunk at a time: the pipe is not
read again until its chunk is taken, so a runbook that writes faster than the spool takes it
waits in its own write (bounded memory, as for 100 MB of output). Its exit is learnt from a
pidfd. asyncio's ``create_subprocess_exec`` does the same through a transport, a protocol
and a stream reader per pipe; measured on the agent's path this costs about 250 µs of CPU per
job less (bench/README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
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


class Pipe:
    """The read end of one of the runbook's pipes."""

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._loop = loop
        self._chunk: bytes | None = None
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        loop.add_reader(fd, self._ready)

    def _ready(self) -> None:
        try:
            data = os.read(self._fd, CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._loop.remove_reader(self._fd)
        if data:
            self._chunk = data
        else:
            self.close()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self, _n: int = CHUNK) -> bytes:
        """The next chunk of output; b"" at the end."""
        if self._chunk is None and not self._eof:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data, self._chunk = self._chunk, None
        if data is None:
            return b""
        if not self._eof:
            self._loop.add_reader(self._fd, self._ready)
        return data

    def close(self) -> None:
        if not self._eof:
            self._eof = True
            self._loop.remove_reader(self._fd)
            os.close(self._fd)


class Started:
    """A runbook process just started by ``spawn``, not watched yet; ``Process`` watches it
    from the event loop."""

    def __init__(self, popen: subprocess.Popen[bytes], stdout: int, stderr: int) -> None:
        self.popen = popen
        self.stdout = stdout
        self.stderr = stderr


def spawn(argv: list[str], cwd: Path, env: dict[str, str],
          identity: tuple[int, int] | None,
          preexec: Callable[[], None] | None = None) -> Started:
    """Start the runbook; ``preexec`` runs in the child after the change of user, before
    exec (sandbox.py: join the job's control group, or set its rlimits)."""
    r_out, w_out = os.pipe2(os.O_CLOEXEC)
    r_err, w_err = os.pipe2(os.O_CLOEXEC)
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
        self.stdout = Pipe(started.stdout, loop)
        self.stderr = Pipe(started.stderr, loop)
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
