"""A plain TCP proxy on loopback for tests, between the hub and its PostgreSQL server, that
can make a real database outage: ``cut()`` resets every open connection (an RST to both
sides) and closes the listening socket, so a new connection is refused; ``restore()`` listens
on the same port again."""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


def _reset(sock: socket.socket) -> None:
    """Close with an RST rather than a FIN: the peer sees 'connection reset'."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class TcpProxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.generation = 0  # moved on by cut(): pumps of an older one reset their sockets
        self.accepted = 0
        self._listener: socket.socket | None = None
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._listen()

    def _listen(self) -> None:
        deadline = time.monotonic() + 5
        while True:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", self.port))
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        sock.listen(64)
        self.port = sock.getsockname()[1]
        self._listener = sock
        thread = threading.Thread(target=self._accept, args=(sock,), daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self, listener: socket.socket) -> None:
        generation = self.generation
        try:
            while not self._stopping and generation == self.generation:
                ready, _, _ = select.select([listener], [], [], 0.05)
                if not ready:
                    continue
                client, _ = listener.accept()
                if generation != self.generation:
                    _reset(client)
                    return
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                except OSError:
                    _reset(client)
                    continue
                self.accepted += 1
                thread = threading.Thread(target=self._pump,
                                          args=(client, upstream, generation), daemon=True)
                thread.start()
                self._threads.append(thread)
        finally:
            listener.close()  # refused from now on

    def _pump(self, client: socket.socket, upstream: socket.socket, generation: int) -> None:
        pair = [client, upstream]
        try:
            while not self._stopping and generation == self.generation:
                ready, _, _ = select.select(pair, [], [], 0.05)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (upstream if sock is client else client).sendall(data)
        except OSError:
            return
        finally:
            _reset(client)
            _reset(upstream)

    def cut(self) -> None:
        """Reset every open connection and refuse new ones until ``restore()``."""
        self.generation += 1
        for thread in list(self._threads):
            thread.join(2)
        self._threads = []

    def restore(self) -> None:
        self._listen()

    @contextmanager
    def outage(self) -> Iterator[None]:
        self.cut()
        try:
            yield
        finally:
            self.restore()

    def close(self) -> None:
        self._stopping = True
        self.generation += 1
        for thread in list(self._threads):
            thread.join(2)


@contextmanager
def tcp_proxy(target: tuple[str, int]) -> Iterator[TcpProxy]:
    proxy = TcpProxy(target)
    try:
        yield proxy
    finally:
        proxy.close()
