"""asyncio's TLS read buffer, sized for each connection by what it carries.

asyncio's TLS protocol reads the socket into one buffer per connection (256 KiB by
default, zero-filled and so resident). An idle agent's connection never needs more than one
TLS record (16 KiB) at a time, and 10,000 of them at 256 KiB each would hold 2.8 GiB
(bench/fleet.py --tls-memory), so every connection starts with 16 KiB. A connection that
carries a large body (a restic pack of 16 MiB to the backup store) then pays for each
16 KiB: one read of the socket, and one pass of the HTTP parser, the server's body queue
and the route's loop, which cost the hub more CPU than decrypting and writing the bytes
(docs/backup.md, "Performance").

So a connection's buffer grows while reads fill it (16 KiB, 64 KiB, 256 KiB) and goes back
to 16 KiB at the first read that leaves it mostly empty (a request's end: the next
request's headers, an idle connection's nothing): only connections in the middle of a
large body hold a large buffer.

This is asyncio's own TLS protocol: the hub installs it only when it runs on asyncio's loop.
uvloop's TLS reads into a 256 KiB buffer it allocates without filling, so an idle
connection holds only the pages its reads touched (docs/architecture.md, "The event loop").
"""

from __future__ import annotations

import asyncio.sslproto
from typing import Any

SMALL = 16 * 1024
LARGE = 256 * 1024
GROWTH = 4


def install(small: int = SMALL, large: int = LARGE) -> None:
    """Make every asyncio TLS connection of this process start with ``small`` bytes of
    read buffer, growing up to ``large`` while reads fill it."""
    cls: Any = asyncio.sslproto.SSLProtocol
    if not hasattr(cls, "max_size") or not hasattr(cls, "buffer_updated"):
        return  # another asyncio: its own buffers
    cls.max_size = small  # the class's: what a new connection starts with
    if getattr(cls, "_outpost_buffer_updated", None) is not None:
        return
    original = cls.buffer_updated

    def buffer_updated(self: Any, nbytes: int) -> None:
        size = self.max_size
        original(self, nbytes)
        if nbytes >= size:
            if size < large:
                self.max_size = min(size * GROWTH, large)  # get_buffer() allocates it
        elif size > small and nbytes < small:
            self.max_size = small
            self._ssl_buffer = bytearray(small)
            self._ssl_buffer_view = memoryview(self._ssl_buffer)

    cls._outpost_buffer_updated = original
    cls.buffer_updated = buffer_updated
