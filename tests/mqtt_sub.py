"""An MQTT 5 subscriber over a plain socket, for tests: what the hub published to the real
Mosquitto broker on 127.0.0.1:1883, with its user properties. It reads the packets with the
hub's own helpers (hub/mqtt.py) but subscribes, which the hub never does."""

from __future__ import annotations

import asyncio
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field

from outpost.hub import mqtt

BROKER = ("127.0.0.1", 1883)
SUBSCRIBE, SUBACK, PUBLISH = 8, 9, 3


@dataclass
class Received:
    topic: str
    properties: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.time)


class Subscriber:
    """Subscribes to ``topic`` (wildcards allowed) at QoS 0 and collects every message."""

    def __init__(self, topic: str, address: tuple[str, int] = BROKER) -> None:
        self.messages: list[Received] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(topic, address), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError("the MQTT subscriber did not connect in 10 s")
        if self._error is not None:
            raise self._error

    def _run(self, topic: str, address: tuple[str, int]) -> None:
        self._loop.run_until_complete(self._main(topic, address))

    async def _main(self, topic: str, address: tuple[str, int]) -> None:
        try:
            reader, writer = await asyncio.open_connection(*address)
            head = mqtt.text("MQTT") + bytes([5, 0x02]) + struct.pack("!H", 60) + mqtt.varint(0)
            writer.write(mqtt.packet(mqtt.CONNECT, 0, head + mqtt.text(
                f"outpost-test-{uuid.uuid4().hex[:8]}")))
            kind, _, body = await mqtt.read_packet(reader)
            assert kind == mqtt.CONNACK and body[1] == 0, body
            writer.write(mqtt.packet(SUBSCRIBE, 0x02, struct.pack("!H", 1) + mqtt.varint(0)
                                     + mqtt.text(topic) + bytes([0])))
            kind, _, body = await mqtt.read_packet(reader)
            assert kind == SUBACK and body[-1] == 0, body
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._writer = writer
        try:
            while True:
                kind, _, body = await mqtt.read_packet(reader)
                if kind != PUBLISH:
                    continue
                size = struct.unpack_from("!H", body)[0]
                name = body[2:2 + size].decode()
                length, start = mqtt._read_varint(body, 2 + size)  # QoS 0: no packet id
                props = mqtt.properties(body[start:start + length])
                self.messages.append(Received(name, dict(props.get(mqtt.USER_PROPERTY, [])),
                                              body[start + length:]))
        except (asyncio.IncompleteReadError, OSError, asyncio.CancelledError):
            return

    def close(self) -> None:
        def stop() -> None:
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            if hasattr(self, "_writer"):
                self._writer.close()
        self._loop.call_soon_threadsafe(stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()  # its self-pipe sockets too
