"""Binding a listening port, with ED-5's text when the port is taken."""

from __future__ import annotations

import errno
import socket

from .errors import OutpostError


def split_hostport(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise OutpostError("invalid_request", f"'{address}' is not HOST:PORT.",
                           fix="Give the address as HOST:PORT, for example 127.0.0.1:8443.")
    return host.strip("[]") or "0.0.0.0", int(port)


def holder(port: int) -> str | None:
    """'name (pid N)' of the process listening on ``port``, where the machine lets us see."""
    try:
        import psutil

        for conn in psutil.net_connections(kind="inet"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
                if conn.pid is None:
                    return None
                try:
                    return f"{psutil.Process(conn.pid).name()} (pid {conn.pid})"
                except psutil.Error:
                    return f"pid {conn.pid}"
    except Exception:  # psutil refuses on some systems without privileges
        return None
    return None


def bind(address: str) -> socket.socket:
    """A listening socket on HOST:PORT, or ED-5's error naming who holds the port."""
    host, port = split_hostport(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket says it is TCP, and without it every small answer waits out the
    # client's 40 ms delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno != errno.EADDRINUSE:
            raise OutpostError("port_allocated", f"Bind for {host}:{port} failed: {exc.strerror}",
                               address=f"{host}:{port}") from exc
        who = holder(port)
        held = f" It is held by {who}." if who else ""
        raise OutpostError(
            "port_allocated",
            f"Bind for {host}:{port} failed: port is already allocated.{held}",
            fix=(f"Stop {who}, or choose another port with --bind." if who
                 else "Stop the process that listens on it, or choose another port with --bind."),
            address=f"{host}:{port}", holder=who,
        ) from exc
    sock.set_inheritable(True)
    return sock
