"""A NATS subscriber over a plain socket, for tests and benchmarks: what the hub published to
the real NATS server, with headers and the time each arrived."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

NATS = ("127.0.0.1", 4222)


@dataclass
class Received:
    subject: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.time)


class Subscriber:
    """Subscribes to ``subject`` (wildcards allowed) and collects every message."""

    def __init__(self, subject: str, address: tuple[str, int] = NATS, *,
                 tls: ssl.SSLContext | None = None, user: str | None = None,
                 password: str | None = None) -> None:
        self.messages: list[Received] = []
        sock = socket.create_connection(address, timeout=5)
        info = b""
        while not info.endswith(b"\n"):  # byte by byte: nothing read past INFO before TLS
            info += sock.recv(1)
        assert info.startswith(b"INFO "), info
        self._sock = tls.wrap_socket(sock, server_hostname=address[0]) if tls else sock
        self._file = self._sock.makefile("rb")
        connect: dict[str, object] = {"verbose": False, "pedantic": False, "headers": True}
        if user is not None:
            connect.update(user=user, **{"pass": password})
        self._sock.sendall(b"CONNECT " + json.dumps(connect).encode()
                           + f"\r\nSUB {subject} 1\r\nPING\r\n".encode())
        while not self._file.readline().startswith(b"PONG"):
            pass
        self._sock.settimeout(None)
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while not self._closed:
                line = self._file.readline()
                if not line:
                    return
                parts = line.decode().split()
                if parts[0] == "PING":
                    self._sock.sendall(b"PONG\r\n")
                elif parts[0] == "HMSG":
                    head_len, total = int(parts[-2]), int(parts[-1])
                    data = self._file.read(total + 2)
                    head = data[:head_len].decode().split("\r\n")[1:]
                    headers = dict(h.split(": ", 1) for h in head if h)
                    self.messages.append(Received(parts[1], headers, data[head_len:total]))
                elif parts[0] == "MSG":
                    size = int(parts[-1])
                    data = self._file.read(size + 2)
                    self.messages.append(Received(parts[1], {}, data[:size]))
        except (OSError, ValueError):
            return

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(5)  # the reader returns at the shutdown
        self._file.close()  # its reference to the socket too, or the socket stays open
        self._sock.close()
