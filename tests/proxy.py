"""A small HTTP CONNECT proxy on loopback for tests: tunnels without intercepting TLS, and
can lose the server's answers on the way (``swallow``)."""

from __future__ import annotations

import select
import socket
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class _Handler(socketserver.BaseRequestHandler):
    server: _Proxy

    def handle(self) -> None:
        client = self.request
        client.settimeout(10)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk:
                return
            head += chunk
        line = head.split(b"\r\n", 1)[0].decode()
        method, target, _ = line.split(" ", 2)
        if method != "CONNECT" or self.server.refuse:
            # Recorded before the answer: the client may act on the 403 at once.
            self.server.refused.append(target)
            client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        host, port = target.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)), timeout=10)
        self.server.tunnels.append(target)
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        client.settimeout(None)
        pair = [client, upstream]
        try:
            while not self.server.stopping:
                ready, _, _ = select.select(pair, [], [], 0.2)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is upstream and self.server.swallow:
                        # An answer lost on the way: the server sent it, the client never
                        # gets it, and the connection breaks.
                        self.server.swallowed += 1
                        return
                    (upstream if sock is client else client).sendall(data)
        except OSError:
            return
        finally:
            upstream.close()


class _Proxy(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, refuse: bool) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.refuse = refuse
        self.stopping = False
        self.tunnels: list[str] = []
        self.refused: list[str] = []
        self.swallow = False  # drop what the server sends, then break the tunnel
        self.swallowed = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextmanager
def connect_proxy(refuse: bool = False) -> Iterator[_Proxy]:
    proxy = _Proxy(refuse)
    thread = threading.Thread(target=proxy.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.stopping = True
        proxy.shutdown()
        proxy.server_close()
        thread.join(5)
