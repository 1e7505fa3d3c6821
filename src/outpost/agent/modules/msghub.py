"""The local message hub: the Unix socket where modules send and receive messages.

The socket is ``<state>-messages/hub.sock`` (``socket_path``): the state directory is the
agent's alone (0700) while modules run as ``outpost-mod``, so it lives in a directory beside
it (0711, made as the extensions' tree is: extensions/runtime.py ``beside_state``), with mode
0666 (an agent that is not root runs modules as itself: ``<state>/messages/hub.sock``).
Who may talk is decided per connection: the kernel's peer credentials (SO_PEERCRED)
give the connecting process's pid, and the module it claims in its ``hello`` must be
``identify(pid)`` (the supervisor's: the module's process or a descendant); otherwise it is
answered 404 ``Module not found``, logged with the pid and the name, counted
(``rejected_identity``) and closed (ED-9).

Each ``send`` is matched against every route of the deployment (``configure``); each route
that takes it delivers it to its sink: a module's input (a bounded queue in memory per
module, ordered by the route's priority then by arrival, each message with the route's time
to live, and written to the module's store on disk before the ack, inbox_store.py, so it
outlives a kill of the agent; delivered in order while the module is connected, at most
``window`` at a time not yet taken by the module's code: see below) or ``$upstream`` (the
store on disk, upstream.py; one copy however many upstream routes take it). A send is answered once
every sink took it, or refused as a whole, never partly: 413 over ``max_message_kb``, 404
when no route takes it, 507 when the store or an input's queue is full. Nothing is dropped
but what outlives its time to live (``expired``).

Flow control: the agent writes at most ``window`` messages (``Bounds.window``, or less if
the module's hello asks) to a connection before the module says it took them (``took``
frames with a count, a few messages each); the rest wait in the module's inbox, whose bound
gives senders their 507. Written messages stay with the connection (``outstanding``) until
taken; when it closes, the untaken ones go back to the front of the inbox, in order, for the
next connection: at-least-once to the module's code. ``delivered`` counts taken messages;
takes are noted in the inbox's store, which an agent that starts reads back (``_inbox``).

``call`` hands a direct call to the module's connection and waits for its reply (the
``module_call`` work kind, ``register_calls``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import itertools
import json
import logging
import os
from collections import deque
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from outpost.protocol import modwire
from outpost.protocol.errors import OutpostError
from outpost.protocol.modreaders import (DeploymentManifest, MessageCounters,
                                         MessageHubSettings)
from outpost.protocol.routes import Message as RouteMessage
from outpost.protocol.routes import Route

from ..extensions.runtime import beside_state
from . import upstream
from .inbox_store import InboxStore

log = logging.getLogger("outpost.agent.messages")

SOCKET_NAME = "hub.sock"
SOCKET_PATH_MAX = 107  # sun_path's bytes, less the terminating zero
Identify = Callable[[int], "str | None"]


@dataclass(frozen=True)
class Bounds:
    """What one module's inputs may hold in memory, the read buffer of a connection, and
    how many messages a connection may have written and not yet taken (``window``)."""

    input_messages: int
    input_bytes: int
    read_buffer: int
    window: int = 64


NORMAL = Bounds(input_messages=1000, input_bytes=16 << 20, read_buffer=256 << 10, window=64)
CONSTRAINED = Bounds(input_messages=100, input_bytes=1 << 20, read_buffer=16 << 10, window=8)


def socket_path(state_root: Path) -> Path:
    """Where modules find the hub. A root agent runs modules as another user, who cannot
    enter the state directory: the socket is in a directory beside it that others may pass
    through. An agent that is not root runs them as itself: the socket is in
    ``<state>/messages/``."""
    if os.geteuid() != 0:
        directory = state_root / "messages"
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        return directory / SOCKET_NAME
    directory = beside_state(state_root, "messages", lambda path: OutpostError(
        "msg_socket_unsafe", f"The directory {path} for the modules' message socket is not "
        "the agent's own, or others may write it; the agent will not listen there.",
        path=str(path)))
    return directory / SOCKET_NAME


@dataclass(order=True)
class _Queued:
    priority: int
    order: int
    input: str = field(compare=False)
    header: bytes = field(compare=False)  # the message frame's, JSON: encoded once, at send
    body: bytes = field(compare=False)
    expires_at: float = field(compare=False)
    seq: int = field(compare=False)  # its record in the inbox's store


class Inbox:
    """One module's input messages: a heap by (route priority, arrival), bounded per
    input in messages and bytes, each message also in the inbox's ``store`` on disk until
    the module took it."""

    def __init__(self, store: InboxStore) -> None:
        self.store = store
        self.heap: list[_Queued] = []
        self.front = 0  # the order of the earliest message given back (requeue)
        self.count: dict[str, int] = {}
        self.bytes: dict[str, int] = {}
        self.ready = asyncio.Event()

    def room(self, name: str, size: int, bounds: Bounds) -> bool:
        return (self.count.get(name, 0) < bounds.input_messages
                and self.bytes.get(name, 0) + size <= bounds.input_bytes)

    def put(self, item: _Queued) -> None:
        heapq.heappush(self.heap, item)
        self.count[item.input] = self.count.get(item.input, 0) + 1
        self.bytes[item.input] = self.bytes.get(item.input, 0) + len(item.body)
        self.ready.set()

    def requeue(self, items: list[_Queued]) -> None:
        """Give back messages written to a connection that closed before the module took
        them: ahead of every waiting message (even of a higher priority, which came after
        them), in the order they were written."""
        self.front -= len(items)
        for offset, item in enumerate(items):
            item.priority, item.order = -1, self.front + offset
            self.put(item)

    def pop(self) -> _Queued | None:
        if not self.heap:
            self.ready.clear()
            return None
        item = heapq.heappop(self.heap)
        self.count[item.input] -= 1
        self.bytes[item.input] -= len(item.body)
        return item

    def drop_expired(self, now: float) -> int:
        keep = [q for q in self.heap if q.expires_at > now]
        gone = len(self.heap) - len(keep)
        if gone:
            self.store.forget([q.seq for q in self.heap if q.expires_at <= now])
            self.heap = keep
            heapq.heapify(self.heap)
            self.count, self.bytes = {}, {}
            for q in keep:
                self.count[q.input] = self.count.get(q.input, 0) + 1
                self.bytes[q.input] = self.bytes.get(q.input, 0) + len(q.body)
        return gone


class Refusal(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Connection:
    def __init__(self, module: str, pid: int, writer: asyncio.StreamWriter,
                 window: int) -> None:
        self.module = module
        self.pid = pid
        self.writer = writer
        self.calls: dict[int, asyncio.Future[tuple[int, Any]]] = {}
        self.lock = asyncio.Lock()
        self.window = window
        self.outstanding: deque[_Queued] = deque()  # written, not yet taken, in order
        self.room = asyncio.Event()  # set when a took made room in the window

    def took(self, count: Any) -> list[_Queued]:
        """Let go of the first ``count`` outstanding messages (a ``took`` frame)."""
        if not isinstance(count, int) or isinstance(count, bool) or not (
                0 < count <= len(self.outstanding)):
            raise modwire.FrameError(f"a took counts some of the {len(self.outstanding)} "
                                     f"messages written and not yet taken, not {count!r}")
        taken = [self.outstanding.popleft() for _ in range(count)]
        self.room.set()
        return taken

    async def write(self, frame: bytes) -> None:
        async with self.lock:
            self.writer.write(frame)
            await self.writer.drain()


ADOPTION_WAIT = 10.0  # seconds a hello waits for the supervisor's adoption at agent start


class MessageHub:
    def __init__(self, identify: Identify, state_root: Path, *,
                 path: Path | None = None, adopting: bool = False) -> None:
        self.identify = identify
        self.state_root = state_root
        self.path = path
        self.settings = MessageHubSettings()
        self.bounds = NORMAL
        self.routes: list[tuple[str, Route, int, int]] = []  # name, route, priority, ttl
        self.inboxes: dict[str, Inbox] = {}
        self.connections: dict[str, Connection] = {}
        self.store: upstream.Store | None = None
        self.uploader: upstream.Uploader | None = None
        self.send_upstream: upstream.SendUpstream | None = None
        self._backoff = (1.0, 60.0)
        self._counters = MessageCounters()
        self._server: asyncio.AbstractServer | None = None
        self._call_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sync_task: asyncio.Task[None] | None = None
        # Set once the supervisor has adopted the modules that outlived the last agent
        # (hook.py): until then a module's process is not known yet, so a hello that cannot
        # be told apart waits for it (at most ADOPTION_WAIT) rather than being refused.
        self.adopted = asyncio.Event()
        if not adopting:
            self.adopted.set()

    # --- the daemon's seam ----------------------------------------------------------------
    def configure(self, manifest: DeploymentManifest, routes: dict[str, Route]) -> None:
        """Take a deployment's routes and settings (called at every applied deployment)."""
        settings = manifest.message_hub
        self.settings = settings
        self.bounds = CONSTRAINED if settings.constrained else NORMAL
        self.routes = sorted(
            ((name, route, manifest.routes[name].priority,
              manifest.routes[name].ttl_seconds or settings.ttl_seconds)
             for name, route in routes.items()), key=lambda r: (r[2], r[0]))
        max_bytes = settings.store_max_mb << 20
        sizes = upstream.CONSTRAINED if settings.constrained else upstream.NORMAL
        if self.store is None:
            self.store = upstream.Store(self.state_root / "messages" / "upstream", max_bytes,
                                        sizes)
        else:
            self.store.max_bytes, self.store.sizes = max_bytes, sizes
        for inbox in self.inboxes.values():
            inbox.store.segment_bytes = sizes.segment_bytes

    def _inbox(self, module: str) -> Inbox:
        """A module's inbox; the first time, rebuilt from its store on disk (what an agent
        killed or restarted before had acked and the module had not taken)."""
        inbox = self.inboxes.get(module)
        if inbox is not None:
            return inbox
        sizes = upstream.CONSTRAINED if self.settings.constrained else upstream.NORMAL
        store = InboxStore(self.state_root / "messages" / "inbox" / module,
                           sizes.segment_bytes)
        inbox = self.inboxes[module] = Inbox(store)
        found, expired = store.load()
        self._counters.expired += expired
        for stored in found:
            inbox.put(_Queued(stored.priority, stored.seq, stored.input, stored.header,
                              stored.body, stored.expires_at, stored.seq))
        if found or expired:
            log.info("module %s's inbox: %d messages read back from disk (%d expired)",
                     module, len(found), expired)
        return inbox

    async def _sync(self) -> None:
        """Flush the inboxes' files to the disk at most once a second (not per message:
        docs/messages.md, Durability), in a thread: an fsync may take tens of
        milliseconds, during which the hub goes on routing."""
        while True:
            await asyncio.sleep(1.0)
            fds: list[int] = []
            for inbox in self.inboxes.values():
                fds.extend(inbox.store.to_sync())
            if fds:
                await asyncio.to_thread(_fsync_all, fds)

    def set_upstream(self, send_upstream: upstream.SendUpstream, *,
                     backoff_base: float = 1.0, backoff_cap: float = 60.0) -> None:
        """Where ``$upstream`` messages go (the hub's ``POST /v1/agent/messages``); the
        uploader starts with the hub, or now if it listens already."""
        self.send_upstream = send_upstream
        self._backoff = (backoff_base, backoff_cap)
        if self._server is not None:
            self._start_uploader()

    def _start_uploader(self) -> None:
        if self.send_upstream is None or self.store is None or self.uploader is not None:
            return
        base, cap = self._backoff
        self.uploader = upstream.Uploader(self.store, self.send_upstream,
                                          backoff_base=base, backoff_cap=cap)
        self.uploader.start()

    async def start(self) -> Path:
        """Listen; the socket's path."""
        path = self.path or socket_path(self.state_root)
        if len(os.fsencode(path)) > SOCKET_PATH_MAX:
            raise OutpostError("msg_socket_unavailable", f"The modules' message socket "
                               f"cannot be made at {path}: a socket path is at most "
                               f"{SOCKET_PATH_MAX} bytes.", path=str(path),
                               reason="the path is too long")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(path), limit=self.bounds.read_buffer)
        except OSError as exc:
            raise OutpostError("msg_socket_unavailable", f"The modules' message socket "
                               f"cannot be made at {path}: {exc.strerror}.", path=str(path),
                               reason=str(exc.strerror)) from exc
        os.chmod(path, 0o666)
        self.path = path
        if self.store is None:
            self.configure(DeploymentManifest(), {})
        directory = self.state_root / "messages" / "inbox"
        if directory.is_dir():
            for module in sorted(p.name for p in directory.iterdir() if p.is_dir()):
                self._inbox(module)
        self._sync_task = asyncio.get_running_loop().create_task(self._sync(),
                                                                 name="inbox-sync")
        self._start_uploader()
        log.info("the modules' message hub listens on %s", path)
        return path

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections.values()):
            conn.writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task
            self._sync_task = None
        for inbox in self.inboxes.values():
            with contextlib.suppress(OSError):
                inbox.store.close()
        if self.uploader is not None:
            await self.uploader.close()
        elif self.store is not None:
            self.store.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def counters(self) -> MessageCounters:
        out = dataclasses.replace(self._counters)
        if self.store is not None:
            out.upstream_queued = self.store.queued
            out.upstream_queued_bytes = self.store.size
            out.expired += self.store.expired_total
        if self.uploader is not None:
            out.upstream_sent = self.uploader.sent
        return out

    # --- a connection -------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        conn: Connection | None = None
        try:
            conn = await self._hello(reader, writer)
            if conn is None:
                return
            delivery = asyncio.get_running_loop().create_task(self._deliver(conn))
            try:
                await self._read(conn, reader)
            finally:
                delivery.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await delivery
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except modwire.FrameError as exc:
            with contextlib.suppress(Exception):
                writer.write(modwire.encode({"op": modwire.ERROR, "status":
                                             modwire.BAD_FRAME, "reason": str(exc)}))
                await writer.drain()
        finally:
            if conn is not None:
                for future in conn.calls.values():
                    if not future.done():
                        future.set_result((-1, None))
                if self.connections.get(conn.module) is conn:
                    del self.connections[conn.module]
                if conn.outstanding:
                    self._inbox(conn.module).requeue(list(conn.outstanding))
                    conn.outstanding.clear()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._tasks.discard(task)

    async def _hello(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                     ) -> Connection | None:
        pid, uid = _peer(writer)
        header_length, body_length = await modwire.read_prefix(reader)
        header = await modwire.read_header(reader, header_length)
        claimed = header.get("module") if header.get("op") == modwire.HELLO else None
        owner = self._owner(pid)
        if owner is None and pid > 0 and not self.adopted.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.adopted.wait(), ADOPTION_WAIT)
            owner = self._owner(pid)
        if not isinstance(claimed, str) or owner is None or owner != claimed:
            self._counters.rejected_identity += 1
            log.warning("refused a connection to the modules' message socket: process %d "
                        "(uid %d) claims to be module %r, which it is not (404 Module not "
                        "found)", pid, uid, claimed)
            writer.write(modwire.encode({"op": modwire.ERROR, "status": modwire.NOT_FOUND,
                                         "reason": modwire.MODULE_NOT_FOUND}))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            return None
        if body_length:
            await modwire.skip(reader, body_length)
        window = self.bounds.window
        asked = header.get("window")
        if isinstance(asked, int) and not isinstance(asked, bool) and 0 < asked < window:
            window = asked  # a module may ask for less (to hold less in its own memory)
        conn = Connection(claimed, pid, writer, window)
        self.connections[claimed] = conn
        self._inbox(claimed)
        await conn.write(modwire.encode({"op": modwire.WELCOME, "module": claimed,
                                         "max_message_kb": self.settings.max_message_kb,
                                         "window": window}))
        return conn

    def _owner(self, pid: int) -> str | None:
        try:
            return self.identify(pid) if pid > 0 else None
        except Exception:  # the supervisor's bug must not open the door
            log.exception("could not tell which module process %d belongs to", pid)
            return None

    async def _read(self, conn: Connection, reader: asyncio.StreamReader) -> None:
        while True:
            header_length, body_length = await modwire.read_prefix(reader)
            header = await modwire.read_header(reader, header_length)
            op = header["op"]
            if body_length > modwire.MAX_BODY:
                raise modwire.FrameError(f"a frame's body is at most {modwire.MAX_BODY} "
                                         f"bytes, not {body_length}")
            limit = self.settings.max_message_kb * 1024
            if op == modwire.SEND and body_length > limit:
                await modwire.skip(reader, body_length)
                self._counters.received += 1
                self._counters.refused += 1
                await self._ack(conn, header, modwire.TOO_LARGE,
                                f"the message is {body_length} bytes, over the limit of "
                                f"{self.settings.max_message_kb} KiB (max_message_kb)")
                continue
            body = await reader.readexactly(body_length) if body_length else b""
            if op == modwire.SEND:
                self._counters.received += 1
                try:
                    routes = self.route(conn.module, header, body)
                except Refusal as exc:
                    self._counters.refused += 1
                    await self._ack(conn, header, exc.status, exc.reason)
                else:
                    await self._ack(conn, header, modwire.OK, "", routes=routes)
            elif op == modwire.TOOK:
                taken = conn.took(header.get("count"))
                self._counters.delivered += len(taken)
                try:
                    self._inbox(conn.module).store.take([q.seq for q in taken])
                except OSError as exc:  # they may come again after a restart: at least once
                    log.warning("could not note on disk that module %s took %d messages: %s",
                                conn.module, len(taken), exc.strerror)
            elif op == modwire.REPLY:
                future = conn.calls.get(header.get("id", -1))
                if future is not None and not future.done():
                    try:
                        answer = json.loads(body) if body else None
                    except ValueError:
                        answer = body.decode(errors="replace")
                    future.set_result((int(header.get("status", 200)), answer))
            else:
                raise modwire.FrameError(f"'{op}' is not an operation a module sends "
                                         "after hello")

    async def _ack(self, conn: Connection, header: dict[str, Any], status: int,
                   reason: str, routes: int | None = None) -> None:
        answer: dict[str, Any] = {"op": modwire.ACK, "id": header.get("id"), "status": status}
        if routes is not None:
            answer["routes"] = routes  # 0: filtered by the routes' conditions
        if reason:
            answer["reason"] = reason
        await conn.write(modwire.encode(answer))

    # --- routing ----------------------------------------------------------------------------
    def route(self, module: str, header: dict[str, Any], body: bytes) -> int:
        """Deliver one message to every sink a route takes it to; how many routes took it.
        Refusal when no route reads the output at all (a mistake in the deployment or the
        module); a message that routes read but whose conditions all said no is filtered,
        as the routes meant: acknowledged, counted, delivered nowhere."""
        output = header.get("output")
        if not isinstance(output, str) or not output:
            raise Refusal(modwire.BAD_FRAME, "a send names its output")
        properties = header.get("properties") or {}
        if not isinstance(properties, dict):
            raise Refusal(modwire.BAD_FRAME, "properties is a JSON object")
        system = {k: header.get(k) for k in ("content_type", "message_id", "correlation_id")}
        message = RouteMessage(module, output, properties, system, body)
        taken = [r for r in self.routes if r[1].takes(message)]
        if not taken:
            if any(r[1].source.takes(module, output) for r in self.routes):
                self._counters.filtered += 1
                return 0
            raise Refusal(modwire.NOT_FOUND,
                          f"no route takes output {output} of module {module}")
        now = time.time()
        inputs: dict[tuple[str, str], tuple[int, int]] = {}
        upstream_route: tuple[str, int] | None = None
        for name, route, priority, ttl in taken:
            sink = route.sink
            if sink.upstream:
                upstream_route = upstream_route or (name, ttl)
            else:
                key = (str(sink.module), str(sink.input))
                inputs.setdefault(key, (priority, ttl))
        for (target, name), _ in inputs.items():
            inbox = self._inbox(target)
            if not inbox.room(name, len(body), self.bounds):
                self._counters.expired += inbox.drop_expired(now)
                if not inbox.room(name, len(body), self.bounds):
                    raise Refusal(modwire.STORE_FULL,
                                  f"input {name} of module {target} is full "
                                  f"({inbox.count.get(name, 0)} messages wait)")
        message_header = {"op": modwire.MESSAGE, "module": module, "output": output,
                          "properties": properties, **system, "created_at": now}
        # On disk before the ack (one write per input), and all of them or none: what was
        # written is marked taken again when a later write or the upstream store refuses.
        written: list[tuple[Inbox, _Queued]] = []
        try:
            for (target, name), (priority, ttl) in inputs.items():
                inbox = self.inboxes[target]
                item_header = json.dumps(dict(message_header, input=name),
                                         separators=(",", ":")).encode()
                try:
                    seq = inbox.store.append(name, priority, now + ttl, item_header, body)
                except OSError as exc:
                    raise Refusal(modwire.STORE_FULL,
                                  f"input {name} of module {target} is full (its store on "
                                  f"disk: {exc.strerror})") from None
                written.append((inbox, _Queued(priority, seq, name, item_header, body,
                                               now + ttl, seq)))
            if upstream_route is not None:
                self._upstream(module, output, header, body, upstream_route, now)
        except Refusal:
            for inbox, item in written:
                with contextlib.suppress(OSError):
                    inbox.store.take([item.seq])
            raise
        for inbox, item in written:
            inbox.put(item)
        return len(taken)

    def _upstream(self, module: str, output: str, header: dict[str, Any], body: bytes,
                  route: tuple[str, int], now: float) -> None:
        import base64

        if self.store is None:
            raise Refusal(modwire.STORE_FULL, "upstream store full")
        record = {"module": module, "output": output,
                  "properties": header.get("properties") or {},
                  "content_type": header.get("content_type"),
                  "message_id": header.get("message_id"),
                  "correlation_id": header.get("correlation_id"),
                  "body": base64.b64encode(body).decode(), "created_at": now,
                  "route": route[0]}
        try:
            self.store.append(record, route[1])
        except upstream.StoreFull:
            raise Refusal(modwire.STORE_FULL, "upstream store full") from None
        except OSError as exc:
            raise Refusal(modwire.STORE_FULL, f"upstream store full ({exc.strerror})"
                          ) from None
        if self.uploader is not None:
            self.uploader.wake()

    async def _deliver(self, conn: Connection) -> None:
        inbox = self._inbox(conn.module)
        while True:
            while len(conn.outstanding) >= conn.window:
                conn.room.clear()
                await conn.room.wait()
            await inbox.ready.wait()
            if self.connections.get(conn.module) is not conn:
                return  # a newer connection of the module takes its messages
            item = inbox.pop()
            if item is None:
                continue
            if item.expires_at <= time.time():
                self._counters.expired += 1
                inbox.store.forget([item.seq])
                continue
            # Outstanding before it is written: if the connection closes, even while
            # writing, it goes back to the inbox (_serve) for the next connection.
            conn.outstanding.append(item)
            if len(item.header) > modwire.MAX_HEADER:
                raise modwire.FrameError(f"a frame's header is at most {modwire.MAX_HEADER} "
                                         f"bytes, not {len(item.header)}")
            await conn.write(modwire.PREFIX.pack(len(item.header), len(item.body))
                             + item.header + item.body)

    # --- direct calls -------------------------------------------------------------------
    async def call(self, module: str, method: str, payload: Any, timeout: float
                   ) -> tuple[int, Any]:
        """The module's (status, answer) to a direct call; OutpostError when it is not
        connected (E9182) or does not answer within ``timeout`` (E9183)."""
        conn = self.connections.get(module)
        if conn is None:
            raise OutpostError("msg_module_not_connected", f"The module {module} is not "
                               "connected to the agent's message hub.", module=module)
        ident = next(self._call_ids)
        future: asyncio.Future[tuple[int, Any]] = asyncio.get_running_loop().create_future()
        conn.calls[ident] = future
        try:
            await conn.write(modwire.encode({"op": modwire.CALL, "id": ident,
                                             "method": method},
                                            json.dumps(payload).encode()))
            status, answer = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise OutpostError("msg_call_timeout", f"The module {module} did not answer "
                               f"the call of {method} within {timeout:g} s.", module=module,
                               method=method, seconds=timeout) from None
        except ConnectionError:
            status, answer = -1, None
        finally:
            conn.calls.pop(ident, None)
        if status == -1:
            raise OutpostError("msg_module_not_connected", f"The module {module} is not "
                               "connected to the agent's message hub.", module=module)
        return status, answer


def _fsync_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.fsync(fd)
        except OSError as exc:
            log.warning("could not flush a module's inbox to the disk: %s", exc.strerror)
        finally:
            os.close(fd)


def _peer(writer: asyncio.StreamWriter) -> tuple[int, int]:
    """(pid, uid) of the process at the other end (SO_PEERCRED); (0, -1) if unknown."""
    sock = writer.get_extra_info("socket")
    try:
        data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return 0, -1
    pid, uid, _ = struct.unpack("3i", data)
    return pid, uid


# The message hub of each running daemon, by its state directory object: the
# ``module_call`` work kind (agent/work.py, built in) finds it here.
_attached: dict[int, MessageHub] = {}


def attach(state: Any, hub: MessageHub) -> None:
    _attached[id(state)] = hub


def detach(state: Any) -> None:
    _attached.pop(id(state), None)


async def take_call(item: Any, ctx: Any) -> Any:
    """A ``module_call`` work item: the module's reply (``work.ModuleCallResult``'s keys,
    as a dict: no pydantic on the agent), or the error that it is not connected (E9182; also
    on a machine that runs no modules) or did not answer in time (E9183)."""
    from .. import work

    asked = item.payload
    hub = _attached.get(id(ctx.state))
    try:
        if hub is None:
            raise OutpostError("msg_module_not_connected", f"The module {asked.module} is "
                               "not connected to the agent's message hub (this machine "
                               "runs no modules).", module=asked.module)
        status, answer = await hub.call(asked.module, asked.method, asked.payload,
                                        asked.timeout_seconds)
    except OutpostError as exc:
        return work.error_result(exc)
    return {"status": status, "payload": answer}
