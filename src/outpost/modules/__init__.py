"""The Python client of the agent's local message hub, for modules (standard library only).

A module the agent starts finds the socket and its own name in ``OUTPOST_MODULE_SOCKET``
and ``OUTPOST_MODULE_NAME``::

    from outpost.modules import ModuleClient

    with ModuleClient() as client:
        client.method("reset", lambda payload: {"done": True})
        client.send("temperature", b'{"t": 31.5}', properties={"unit": "C"},
                    content_type="application/json")
        for message in client.messages():          # input messages, in order
            print(message.input, message.body)

``send`` returns once the agent took the message (routed to every input or stored for the
hub) and raises ``Refused`` with the agent's status and reason otherwise (413 too large,
404 no route, 507 store full).

Input messages come under flow control: the agent writes at most ``window`` of them (from
its ``welcome``) ahead of what this module's code took, so the client's queue holds at most
that many; the client tells the agent (``took``, a few at a time, and at once when its queue
runs dry) as ``receive()``, the iterator or an ``on_message`` callback takes them. A message
counts as taken when ``receive()`` returns it, when the iterator is asked for the next one
(the loop's body is done with it), or when the callback returns. Messages the agent wrote
but the code had not taken when the connection closes come again on the next one, in order
(at-least-once). So once the client is connected again it drops the copies it still holds
of the closed connection: the agent, running or restarted, has them (a restarted agent
reads its inboxes back from disk) and writes them again.

A reader thread takes what the agent sends; when the agent goes away (it restarts) the
client connects again with a doubling wait, and a ``send`` made meanwhile waits for it up to
its timeout. The exceptions: ``ClientError`` and under it
``Refused`` (the agent answered no), ``NotConnected`` (no agent within the timeout) and
``IdentityRefused`` (the agent says this process is not the module it claims: 404
``Module not found``; not retried).
"""

from __future__ import annotations

import itertools
import os
import queue
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from outpost.protocol import modwire

__all__ = ["Ack", "ClientError", "IdentityRefused", "Message", "ModuleClient", "NotConnected",
           "Refused"]


class ClientError(Exception):
    """The root of what the client raises."""


class Refused(ClientError):
    """The agent refused a send: ``status`` (413, 404, 507, ...) and ``reason``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class IdentityRefused(Refused):
    """This process does not belong to the module it claims (404 ``Module not found``)."""


class NotConnected(ClientError):
    """The agent could not be reached (or the connection closed) within the timeout."""


@dataclass(frozen=True)
class Ack:
    status: int
    routes: int = 1  # how many routes took the message; 0: their conditions filtered it


@dataclass(frozen=True)
class Message:
    """A message delivered to one of this module's inputs."""

    input: str
    body: bytes
    module: str = ""
    output: str = ""
    properties: dict[str, Any] = field(default_factory=dict)
    content_type: str | None = None
    message_id: str | None = None
    correlation_id: str | None = None
    created_at: float = 0.0


Method = Callable[[Any], Any]


class ModuleClient:
    def __init__(self, socket_path: str | None = None, name: str | None = None, *,
                 backoff_base: float = 0.05, backoff_cap: float = 5.0,
                 window: int | None = None) -> None:
        path = socket_path or os.environ.get(modwire.ENV_SOCKET)
        name = name or os.environ.get(modwire.ENV_NAME)
        if not path or not name:
            raise ClientError(f"no socket or module name: the agent sets {modwire.ENV_SOCKET} "
                              f"and {modwire.ENV_NAME} for the modules it starts")
        self.path, self.name = path, name
        self.max_message_kb = 0
        self.asked_window = window  # None: the agent's (64, or 8 in constrained mode)
        self.window = 0             # what the agent's welcome granted
        self._generation = 0        # one per connection: a message's credit goes to its own
        self._untold = 0            # taken, not yet told to the agent (took)
        self._credit_lock = threading.Lock()
        self._backoff = (backoff_base, backoff_cap)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()          # one writer at a time
        self._pending: dict[int, tuple[threading.Event, list[Any]]] = {}
        self._inbox: queue.Queue[tuple[int, Message] | None] = queue.Queue()
        self._methods: dict[str, Method] = {}
        self._on_message: Callable[[Message], None] | None = None
        self._sock: socket.socket | None = None
        self._connected = threading.Event()
        self._closed = False
        self._refused: IdentityRefused | None = None
        self._connect()  # the first connection is made now: a wrong identity raises here
        self._reader = threading.Thread(target=self._read_loop, name="outpost-module-reader",
                                        daemon=True)
        self._reader.start()

    # --- the public API ------------------------------------------------------------------
    def send(self, output: str, body: bytes | str = b"", *,
             properties: dict[str, Any] | None = None, content_type: str | None = None,
             message_id: str | None = None, correlation_id: str | None = None,
             timeout: float = 30.0) -> Ack:
        """Send ``body`` on ``output``; the Ack once the agent took it, or ``Refused``."""
        data = body.encode() if isinstance(body, str) else bytes(body)
        header: dict[str, Any] = {
            "op": modwire.SEND, "output": output, "properties": properties or {},
            "content_type": content_type, "message_id": message_id,
            "correlation_id": correlation_id}
        deadline = time.monotonic() + timeout
        event = threading.Event()
        slot: list[Any] = []
        ident = next(self._ids)
        header["id"] = ident
        self._pending[ident] = (event, slot)
        try:
            self._write(modwire.encode(header, data), deadline)
            if not event.wait(max(0.0, deadline - time.monotonic())):
                raise NotConnected(f"no answer from the agent within {timeout} s")
        finally:
            self._pending.pop(ident, None)
        answer = slot[0]
        if answer is None:
            raise NotConnected("the connection to the agent closed before it answered")
        if answer.get("status") != modwire.OK:
            raise Refused(int(answer.get("status", 0)), str(answer.get("reason", "")))
        return Ack(modwire.OK, int(answer.get("routes", 1)))

    def receive(self, timeout: float | None = None) -> Message | None:
        """The next input message, or None after ``timeout`` (or once closed). The message
        counts as taken (told to the agent) when it is returned."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if not self._inbox.qsize():
                self._tell()  # about to wait: let the agent write more
            try:
                entry = self._inbox.get(timeout=None if deadline is None else max(
                    0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if entry is None:
                self._inbox.put(None)  # closed: every later receive says so too
                return None
            if not self._stale(entry[0]):
                break
        generation, message = entry
        self._taken(generation)
        if not self._inbox.qsize():
            self._tell()  # all taken: the agent may write more at once
        return message

    def messages(self) -> Iterator[Message]:
        """Every input message, in order, until the client is closed. Each counts as taken
        when the next one is asked for (or the loop ends)."""
        taken: int | None = None
        try:
            while True:
                if taken is not None:
                    self._taken(taken)
                    taken = None
                if not self._inbox.qsize():
                    self._tell()
                entry = self._inbox.get()
                if entry is None:
                    self._inbox.put(None)
                    return
                if self._stale(entry[0]):
                    continue
                taken, message = entry
                yield message
        finally:
            if taken is not None:
                self._taken(taken)
                self._tell()

    def pending(self) -> int:
        """How many input messages wait in the client's queue (at most ``window``)."""
        return self._inbox.qsize()

    def on_message(self, callback: Callable[[Message], None]) -> None:
        """Hand input messages to ``callback`` (on the reader thread) instead of the
        iterator."""
        self._on_message = callback

    def method(self, name: str, handler: Method) -> None:
        """Answer direct calls of ``name``: ``handler(payload)`` returns the answer (status
        200), or a (status, answer) pair; an exception answers 500 with its text."""
        self._methods[name] = handler

    def close(self) -> None:
        self._closed = True
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self._inbox.put(None)

    # --- flow control -----------------------------------------------------------------------
    def _stale(self, generation: int) -> bool:
        """A copy from a connection that closed, now that another one is open: the agent
        writes it again on the new one."""
        return generation != self._generation and self._connected.is_set()

    def _taken(self, generation: int) -> None:
        """The module's code took a message of connection ``generation``: tell the agent
        once a batch is gathered."""
        with self._credit_lock:
            if generation != self._generation:
                # Of a connection that closed: the agent writes it again (at-least-once).
                return
            self._untold += 1
            if self._untold < modwire.credit_batch(self.window):
                return
        self._tell()

    def _tell(self) -> None:
        """Send the gathered credit (``took``) on the current connection; a connection that
        fails here is the reader's to notice."""
        with self._credit_lock:
            count, sock = self._untold, self._sock
            if not count or sock is None:
                return
            self._untold = 0
            frame = modwire.encode({"op": modwire.TOOK, "count": count})
            try:
                with self._lock:
                    sock.sendall(frame)
            except OSError:
                pass

    def __enter__(self) -> ModuleClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the connection ------------------------------------------------------------------
    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        hello: dict[str, Any] = {"op": modwire.HELLO, "module": self.name}
        if self.asked_window:
            hello["window"] = self.asked_window
        try:
            sock.connect(self.path)
            sock.sendall(modwire.encode(hello))
            header, _ = modwire.read_frame(sock)
        except BaseException:
            sock.close()
            raise
        if header.get("op") != modwire.WELCOME:
            sock.close()
            status, reason = int(header.get("status", 0)), str(header.get("reason", ""))
            if status == modwire.NOT_FOUND:
                self._refused = IdentityRefused(status, reason)
                raise self._refused
            raise Refused(status, reason)
        self.max_message_kb = int(header.get("max_message_kb", 0))
        with self._credit_lock:
            self.window = int(header.get("window", 0)) or 64
            self._generation += 1
            self._untold = 0
            self._sock = sock
        self._connected.set()

    def _reconnect(self) -> bool:
        wait, cap = self._backoff
        while not self._closed:
            try:
                self._connect()
                return True
            except IdentityRefused:
                return False
            except (OSError, EOFError, modwire.FrameError, Refused):
                time.sleep(wait)
                wait = min(wait * 2, cap)
        return False

    def _write(self, frame: bytes, deadline: float) -> None:
        while True:
            if self._refused is not None:
                raise self._refused
            if self._closed:
                raise NotConnected("the client is closed")
            if not self._connected.wait(max(0.0, deadline - time.monotonic())):
                raise NotConnected("the agent's message hub cannot be reached")
            sock = self._sock
            try:
                with self._lock:
                    assert sock is not None
                    sock.sendall(frame)
                return
            except OSError:
                self._connected.clear()  # the reader connects again
                if time.monotonic() >= deadline:
                    raise NotConnected("the agent's message hub cannot be reached") from None
                time.sleep(0.01)

    def _read_loop(self) -> None:
        while not self._closed:
            sock = self._sock
            try:
                assert sock is not None
                header, body = modwire.read_frame(sock)
            except (OSError, EOFError, modwire.FrameError):
                self._connected.clear()
                for event, slot in list(self._pending.values()):
                    slot.append(None)
                    event.set()
                if self._closed or not self._reconnect():
                    self._inbox.put(None)
                    return
                continue
            self._take(header, body)

    def _take(self, header: dict[str, Any], body: bytes) -> None:
        op = header.get("op")
        if op == modwire.ACK:
            waiting = self._pending.get(header.get("id", -1))
            if waiting is not None:
                waiting[1].append(header)
                waiting[0].set()
        elif op == modwire.MESSAGE:
            message = Message(
                input=str(header.get("input", "")), body=body,
                module=str(header.get("module", "")), output=str(header.get("output", "")),
                properties=header.get("properties") or {},
                content_type=header.get("content_type"),
                message_id=header.get("message_id"),
                correlation_id=header.get("correlation_id"),
                created_at=float(header.get("created_at", 0.0)))
            generation = self._generation
            if self._on_message is None:
                self._inbox.put((generation, message))
                return
            try:
                self._on_message(message)
            finally:
                self._taken(generation)
                if self._sock is not None and not _readable(self._sock):
                    self._tell()  # nothing more has come: let the agent write more
        elif op == modwire.CALL:
            threading.Thread(target=self._answer, args=(header, body), daemon=True).start()

    def _answer(self, header: dict[str, Any], body: bytes) -> None:
        import json

        handler = self._methods.get(str(header.get("method")))
        status, answer = 200, None
        if handler is None:
            status, answer = 501, {"error": f"this module has no method "
                                            f"'{header.get('method')}'"}
        else:
            try:
                result = handler(json.loads(body) if body else None)
                if isinstance(result, tuple) and len(result) == 2 and isinstance(
                        result[0], int):
                    status, answer = result
                else:
                    answer = result
            except Exception as exc:  # the module's bug: answered, not raised in the reader
                status, answer = 500, {"error": f"{type(exc).__name__}: {exc}"}
        frame = modwire.encode({"op": modwire.REPLY, "id": header.get("id"), "status": status},
                               json.dumps(answer).encode())
        try:
            self._write(frame, time.monotonic() + 5)
        except ClientError:
            pass  # the agent went away: its caller times out


def _readable(sock: socket.socket) -> bool:
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return False
