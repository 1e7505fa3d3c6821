"""A NATS subscriber over a plain socket, for tests and benchmarks: what the hub published to
the real NATS server, with headers and the time each arrived."""

from __future__ import annotations

import json
import socket
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

    def __init__(self, subject: str, address: tuple[str, int] = NATS) -> None:
        self.messages: list[Received] = []
        self._sock = socket.create_connection(address, timeout=5)
        self._file = self._sock.makefile("rb")
        info = self._file.readline()
        assert info.startswith(b"INFO "), info
        self._sock.sendall(b"CONNECT " + json.dumps(
            {"verbose": False, "pedantic": False, "headers": True}).encode()
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
        self._thread.join(2)  # its readline ends at the shutdown
        self._file.close()  # the socket's descriptor stays open while its file is
        self._sock.close()
