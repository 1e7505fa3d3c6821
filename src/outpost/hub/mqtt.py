"""A publisher of MQTT 5 (the part the hub's forwarding of upstream messages needs).

The forwarder (hub/messages.py) publishes each stored message with QoS 1 and moves its
cursor only once the broker acknowledged every one (PUBACK), so delivery is at least once,
in order, as it is to NATS. The message's properties and Outpost's own facts travel as MQTT
5 user properties; the body is the payload, byte for byte.

Only what publishing needs is here: CONNECT/CONNACK (with the broker's Receive Maximum,
which bounds the messages in flight, and its Maximum Packet Size), PUBLISH at QoS 1 and
PUBACK, PINGREQ/PINGRESP (the idle check), DISCONNECT. No library: the protocol is small,
and the hub gains no dependency (as for NATS).
"""

from __future__ import annotations

import asyncio
import re
import ssl
import struct
import time
import uuid
from typing import Any, Protocol
from urllib.parse import urlsplit

CONNECT, CONNACK, PUBLISH, PUBACK, PINGREQ, PINGRESP, DISCONNECT = 1, 2, 3, 4, 12, 13, 14
# The types of MQTT 5 properties, to read a CONNACK's and skip those it does not need.
_BYTE = {0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A}
_TWO = {0x13, 0x21, 0x22, 0x23}
_FOUR = {0x02, 0x11, 0x18, 0x27}
_TEXT = {0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F}
_BINARY = {0x09, 0x16}
USER_PROPERTY, RECEIVE_MAXIMUM, MAXIMUM_PACKET_SIZE, REASON_STRING = 0x26, 0x21, 0x27, 0x1F
_LEVEL = re.compile(r"[/+#\x00]")


class Access(Protocol):
    """What the forward settings give a connection (hub/config.py ``MessageForward``)."""

    username: str | None
    server_name: str | None

    def password(self) -> str | None: ...

    def tls_context(self) -> ssl.SSLContext: ...


class MqttError(Exception):
    """The broker refused something or closed the connection."""


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def text(value: str) -> bytes:
    data = value.encode()
    return struct.pack("!H", len(data)) + data


def packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([kind << 4 | flags]) + varint(len(body)) + body


def topic_for(template: str, machine: str, module: str, output: str) -> str:
    """The topic of one message: each name made a single topic level (no '/', and no
    wildcard)."""
    def level(value: str) -> str:
        return _LEVEL.sub("_", value) or "_"
    return template.format(machine=level(machine), module=level(module),
                           output=level(output))


def properties(data: bytes) -> dict[int, Any]:
    """The properties in ``data`` (their length already taken off); a user property's
    pairs as a list."""
    found: dict[int, Any] = {}
    at = 0
    while at < len(data):
        ident = data[at]
        at += 1
        if ident in _BYTE:
            found[ident], at = data[at], at + 1
        elif ident in _TWO:
            found[ident], at = struct.unpack_from("!H", data, at)[0], at + 2
        elif ident in _FOUR:
            found[ident], at = struct.unpack_from("!I", data, at)[0], at + 4
        elif ident == 0x0B:
            value, at = _read_varint(data, at)
            found[ident] = value
        elif ident in _TEXT or ident in _BINARY:
            size = struct.unpack_from("!H", data, at)[0]
            raw = data[at + 2:at + 2 + size]
            found[ident] = raw.decode(errors="replace") if ident in _TEXT else raw
            at += 2 + size
        elif ident == USER_PROPERTY:
            pair = []
            for _ in range(2):
                size = struct.unpack_from("!H", data, at)[0]
                pair.append(data[at + 2:at + 2 + size].decode(errors="replace"))
                at += 2 + size
            found.setdefault(ident, []).append((pair[0], pair[1]))
        else:
            raise MqttError(f"the broker sent an unknown property 0x{ident:02x}")
    return found


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
        if shift > 21:
            raise MqttError("a malformed length from the broker")


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    """(type, flags, body) of the next packet."""
    first = await reader.readexactly(1)
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift > 21:
            raise MqttError("a malformed length from the broker")
    body = await reader.readexactly(length) if length else b""
    return first[0] >> 4, first[0] & 0x0F, body


# Reason codes a refused CONNECT most often carries, and what to do about each.
_REFUSALS = {
    0x86: "bad user name or password: check messages.forward's username and password_file "
          "in hub.yaml",
    0x87: "not authorized: a wrong user name or password (some brokers say so with this "
          "code), or a user the broker does not let connect: check messages.forward's "
          "username and password_file in hub.yaml, and the broker's users",
    0x8C: "bad authentication method",
}


def _reason(body: bytes, at: int, what: str) -> str:
    code = body[at] if len(body) > at else 0
    said = ""
    if len(body) > at + 1:
        length, start = _read_varint(body, at + 1)
        said = properties(body[start:start + length]).get(REASON_STRING, "")
    known = _REFUSALS.get(code, "") if what == "the connection" else ""
    detail = "; ".join(x for x in (said, known) if x)
    return f"the broker refused {what} (reason 0x{code:02x}{': ' + detail if detail else ''})"


class MqttLink:
    """One connection to an MQTT 5 broker: publish at QoS 1, confirm by the PUBACKs."""

    TIMEOUT = 5.0

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 topic: str, receive_maximum: int, maximum_packet: int) -> None:
        self._reader = reader
        self._writer = writer
        self.topic = topic
        self.in_flight: set[int] = set()
        self.receive_maximum = max(1, receive_maximum)
        # What a payload may take of a packet, leaving room for the topic and properties.
        self.max_payload = maximum_packet
        self._next = 0
        self._pong = False

    @classmethod
    async def connect(cls, url: str, topic: str, timeout: float = TIMEOUT, *,
                      access: Access | None = None) -> MqttLink:
        """Connect (TLS from the first byte for mqtts://) and say CONNECT, with the user
        and the password (its file) of ``access`` when it names them."""
        parts = urlsplit(url)
        secure = parts.scheme == "mqtts"
        host, port = parts.hostname or "127.0.0.1", parts.port or (8883 if secure else 1883)
        context = access.tls_context() if secure and access is not None else (
            ssl.create_default_context() if secure else None)
        name = ((access.server_name if access is not None else None) or host) if secure \
            else None
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=context, server_hostname=name), timeout)
        try:
            client = f"outpost-hub-{uuid.uuid4().hex[:12]}"
            user = access.username if access is not None else None
            secret = access.password() if access is not None else None
            # Protocol MQTT level 5, clean start, keep-alive 60 s, no properties; the user
            # name and password flags when given.
            flags = 0x02 | (0x80 if user is not None else 0) | (0x40 if secret is not None
                                                                 else 0)
            head = text("MQTT") + bytes([5, flags]) + struct.pack("!H", 60) + varint(0)
            payload = text(client)
            if user is not None:
                payload += text(user)
            if secret is not None:
                payload += text(secret)  # binary data: the same two-byte length and bytes
            writer.write(packet(CONNECT, 0, head + payload))
            await asyncio.wait_for(writer.drain(), timeout)
            kind, _, body = await asyncio.wait_for(read_packet(reader), timeout)
            if kind != CONNACK or len(body) < 2:
                raise MqttError(f"{host}:{port} did not answer as an MQTT 5 broker")
            if body[1] != 0:
                raise MqttError(_reason(body, 1, "the connection"))
            found: dict[int, Any] = {}
            if len(body) > 2:
                length, start = _read_varint(body, 2)
                found = properties(body[start:start + length])
            return cls(reader, writer, topic, int(found.get(RECEIVE_MAXIMUM, 65535)),
                       int(found.get(MAXIMUM_PACKET_SIZE, 256 * 1024 * 1024)))
        except BaseException:
            writer.close()
            raise

    def name_for(self, machine: str, module: str, output: str) -> str:
        return topic_for(self.topic, machine, module, output)

    async def publish(self, topic: str, headers: list[tuple[str, str]],
                      payload: bytes) -> None:
        """Send at QoS 1; waits only while the broker's Receive Maximum is in flight."""
        while len(self.in_flight) >= self.receive_maximum:
            await self._take(self.TIMEOUT)
        self._next = self._next % 65535 + 1
        ident = self._next
        props = b"".join(bytes([USER_PROPERTY]) + text(k) + text(v) for k, v in headers)
        body = text(topic) + struct.pack("!H", ident) + varint(len(props)) + props + payload
        self._writer.write(packet(PUBLISH, 0x02, body))
        self.in_flight.add(ident)

    async def confirm(self, timeout: float = TIMEOUT) -> None:
        """Returns once the broker acknowledged every message sent; with none in flight,
        once it answers a PINGREQ (it is alive)."""
        await asyncio.wait_for(self._writer.drain(), timeout)
        deadline = time.monotonic() + timeout
        if not self.in_flight:
            self._pong = False
            self._writer.write(packet(PINGREQ, 0, b""))
            while not self._pong:
                await self._take(max(deadline - time.monotonic(), 0.01))
            return
        while self.in_flight:
            await self._take(max(deadline - time.monotonic(), 0.01))

    async def _take(self, timeout: float) -> None:
        try:
            kind, _, body = await asyncio.wait_for(read_packet(self._reader), timeout)
        except asyncio.IncompleteReadError:
            raise MqttError("the broker closed the connection") from None
        if kind == PUBACK:
            ident = struct.unpack_from("!H", body)[0]
            if len(body) > 2 and body[2] >= 0x80:
                raise MqttError(_reason(body, 2, f"message {ident}"))
            self.in_flight.discard(ident)
        elif kind == PINGRESP:
            self._pong = True
        elif kind == DISCONNECT:
            raise MqttError(_reason(body, 0, "the session") if body else
                            "the broker ended the session")

    async def close(self) -> None:
        try:
            self._writer.write(packet(DISCONNECT, 0, b""))
        except (OSError, RuntimeError):
            pass
        self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)
        except (OSError, TimeoutError):
            pass
