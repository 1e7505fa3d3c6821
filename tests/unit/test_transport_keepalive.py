"""The agent keeps its connection to the hub between heartbeats: a request that follows an
idle stretch longer than httpx's default (5 s) reuses the connection rather than opening a
new one (a TLS handshake on both sides, for every heartbeat of every agent)."""

from __future__ import annotations

import asyncio

import pytest

from outpost.agent.transport import KEEPALIVE_SECONDS, HubClient

pytestmark = [pytest.mark.anyio]


async def test_a_request_after_six_idle_seconds_reuses_the_connection() -> None:
    accepted = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.decode().split("\r\n"):
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                await reader.readexactly(length)
                body = b'{"ok": true}'
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = HubClient([f"http://127.0.0.1:{port}"], None)
    try:
        assert KEEPALIVE_SECONDS > 30, "shorter than the default heartbeat interval"
        await client.request("GET", "/one")
        await asyncio.sleep(6.0)
        await client.request("GET", "/two")
        assert accepted == 1, f"{accepted} connections for two requests 6 s apart"
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()
