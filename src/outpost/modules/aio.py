"""The asyncio client of the local message hub (standard library only)::

    from outpost.modules.aio import AsyncModuleClient

    async with await AsyncModuleClient.connect() as client:
        client.method("reset", reset)          # a function or a coroutine function
        await client.send("temperature", b"31.5", properties={"unit": "C"})
        async for message in client.messages():
            ...

The same behaviour as ``ModuleClient`` (its exceptions and ``Message``): ``send`` returns
once the agent took the message or raises ``Refused``; the client connects again with a
doubling wait when the agent goes away. Flow control as there too: the agent writes at
most ``window`` messages ahead; each counts as taken when the iterator is asked for the next
one (the loop's body is done with it), and the client tells the agent (``took``) a few at a
time, at once when its queue runs dry.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import os
from collections.abc import AsyncIterator
from typing import Any

from outpost.protocol import modwire

from . import Ack, ClientError, IdentityRefused, Message, Method, NotConnected, Refused


class AsyncModuleClient:
    def __init__(self, path: str, name: str, backoff: tuple[float, float],
                 window: int | None = None) -> None:
        self.path, self.name = path, name
        self.asked_window = window
        self.window = 0
        self._generation = 0
        self._untold = 0
        self._backoff = backoff
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any] | None]] = {}
        self._inbox: asyncio.Queue[tuple[int, Message] | None] = asyncio.Queue()
        self._methods: dict[str, Method] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._connected = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._calls: set[asyncio.Task[None]] = set()

    @classmethod
    async def connect(cls, socket_path: str | None = None, name: str | None = None, *,
                      backoff_base: float = 0.05, backoff_cap: float = 5.0,
                      window: int | None = None) -> AsyncModuleClient:
        path = socket_path or os.environ.get(modwire.ENV_SOCKET)
        name = name or os.environ.get(modwire.ENV_NAME)
        if not path or not name:
            raise ClientError(f"no socket or module name: the agent sets {modwire.ENV_SOCKET} "
                              f"and {modwire.ENV_NAME} for the modules it starts")
        client = cls(path, name, (backoff_base, backoff_cap), window)
        reader = await client._connect()
        client._task = asyncio.get_running_loop().create_task(client._read_loop(reader))
        return client

    async def send(self, output: str, body: bytes | str = b"", *,
                   properties: dict[str, Any] | None = None, content_type: str | None = None,
                   message_id: str | None = None, correlation_id: str | None = None,
                   timeout: float = 30.0) -> Ack:
        data = body.encode() if isinstance(body, str) else bytes(body)
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any] | None] = (
            asyncio.get_running_loop().create_future())
        self._pending[ident] = future
        try:
            async with asyncio.timeout(timeout):
                await self._write(modwire.encode(
                    {"op": modwire.SEND, "id": ident, "output": output,
                     "properties": properties or {}, "content_type": content_type,
                     "message_id": message_id, "correlation_id": correlation_id}, data))
                answer = await future
        except TimeoutError:
            raise NotConnected(f"no answer from the agent within {timeout} s") from None
        finally:
            self._pending.pop(ident, None)
        if answer is None:
            raise NotConnected("the connection to the agent closed before it answered")
        if answer.get("status") != modwire.OK:
            raise Refused(int(answer.get("status", 0)), str(answer.get("reason", "")))
        return Ack(modwire.OK, int(answer.get("routes", 1)))

    async def messages(self) -> AsyncIterator[Message]:
        """Every input message, in order; each counts as taken when the next is asked for
        (or the loop ends)."""
        taken: int | None = None
        try:
            while True:
                if taken is not None:
                    self._taken(taken)
                    taken = None
                if self._inbox.empty():
                    self._tell()  # about to wait: let the agent write more
                entry = await self._inbox.get()
                if entry is None:
                    self._inbox.put_nowait(None)
                    return
                if entry[0] != self._generation and self._connected.is_set():
                    continue  # of a closed connection: the agent writes it again
                taken, message = entry
                yield message
        finally:
            if taken is not None:
                self._taken(taken)
                self._tell()

    def pending(self) -> int:
        """How many input messages wait in the client's queue (at most ``window``)."""
        return self._inbox.qsize()

    def _taken(self, generation: int) -> None:
        if generation != self._generation:
            return
        self._untold += 1
        if self._untold >= modwire.credit_batch(self.window):
            self._tell()

    def _tell(self) -> None:
        """Send the gathered credit (``took``); the transport buffers this small frame, and
        a connection that fails is the reader's to notice."""
        writer = self._writer
        if not self._untold or writer is None or writer.is_closing():
            return
        count, self._untold = self._untold, 0
        writer.write(modwire.encode({"op": modwire.TOOK, "count": count}))

    def method(self, name: str, handler: Method) -> None:
        self._methods[name] = handler

    async def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            self._writer.close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._inbox.put_nowait(None)

    async def __aenter__(self) -> AsyncModuleClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- the connection ------------------------------------------------------------------
    async def _connect(self) -> asyncio.StreamReader:
        reader, writer = await asyncio.open_unix_connection(self.path)
        hello: dict[str, Any] = {"op": modwire.HELLO, "module": self.name}
        if self.asked_window:
            hello["window"] = self.asked_window
        try:
            writer.write(modwire.encode(hello))
            await writer.drain()
            header = await _frame(reader)
        except BaseException:
            writer.close()
            raise
        if header[0].get("op") != modwire.WELCOME:
            writer.close()
            status, reason = int(header[0].get("status", 0)), str(header[0].get("reason", ""))
            raise (IdentityRefused if status == modwire.NOT_FOUND else Refused)(status, reason)
        self.window = int(header[0].get("window", 0)) or 64
        self._generation += 1
        self._untold = 0
        self._writer = writer
        self._connected.set()
        return reader

    async def _write(self, frame: bytes) -> None:
        while True:
            await self._connected.wait()
            writer = self._writer
            try:
                assert writer is not None
                writer.write(frame)
                await writer.drain()
                return
            except (ConnectionError, RuntimeError):
                self._connected.clear()
                await asyncio.sleep(0.01)

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        while not self._closed:
            try:
                header, body = await _frame(reader)
            except (OSError, EOFError, asyncio.IncompleteReadError, modwire.FrameError):
                self._connected.clear()
                for future in self._pending.values():
                    if not future.done():
                        future.set_result(None)
                wait, cap = self._backoff
                while not self._closed:
                    try:
                        reader = await self._connect()
                        break
                    except IdentityRefused:
                        self._inbox.put_nowait(None)
                        return
                    except (OSError, EOFError, asyncio.IncompleteReadError,
                            modwire.FrameError, Refused):
                        await asyncio.sleep(wait)
                        wait = min(wait * 2, cap)
                continue
            op = header.get("op")
            if op == modwire.ACK:
                waiting = self._pending.get(header.get("id", -1))
                if waiting is not None and not waiting.done():
                    waiting.set_result(header)
            elif op == modwire.MESSAGE:
                self._inbox.put_nowait((self._generation, Message(
                    input=str(header.get("input", "")), body=body,
                    module=str(header.get("module", "")),
                    output=str(header.get("output", "")),
                    properties=header.get("properties") or {},
                    content_type=header.get("content_type"),
                    message_id=header.get("message_id"),
                    correlation_id=header.get("correlation_id"),
                    created_at=float(header.get("created_at", 0.0)))))
            elif op == modwire.CALL:
                task = asyncio.get_running_loop().create_task(self._answer(header, body))
                self._calls.add(task)
                task.add_done_callback(self._calls.discard)

    async def _answer(self, header: dict[str, Any], body: bytes) -> None:
        handler = self._methods.get(str(header.get("method")))
        status, answer = 200, None
        if handler is None:
            status, answer = 501, {"error": f"this module has no method "
                                            f"'{header.get('method')}'"}
        else:
            try:
                result = handler(json.loads(body) if body else None)
                if inspect.isawaitable(result):
                    result = await result
                if isinstance(result, tuple) and len(result) == 2 and isinstance(
                        result[0], int):
                    status, answer = result
                else:
                    answer = result
            except Exception as exc:  # the module's bug: answered, not raised
                status, answer = 500, {"error": f"{type(exc).__name__}: {exc}"}
        await self._write(modwire.encode({"op": modwire.REPLY, "id": header.get("id"),
                                          "status": status}, json.dumps(answer).encode()))


async def _frame(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes]:
    header_length, body_length = await modwire.read_prefix(reader)
    modwire.check_prefix(header_length, body_length)
    header = await modwire.read_header(reader, header_length)
    body = await reader.readexactly(body_length) if body_length else b""
    return header, body
