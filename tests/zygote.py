"""A fork server for the processes the tests start: the "zygote".

Starting ``python -m outpost ...`` costs most of its CPU before the command does anything:
importing FastAPI, pydantic, SQLAlchemy, typer and the product's modules (about 1.7 s of CPU
for a hub, 0.6 s for an agent, 0.65 s for a CLI command). A zygote is a Python process that
imported those modules once, holds no thread and no event loop, and forks a child for each
process a test starts. The child is a real OS process running the product's real entry
point exactly as ``python -m MODULE ARGS`` would: it takes the requested arguments,
environment (cleared and replaced), working directory, standard streams (passed over a Unix
socket with SCM_RIGHTS), the signal dispositions a fresh interpreter would have, a new
session if asked, then runs the module as ``__main__`` and ends as the interpreter ends
(non-daemon threads joined, atexit handlers run, standard streams flushed).

Two kinds per test process, each started when first needed: ``outpost`` (the CLI and the
hub: ``python -m outpost ...``) and ``agentd`` (``python -m outpost.cli.agentd``, with only
the agent's lean imports: the daemon keeps typer, rich and the hub's libraries out of its
memory, so its zygote does too).

The zygote is the child's parent: it reaps it (``wait4``, no zombie) and writes the wait
status and the child's CPU seconds on the request's connection, which the test side
(``Process``, a ``subprocess.Popen`` look-alike) reads in ``poll()`` and ``wait()``. Signals
go to the child's real pid (through a pidfd, so a reaped pid is never signalled).

A request falls back to a plain ``subprocess`` (``spawn`` decides) when it is not ``python
-m outpost ...`` or ``-m outpost.cli.agentd`` with this interpreter, when it asks for a
``Popen`` option the zygote does not reproduce, when a standard stream is a terminal, when
a resource limit is above the zygote's (which its children inherit: each is given the test
process's limits and umask, as a Popen child inherits them), when
its environment differs from a test's usual one in a variable that changes how the
interpreter starts (``STARTUP_ENV``: PYTHONPATH, PYTHONNOUSERSITE, coverage...), or when the
zygote is unavailable. A variable read by a module as it is imported (``IMPORT_TIME_ENV``:
COLUMNS, TERM, the locale...) picks a zygote started with the same values. Only a test run
uses zygotes (tests/conftest.py calls ``activate``), and ``OUTPOST_TEST_ZYGOTE=0`` turns them
off there. A zygote ends when its test process does (the pipe it reads from closes).

Per-process state made at import and inherited by every child: Python's ``random`` reseeds
in a forked child; ``uuid4``, ``secrets``, PyNaCl and OpenSSL draw from the kernel
(``getrandom``) at use; the product reads no environment variable and makes no id, key,
clock reading, thread or handler at import (its module-level loggers have no handler until
the command sets logging up); ``tempfile``'s cached directory is cleared in the child.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import locale
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

SWITCH = "OUTPOST_TEST_ZYGOTE"
ROOT = Path(__file__).resolve().parents[1]
# What each kind imports before it forks, as the real process would import it on its way.
PRELOAD = {
    "outpost": ["outpost.cli.main", "outpost.cli.client", "outpost.hub.server",
                "outpost.hub.app", "outpost.hub.config", "outpost.hub.db"],
    "agentd": ["outpost.cli.agentd", "outpost.agent.config", "outpost.agent.joblogs",
               "outpost.agent.logs", "outpost.agent.daemon", "outpost.agent.state",
               "outpost.agent.transport"],
}
MODULES = {"outpost": "outpost", "outpost.cli.agentd": "agentd"}
# Modules whose process ends with the interpreter's full teardown, not os._exit after
# atexit: an agent that exits ~0.1 s sooner than a real one sends its stop notice to the hub
# later relative to its exit, and tests that read the last heartbeat just after stopping
# it (tests/faults/test_cache.py) see the notice land after.
FULL_TEARDOWN = ("outpost.cli.agentd",)
# Environment variables (or prefixes) that change what the interpreter loads or how it
# starts: a request whose values differ from those of a test's usual environment
# (``clean_env()``) starts as a plain subprocess.
STARTUP_ENV = ("PYTHON", "LD_", "MALLOC", "COV_", "COVERAGE", "VIRTUAL_ENV")
# Those read as a module is imported (rich's and typer's consoles: the terminal's width and
# colours; prometheus_client's value class; the time module's zone; the locale): each set of
# their values has a zygote of its own (at most MAX_VARIANTS a kind, then plain processes).
# The product itself reads its variables (OUTPOST_*) at use, none at import.
IMPORT_TIME_ENV = ("LC_", "LANG", "TZ", "TERM", "COLORTERM", "NO_COLOR", "FORCE_COLOR",
                   "PY_COLORS", "TTY_", "GITHUB_ACTIONS", "TERMINAL_WIDTH", "COLUMNS", "LINES",
                   "JUPYTER_", "_TYPER", "PROMETHEUS_", "SSL_CERT", "REQUESTS_CA", "CURL_CA")
MAX_VARIANTS = 4
# A zygote's command line is padded so that its children can write their own over it
# (/proc/PID/cmdline, read by ps, psutil and the agent's check of its pid file).
CMDLINE_ROOM = 3072
ENV_ROOM = 16384
_READY = b"ready\n"


def _part(env: Mapping[str, str], prefixes: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in env.items() if k.startswith(prefixes)))


def startup_env(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """What of ``env`` decides how the interpreter starts (STARTUP_ENV); HOME too where it
    adds the user's site directory to its path."""
    import site

    return _part(env, STARTUP_ENV + (("HOME",) if site.ENABLE_USER_SITE else ()))


def import_time_env(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """What of ``env`` the preloaded modules read as they are imported (IMPORT_TIME_ENV)."""
    return _part(env, IMPORT_TIME_ENV)


# --- the server --------------------------------------------------------------------------
def _recv_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
    while len(data) < 8 or len(data) < 8 + int(data[:8]):
        more = conn.recv(1 << 16)
        if not more:
            raise EOFError("request cut short")
        data += more
    return json.loads(data[8:8 + int(data[:8])]), list(fds)


def _signals_as_started(ignored: Sequence[int]) -> None:
    """The dispositions a fresh interpreter has when a Popen of the test process starts it:
    what the test process ignores stays ignored (exec keeps SIG_IGN), everything else is
    default; then the interpreter's own: SIGPIPE and SIGXFSZ ignored, SIGINT raising
    KeyboardInterrupt unless ignored."""
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_IGN if sig in ignored else signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if signal.SIGINT not in ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _show_as(argv: list[str], env: dict[str, str]) -> None:
    """Write ``argv`` and ``env`` over this process's original arguments and environment,
    the memory /proc/PID/cmdline and /proc/PID/environ show (the zygote's, with room to
    spare: CMDLINE_ROOM, ENV_ROOM; the test side checked that they fit), so that ps,
    psutil and the agent's own checks (its pid file's owner, ``reset-cache`` starting it
    again as it ran) see this process. The command line is written as setproctitle does,
    its words separated by spaces (psutil splits them again); the environment as it was,
    each variable ended by a NUL."""
    import ctypes

    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    start, end, env_start, env_end = (int(fields[i]) for i in (45, 46, 47, 48))
    title = " ".join(argv).encode()[:end - start - 2] + b"\0"
    # A last byte that is not NUL tells the kernel to show the title up to its NUL.
    ctypes.memmove(start, title.ljust(end - start, b" "), end - start)
    block = b"".join(os.fsencode(f"{k}={v}") + b"\0" for k, v in env.items())
    ctypes.memmove(env_start, block[:env_end - env_start].ljust(env_end - env_start, b"\0"),
                   env_end - env_start)


def _child(request: dict[str, Any], fds: list[int], server_fds: list[int],
           sockets: list[socket.socket]) -> NoReturn:
    """In the forked child: become the requested process and run it. The agent daemon's end
    (a return, a SystemExit, an uncaught exception or KeyboardInterrupt) unwinds out of the
    zygote's loop to the interpreter, which ends as it ends ``python -m``: its traceback if
    any, non-daemon threads joined, atexit handlers, streams flushed, modules torn down. The
    others end the same way but for the modules' teardown, which costs a CLI command forked
    with the hub's modules loaded (0.25 s of CPU) far more than a real one."""
    import runpy
    import tempfile
    import traceback

    try:
        signal.set_wakeup_fd(-1)
        for sock in sockets:  # detached: the interpreter's teardown must not close them
            os.close(sock.detach())
        for fd in server_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        _signals_as_started(request["ignored_signals"])
        if request["new_session"]:
            os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in set(fds):
            if fd > 2:
                os.close(fd)
        for name, limits in request["rlimits"].items():
            resource.setrlimit(getattr(resource, name), tuple(limits))
        os.umask(request["umask"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.path[0] = os.getcwd()  # what `python -m` puts first on its path
        tempfile.tempdir = None
        sys.argv = [request["module"], *request["args"]]
        _show_as([sys.executable, "-m", request["module"], *request["args"]], request["env"])
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
    except BaseException:  # the child could not become the process: say why, exit 1
        traceback.print_exc()
        os._exit(1)
    # As under `python -m`, the module runs as __main__ without having been imported
    # (a preloaded agentd would make runpy warn).
    sys.modules.pop(request["module"], None)
    if request["module"] in FULL_TEARDOWN:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        sys.exit(0)
    code, interrupted = 0, False
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        interrupted = True
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    # The interpreter's way out but its modules' teardown: join non-daemon threads, run
    # atexit, flush.
    with contextlib.suppress(BaseException):
        threading._shutdown()  # type: ignore[attr-defined]
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            code = code or 120
    if interrupted:  # an uncaught KeyboardInterrupt ends Python by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _prebuild_cli() -> None:
    """Build the ``outpost`` app's click command once, here, for every child to use.

    Each ``outpost`` process (a hub or a command) turns the whole Typer app into click
    commands as it starts: every command's signature and type hints read, about 0.06 s of
    CPU, the same each time (what it reads is the code; the environment it might read is
    that of this zygote, which is the child's: IMPORT_TIME_ENV). The child gets the command
    built from the same app, the way it gets the modules imported."""
    import typer.main

    from outpost.cli.main import app

    built = typer.main.get_command(app)
    build = typer.main.get_command

    def get_command(typer_instance: typer.Typer) -> Any:
        return built if typer_instance is app else build(typer_instance)

    typer.main.get_command = get_command  # type: ignore[assignment]


def serve(kind: str, listen_fd: int, parent_fd: int) -> None:
    """The zygote's loop: accept a request, fork its child, answer its pid (and a pidfd);
    reap children and write each one's wait status and CPU seconds on its connection."""
    for name in [*PRELOAD[kind], "ctypes", "runpy", "tempfile", "traceback"]:
        __import__(name)  # the last ones for the child's own use
    if kind == "outpost":
        _prebuild_cli()
    if threading.active_count() != 1:
        raise SystemExit(f"zygote {kind}: a preloaded module started a thread")
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    listener = socket.socket(fileno=listen_fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    waiting: dict[int, socket.socket] = {}
    poller = select.poll()
    for fd in (listen_fd, parent_fd, wake_r):
        poller.register(fd, select.POLLIN)
    # The test side waits for this line on the zygote's stdout, then closes that pipe.
    os.write(1, _READY)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)
    os.close(devnull)
    while True:
        for fd, _event in poller.poll():
            if fd == parent_fd:  # the test process ended
                return
            if fd == wake_r:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 512):
                        pass
                _reap(waiting)
            elif fd == listen_fd:
                conn, _ = listener.accept()
                _fork(conn, waiting, listener, [parent_fd, wake_r, wake_w])
        _reap(waiting)


def _fork(conn: socket.socket, waiting: dict[int, socket.socket], listener: socket.socket,
          server_fds: list[int]) -> None:
    try:
        request, fds = _recv_request(conn)
    except (OSError, EOFError, ValueError):
        conn.close()
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request, fds, server_fds, [listener, conn, *waiting.values()])
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    for fd in fds:
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    try:
        socket.send_fds(conn, [json.dumps({"pid": pid}).encode() + b"\n"], [pidfd])
    except OSError:
        pass
    finally:
        os.close(pidfd)
    waiting[pid] = conn


def _reap(waiting: dict[int, socket.socket]) -> None:
    while waiting:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = waiting.pop(pid, None)
        if conn is None:
            continue
        line = {"status": status, "cpu": usage.ru_utime + usage.ru_stime}
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps(line).encode() + b"\n")
        conn.close()


# --- the test side -----------------------------------------------------------------------
class Unavailable(Exception):
    """The zygote could not take the request: start a plain subprocess instead."""


_reported_cpu = 0.0
_lock = threading.Lock()
_servers: dict[tuple[str, tuple[tuple[str, str], ...]], Server | None] = {}


def cpu_seconds() -> float:
    """CPU seconds of the zygotes' children reaped and read so far, and of the zygotes
    themselves (their imports and forks): what RUSAGE_CHILDREN no longer sees."""
    return _reported_cpu + sum(s.own_cpu() for s in list(_servers.values()) if s is not None)


class Server:
    """The test process's handle on one zygote of a kind."""

    def __init__(self, kind: str, env: dict[str, str]) -> None:
        self.kind = kind
        self.rlimits = _rlimits()  # the zygote's, which its children may lower, not raise
        self.address = f"\0outpost-zygote-{os.getpid()}-{kind}-{os.urandom(6).hex()}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.address)
        listener.listen(64)
        parent_r, self._parent_w = os.pipe()
        argv = [sys.executable, "-m", "tests.zygote", kind, str(listener.fileno()),
                str(parent_r), "-" * CMDLINE_ROOM]
        self.cmdline_room = sum(len(os.fsencode(arg)) + 1 for arg in argv)
        env = {**env, "OUTPOST_TEST_ZYGOTE_ROOM": "-" * ENV_ROOM}
        self.env_room = _env_size(env)
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, pass_fds=(listener.fileno(), parent_r))
        listener.close()
        os.close(parent_r)
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline()
        if ready != _READY:
            self.proc.wait()
            raise Unavailable(f"the {kind} zygote did not start ({self.proc.returncode})")
        self.proc.stdout.close()

    def own_cpu(self) -> float:
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def spawn(self, module: str, args: Sequence[str], env: dict[str, str], cwd: str,
              stdio: tuple[int, int, int], new_session: bool) -> Process:
        ignored = []
        for sig in signal.valid_signals():
            if sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGPIPE, signal.SIGXFSZ):
                continue
            with contextlib.suppress(OSError, ValueError):
                if signal.getsignal(sig) == signal.SIG_IGN:
                    ignored.append(int(sig))
        if sum(len(os.fsencode(arg)) + 1 for arg in (sys.executable, "-m", module, *args)) \
                > self.cmdline_room - 2 or _env_size(env) > self.env_room:
            raise Unavailable("a command line or environment larger than the zygote's room")
        rlimits = _rlimits()
        if os.geteuid() != 0 and any(rlimits[name][1] > hard for name, (_soft, hard)
                                     in self.rlimits.items()):
            raise Unavailable(f"a resource limit above the {self.kind} zygote's")
        umask = os.umask(0o022)
        os.umask(umask)
        body = json.dumps({"module": module, "args": list(args), "env": env, "cwd": cwd,
                           "new_session": new_session, "ignored_signals": ignored,
                           "rlimits": rlimits, "umask": umask}).encode()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self.address)
            socket.send_fds(conn, [b"%08d" % len(body) + body], list(stdio))
            data, fds, _flags, _addr = socket.recv_fds(conn, 4096, 1)
        except OSError as exc:
            conn.close()
            raise Unavailable(f"the {self.kind} zygote did not answer: {exc}") from exc
        if not data.endswith(b"\n") or not fds:
            conn.close()
            for fd in fds:
                os.close(fd)
            raise Unavailable(f"the {self.kind} zygote did not answer")
        return Process([sys.executable, "-m", module, *args], conn, json.loads(data)["pid"],
                       fds[0])

    def close(self) -> None:
        os.close(self._parent_w)
        self.proc.wait()


def _env_size(env: Mapping[str, str]) -> int:
    return sum(len(os.fsencode(f"{k}={v}")) + 1 for k, v in env.items())


def _rlimits() -> dict[str, tuple[int, int]]:
    """This process's resource limits, which a child of Popen inherits (and a zygote's child
    is given)."""
    return {name: resource.getrlimit(getattr(resource, name)) for name in dir(resource)
            if name.startswith("RLIMIT_")}


def server(kind: str, env: dict[str, str]) -> Server | None:
    """This process's zygote of ``kind`` for the import-time values of ``env`` (started on
    first use, with ``env``), or None: it could not start, or there are MAX_VARIANTS of the
    kind already, or ``env`` would start the interpreter differently (STARTUP_ENV) from a
    test's usual environment."""
    from tests.support import clean_env

    startup = startup_env(env)
    if startup != startup_env(clean_env()):
        return None
    key = (kind, startup + import_time_env(env))
    with _lock:
        if key not in _servers:
            if sum(1 for k in _servers if k[0] == kind) >= MAX_VARIANTS:
                return None
            if not _servers:
                atexit.register(stop_all, os.getpid())
            try:
                _servers[key] = Server(kind, env)
            except (Unavailable, OSError) as exc:
                print(f"outpost tests: {exc}; starting processes without it", file=sys.stderr)
                _servers[key] = None
        return _servers[key]


_active = False


def activate() -> None:
    """Use zygotes in this process (tests/conftest.py does, for the test run): a script that
    imports tests.support (the benchmarks, which measure the processes' own memory and CPU)
    starts plain processes."""
    global _active
    _active = True


def enabled() -> bool:
    return _active and os.environ.get(SWITCH, "1") != "0"


class Process:
    """What ``subprocess.Popen`` offers the tests, for a child of a zygote: ``pid``,
    ``poll()``, ``wait(timeout)``, ``returncode`` (``-N`` for a death by signal N),
    ``send_signal``, ``terminate`` and ``kill``. The status comes from the zygote."""

    stdin: IO[Any] | None = None
    stdout: IO[Any] | None = None
    stderr: IO[Any] | None = None

    def __init__(self, args: list[str], conn: socket.socket, pid: int, pidfd: int) -> None:
        self.args = args
        self.pid = pid
        self.returncode: int | None = None
        self._conn = conn
        self._pidfd = pidfd
        self._buffer = b""

    def __repr__(self) -> str:
        return f"<zygote.Process: returncode: {self.returncode} args: {self.args!r}>"

    def _read_status(self, timeout: float | None) -> bool:
        global _reported_cpu
        if self.returncode is not None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._conn], [], [], left)
            if not ready:
                return False
            chunk = self._conn.recv(4096)
            if not chunk:
                raise RuntimeError(f"the zygote went away before process {self.pid} ended")
            self._buffer += chunk
        line = json.loads(self._buffer.split(b"\n", 1)[0])
        with _lock:
            _reported_cpu += float(line["cpu"])
        self.returncode = os.waitstatus_to_exitcode(int(line["status"]))
        self._conn.close()
        os.close(self._pidfd)
        return True

    def poll(self) -> int | None:
        self._read_status(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._read_status(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __del__(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(Exception):
                self._conn.close()
                os.close(self._pidfd)


def _fd(stream: Any, default: int) -> int | None:
    """The descriptor of a Popen stream argument, or None when the zygote cannot take it."""
    if stream is None:
        return default
    if stream == subprocess.DEVNULL:
        return -2
    if isinstance(stream, int) and stream >= 0:
        return stream
    if hasattr(stream, "fileno"):
        return int(stream.fileno())
    return None


def spawn(args: Sequence[str], *, env: dict[str, str], stdin: Any = None, stdout: Any = None,
          stderr: Any = None, cwd: str | os.PathLike[str] | None = None,
          start_new_session: bool = False) -> subprocess.Popen[bytes] | Process:
    """``subprocess.Popen(args, ...)`` with these options, forked from a zygote when it
    may be (see the module's docstring), a plain subprocess otherwise."""
    def plain() -> subprocess.Popen[bytes]:
        return subprocess.Popen(list(args), env=env, stdin=stdin, stdout=stdout, stderr=stderr,
                                cwd=cwd, start_new_session=start_new_session)

    args = list(args)
    if any(k.startswith(("COV_CORE_", "COVERAGE_PROCESS_START")) for k in env):
        return plain()  # a process measured for coverage starts as itself
    if (not enabled() or len(args) < 3 or args[0] != sys.executable or args[1] != "-m"
            or args[2] not in MODULES):
        return plain()
    fds = [_fd(stdin, 0), _fd(stdout, 1),
           _fd(stdout, 1) if stderr == subprocess.STDOUT else _fd(stderr, 2)]
    if any(fd is None for fd in fds):
        return plain()
    with contextlib.ExitStack() as stack:
        stdio = []
        for fd in fds:
            assert fd is not None
            if fd == -2:
                fd = os.open(os.devnull, os.O_RDWR)
                stack.callback(os.close, fd)
            stdio.append(fd)
        if any(os.isatty(fd) for fd in stdio):
            return plain()
        server_ = server(MODULES[args[2]], env)
        if server_ is None:
            return plain()
        try:
            return server_.spawn(args[2], args[3:], env, os.path.abspath(cwd or os.getcwd()),
                                 (stdio[0], stdio[1], stdio[2]), start_new_session)
        except Unavailable as exc:
            print(f"outpost tests: {exc}; a plain subprocess instead", file=sys.stderr)
            return plain()


def run(args: Sequence[str], *, env: dict[str, str], timeout: float | None = None,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout,
    input=input)``, its process from a zygote when it may be."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe() if input is not None else (None, None)
    try:
        proc = spawn(args, env=env, stdin=in_r, stdout=out_w, stderr=err_w)
    except BaseException:
        for fd in (out_r, out_w, err_r, err_w, in_r, in_w):
            if fd is not None:
                os.close(fd)
        raise
    for fd in (out_w, err_w, in_r):
        if fd is not None:
            os.close(fd)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = (input or "").encode(locale.getpreferredencoding(False))
    open_fds = [out_r, err_r]
    writers = [in_w] if in_w is not None else []
    try:
        while open_fds or writers:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                proc.kill()
                proc.wait()
                # As subprocess.run: the output so far, as bytes.
                raise subprocess.TimeoutExpired(list(args), timeout or 0,
                                                b"".join(chunks[out_r]),
                                                b"".join(chunks[err_r]))
            readable, writable, _ = select.select(open_fds, writers, [], left)
            for fd in writable:
                try:
                    written = os.write(fd, pending[:1 << 16])
                except BrokenPipeError:
                    written = len(pending)
                pending = pending[written:]
                if not pending:
                    writers.remove(fd)
                    os.close(fd)
                    in_w = None
            for fd in readable:
                data = os.read(fd, 1 << 16)
                if data:
                    chunks[fd].append(data)
                else:
                    open_fds.remove(fd)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            code = proc.wait(left)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    finally:
        for fd in (out_r, err_r, in_w):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
    return subprocess.CompletedProcess(list(args), code, _text(b"".join(chunks[out_r])),
                                       _text(b"".join(chunks[err_r])))


def _text(data: bytes) -> str:
    """Bytes decoded as ``subprocess`` does with ``text=True`` (universal newlines)."""
    return data.decode(locale.getpreferredencoding(False)).replace("\r\n", "\n").replace(
        "\r", "\n")


def stop_all(owner: int | None = None) -> None:
    """End this process's zygotes (their running children go on, as orphans do)."""
    if owner is not None and owner != os.getpid():
        return  # a fork of the test process: the zygotes are not its own
    with _lock:
        for server in _servers.values():
            if server is not None:
                with contextlib.suppress(OSError):
                    server.close()
        _servers.clear()


def probe() -> dict[str, Any]:
    """What a process knows of how it was started, and a draw of each source of
    randomness: ``python -m tests.zygote probe`` prints it (tests/integration/test_zygote.py
    compares a zygote's child with a plain process)."""
    import logging
    import random
    import secrets
    import tempfile
    import uuid

    import nacl.signing
    import psutil

    status = dict(line.split(":", 1) for line in
                  Path("/proc/self/status").read_text().splitlines() if ":" in line)
    fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    return {
        "argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd(), "env": dict(os.environ),
        "ppid": os.getppid(), "pid": os.getpid(), "sid": os.getsid(0), "pgid": os.getpgid(0),
        "signals": {k: status[k].strip() for k in ("SigBlk", "SigIgn", "SigCgt")},
        "sigint": repr(signal.getsignal(signal.SIGINT)),
        "fds": [fd for fd in fds if os.path.exists(f"/proc/self/fd/{fd}")],
        "threads": threading.active_count(), "handlers": len(logging.getLogger().handlers),
        "tempdir": tempfile.gettempdir(),
        "stdout_buffered": not getattr(sys.stdout, "write_through", False),
        "isatty": [os.isatty(fd) for fd in (0, 1, 2)],
        "rlimits": _rlimits(), "umask": os.umask(0o022),
        "cmdline": psutil.Process().cmdline(), "environ": psutil.Process().environ(),
        "random": random.random(), "uuid": uuid.uuid4().hex, "urandom": os.urandom(8).hex(),
        "secret": secrets.token_hex(8),
        "nacl": bytes(nacl.signing.SigningKey.generate().verify_key).hex(),
    }


if __name__ == "__main__":
    if sys.argv[1:] == ["probe"]:
        print(json.dumps(probe()))
    else:  # KIND LISTEN_FD PARENT_FD PADDING
        serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
