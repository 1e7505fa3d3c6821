"""asyncio's TLS read buffer as the hub sizes it (hub/tlsread.py): a real TLS connection in
this process, a large body and then a small one."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import os
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from outpost.hub import tlsread
from outpost.hub.pki import create_ca, create_server_cert

pytestmark = [pytest.mark.anyio]


@pytest.fixture
def adaptive() -> Iterator[None]:
    cls: Any = asyncio.sslproto.SSLProtocol
    saved = cls.__dict__["max_size"], cls.__dict__["buffer_updated"]
    tlsread.install()
    try:
        yield
    finally:
        cls.max_size, cls.buffer_updated = saved
        del cls._outpost_buffer_updated


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # asyncio's own TLS protocol is what is sized


def _contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    create_ca("test CA", tmp_path / "ca.pem", tmp_path / "ca.key")
    create_server_cert(tmp_path / "ca.pem", tmp_path / "ca.key", [], tmp_path / "server.pem",
                       tmp_path / "server.key")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    return server, ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))


async def test_a_connection_reads_large_pieces_only_while_they_come(tmp_path: Path,
                                                                    adaptive: None) -> None:
    server_context, client_context = _contexts(tmp_path)
    pieces: list[int] = []
    transports: list[Any] = []
    arrived = asyncio.Event()

    class Sink(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            transports.append(transport)
            arrived.set()

        def data_received(self, data: bytes) -> None:
            pieces.append(len(data))
            arrived.set()

    async def received(total: int) -> None:
        while sum(pieces) < total or not transports:
            arrived.clear()
            await asyncio.wait_for(arrived.wait(), 10)

    server = await asyncio.get_running_loop().create_server(
        Sink, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context,
                                                  server_hostname="localhost")
        await received(0)
        protocol = transports[0]._ssl_protocol
        assert protocol.max_size == tlsread.SMALL  # a new connection: one record's room
        assert len(protocol._ssl_buffer) == tlsread.SMALL

        body = os.urandom(16 * 1024 * 1024)
        writer.write(body)
        await writer.drain()
        await received(len(body))
        # Read many records at a time once the reads filled the small buffer.
        assert max(pieces) > 4 * tlsread.SMALL, pieces[:20]
        assert len(pieces) < len(body) // tlsread.SMALL // 2, len(pieces)

        pieces.clear()
        writer.write(b"GET / HTTP/1.1\r\n\r\n")  # the next request: small again
        await writer.drain()
        await received(18)
        assert protocol.max_size == tlsread.SMALL
        assert len(protocol._ssl_buffer) == tlsread.SMALL
        writer.close()
        await writer.wait_closed()
    finally:
        for transport in transports:
            transport.close()
        server.close()
        await server.wait_closed()
