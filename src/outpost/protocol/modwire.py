"""The wire between a module and the agent's local message hub (standard library only).

A module written in any language speaks it over the Unix socket whose path the agent gives
in ``OUTPOST_MODULE_SOCKET`` (docs/messages.md describes it for implementers). Each frame
is::

    u32 header_length   (big-endian)
    u32 body_length     (big-endian)
    header              header_length bytes of UTF-8 JSON: an object with "op"
    body                body_length raw bytes (the message; empty for most operations)

Operations (``op``), module -> agent: ``hello`` (``module``: the name it claims, once,
first), ``send`` (``id``, ``output``, ``properties``, ``content_type``, ``message_id``,
``correlation_id``; the body), ``reply`` (``id`` of a call, ``status``; the body is the
JSON answer), ``took`` (``count``: how many more delivered messages the module's code has
taken; the credit of the flow control below). Agent -> module: ``welcome`` (``module``,
``max_message_kb``, ``window``), ``ack`` (``id``
of a send, ``status`` 200, or a refusal with ``reason``), ``message`` (delivered to
``input``: ``module`` and ``output`` that sent it, the same fields as a send,
``created_at``; the body), ``call`` (``id``, ``method``; the body is the JSON payload) and
``error`` (``status``, ``reason``: the connection is closed after it).

Flow control: the agent has at most ``window`` messages written to a connection and not yet
taken (a ``hello`` may ask for a smaller ``window``); each ``took`` lets it write that many
more. What is not taken when the connection closes is delivered again to the next one
(at-least-once to a module's code).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import Any

ENV_SOCKET = "OUTPOST_MODULE_SOCKET"
ENV_NAME = "OUTPOST_MODULE_NAME"

PREFIX = struct.Struct(">II")
MAX_HEADER = 64 * 1024
MAX_BODY = 16 * 1024 * 1024 + 1  # the largest max_message_kb, and one byte to tell it

# Operations.
HELLO, WELCOME, SEND, ACK, MESSAGE, CALL, REPLY, ERROR, TOOK = (
    "hello", "welcome", "send", "ack", "message", "call", "reply", "error", "took")


def credit_batch(window: int) -> int:
    """How many taken messages a client gathers into one ``took`` (a quarter of the window):
    a frame per few messages, and the agent still has three quarters of it to write ahead."""
    return max(1, window // 4)

# Statuses of an ack (as HTTP's), and of an error before the connection closes.
OK = 200
BAD_FRAME = 400
NOT_FOUND = 404       # "Module not found" (the identity rule), or no route takes the output
TOO_LARGE = 413
STORE_FULL = 507
MODULE_NOT_FOUND = "Module not found"


class FrameError(ValueError):
    """A frame that does not follow the wire format (the connection cannot go on)."""


def encode(header: dict[str, Any], body: bytes = b"") -> bytes:
    """One frame: the prefix, the JSON header and the body."""
    head = json.dumps(header, separators=(",", ":")).encode()
    if len(head) > MAX_HEADER:
        raise FrameError(f"a frame's header is at most {MAX_HEADER} bytes, not {len(head)}")
    return PREFIX.pack(len(head), len(body)) + head + body


def decode_header(data: bytes) -> dict[str, Any]:
    try:
        header = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise FrameError("a frame's header is not JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise FrameError('a frame\'s header is a JSON object with "op"')
    return header


def check_prefix(header_length: int, body_length: int, max_body: int = MAX_BODY) -> None:
    if header_length > MAX_HEADER:
        raise FrameError(f"a frame's header is at most {MAX_HEADER} bytes, "
                         f"not {header_length}")
    if body_length > max_body:
        raise FrameError(f"a frame's body is at most {max_body} bytes, not {body_length}")


# --- reading: blocking sockets (the client) ---------------------------------------------
def _exactly(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise EOFError("the connection closed")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    """The next frame of a blocking socket; EOFError when it closes, FrameError when what
    comes is not a frame."""
    header_length, body_length = PREFIX.unpack(_exactly(sock, PREFIX.size))
    check_prefix(header_length, body_length)
    header = decode_header(_exactly(sock, header_length))
    return header, _exactly(sock, body_length) if body_length else b""


# --- reading: asyncio streams (the agent) -------------------------------------------------
async def read_prefix(reader: asyncio.StreamReader) -> tuple[int, int]:
    """The next frame's lengths; asyncio.IncompleteReadError at the end of the stream."""
    header_length, body_length = PREFIX.unpack(await reader.readexactly(PREFIX.size))
    return header_length, body_length


async def read_header(reader: asyncio.StreamReader, length: int) -> dict[str, Any]:
    check_prefix(length, 0)
    return decode_header(await reader.readexactly(length))


async def skip(reader: asyncio.StreamReader, length: int) -> None:
    """Read and forget ``length`` bytes (a body that is refused), a chunk at a time."""
    while length:
        chunk = await reader.read(min(length, 64 * 1024))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", length)
        length -= len(chunk)
