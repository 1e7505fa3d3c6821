"""What the supervisor asks of the kernel about processes, kept apart from its bookkeeping:
a process's ppid, group, session and start time (``/proc/PID/stat``), whether a recorded
process is still the same one, the control group a process is in, whether a port is free
(ED-5), and the child's set-up between fork and exec (control group, own resolv.conf in a
mount namespace of its own, then the module's user).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Container
from pathlib import Path
from typing import Any

from outpost.protocol import ports as ports_mod
from outpost.protocol.errors import OutpostError

from .. import cgroups

CLONE_NEWNS = 0x00020000
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
_libc: Any = None  # (libc, ctypes.get_errno), loaded at the first module with dns


def proc_stat(pid: int) -> tuple[int, int, int, int] | None:
    """(ppid, process group, session, start time in clock ticks) of ``pid``; None: gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = text[text.rfind(")") + 2:].split()
    try:
        return int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19])
    except (IndexError, ValueError):
        return None


def alive(pid: int, start_time: int | None) -> bool:
    stat = proc_stat(pid)
    if stat is None or (start_time is not None and stat[3] != start_time):
        return False
    try:  # a zombie has ended: its pidfd is readable at once, but say so here too
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0
    except OSError:
        return False


def exit_code(returncode: int) -> int:
    """A shell's number: 128 + the signal for a process a signal ended."""
    return 128 - returncode if returncode < 0 else returncode


def check_ports(module: str, ports: list[int]) -> None:
    """ED-5: each port bound for a moment on 0.0.0.0, or the error naming its holder."""
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                continue  # not ours to judge (a privileged port as non-root, say)
            who = ports_mod.holder(port)
            held = f" It is held by {who}." if who else ""
            raise OutpostError(
                "module_port_allocated",
                f"The module {module} cannot start: Bind for 0.0.0.0:{port} failed: "
                f"port is already allocated.{held}",
                module=module, port=port, holder=who) from None
        finally:
            sock.close()


def preexec(group: cgroups.Group | None, identity: tuple[int, int] | None,
            resolv: bytes | None) -> Callable[[], None] | None:
    """In the child, before exec: its control group, its own resolv.conf (a mount
    namespace of its own), then its user (after the mounts, which need root). Everything
    is prepared here, in the agent: libc is loaded before the fork."""
    global _libc
    fds = group.open_procs() if group is not None else []
    if resolv is not None and _libc is None:
        import ctypes  # only for a module with its own DNS servers

        _libc = (ctypes.CDLL(None, use_errno=True), ctypes.get_errno)
    libc: Any
    get_errno: Any
    libc, get_errno = _libc if _libc is not None else (None, None)
    if not fds and identity is None and resolv is None:
        return None

    def child() -> None:
        if fds:
            cgroups.join(fds)
        if resolv is not None:
            if libc.unshare(CLONE_NEWNS) != 0:
                raise OSError(get_errno(), "unshare(CLONE_NEWNS)")
            if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
                raise OSError(get_errno(), "mount --make-rprivate /")
            if libc.mount(resolv, b"/etc/resolv.conf", None, MS_BIND, None) != 0:
                raise OSError(get_errno(), "mount --bind resolv.conf")
        if identity is not None:
            os.setgroups([])
            os.setgid(identity[1])
            os.setuid(identity[0])

    return child


def cgroup_owner(pid: int, hierarchy: cgroups.Hierarchy | None, prefix: str,
                 names: Container[str]) -> str | None:
    """The module whose control group (``PREFIX``NAME under the agent's bases) holds
    ``pid``; a process cannot move itself there (the group's files are the agent's)."""
    if hierarchy is None:
        return None
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    bases = {str(b) for b in hierarchy.bases.values()}
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        parent, _, leaf = path.rstrip("/").rpartition("/")
        name = leaf[len(prefix):]
        if leaf.startswith(prefix) and name in names and parent and any(
                b.endswith(parent) for b in bases):
            return name
    return None
