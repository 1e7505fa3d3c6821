"""outpost-restic-bridge: restic on a machine, the machine's repository on the hub.

restic before 0.17 can give its REST backend credentials only in the repository URL, which
the hub refuses (a secret in a URL ends up in logs and process lists); restic 0.17 and later
reach the hub directly (outpost.backup.transport). The rclone backend of any restic
starts a program and speaks HTTP/2 to it over the program's stdin and stdout (cleartext,
with prior knowledge: restic sends the connection preface at once), using the same REST
protocol. This program is that program::

    OUTPOST_BACKUP_TOKEN=obk_... restic -r rclone:outpost \\
        -o rclone.program=outpost-restic-bridge \\
        -o 'rclone.args=--hub https://hub:8443 --machine-id ID --ca-file /path/ca.pem'

restic appends the remote's name (``outpost``) as the last argument. Each HTTP/2 stream
restic opens is forwarded to ``<hub>/v1/backup/<machine id><path>`` over HTTPS verified
against the pinned CA, with ``Authorization: Bearer <token>``; the answer is streamed back
on the same stream. Bodies are never held whole: HTTP/2 flow control passes the hub's pace
back to restic.

The token comes from the environment (``OUTPOST_BACKUP_TOKEN``, removed from this
process's environment once read) or from a file (``--token-file``), never from the command
line. (A file descriptor cannot be handed through restic: it starts this program with only
stdin, stdout and stderr open.) Messages go to stderr, which restic prints prefixed with
``rclone:``.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import ssl
import sys
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import httpcore
import httpx
import hyperframe.frame

from outpost import __version__
from outpost.protocol.errors import OutpostError, describe, entry

TOKEN_ENV = "OUTPOST_BACKUP_TOKEN"
# The request headers restic's REST backend sends that the hub reads, and the answer's
# headers restic reads.
REQUEST_HEADERS = ("accept", "content-type", "content-length", "range")
ANSWER_HEADERS = ("content-type", "content-length", "content-range", "accept-ranges")
# A stream's and the connection's receive windows: restic may send this much of a body
# ahead of what the hub has taken. Frames of up to 1 MiB cost fewer trips through h2.
WINDOW = 16 * 1024 * 1024
FRAME = 1024 * 1024
READ_SIZE = 1024 * 1024
PIPE_SIZE = 1024 * 1024
COALESCE = 256 * 1024
HUB_READ = 256 * 1024
HUB_WRITE = 1024 * 1024


def _short_repr(frame: hyperframe.frame.DataFrame) -> str:
    return f"<{len(frame.data)} bytes>"


# h2 formats every frame it receives for its trace log whether or not anything logs
# (H2Connection._receive_frame), and a DATA frame's text hex-encodes its whole payload: half
# a second of CPU per 200 MB backed up. Nothing in this process logs frames.
hyperframe.frame.DataFrame._body_repr = _short_repr  # type: ignore[method-assign,assignment]


def _failed(problem: str) -> OutpostError:
    return OutpostError("backup_bridge_failed",
                        entry("backup_bridge_failed").message.format(problem=problem),
                        problem=problem)


@dataclass(frozen=True)
class Options:
    hub: str
    machine_id: str
    ca_file: Path
    token: str = field(repr=False)
    timeout: float = 300.0

    @property
    def prefix(self) -> str:
        return f"{self.hub.rstrip('/')}/v1/backup/{self.machine_id}"


def read_token(token_file: str | None, environ: dict[str, str]) -> str:
    """The backup token: from ``token_file``, or else the environment."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise _failed(f"the token file {token_file} cannot be read ({exc.strerror})") \
                from exc
    else:
        token = environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise _failed(f"no backup token: set {TOKEN_ENV} or pass --token-file")
    return token


def parse_args(argv: Sequence[str], environ: dict[str, str]) -> Options:
    parser = argparse.ArgumentParser(
        prog="outpost-restic-bridge",
        description="Serve restic's rclone backend on stdin/stdout and forward it to a "
                    "machine's backup repository on an Outpost hub. The token comes from "
                    f"{TOKEN_ENV} or --token-file, never from the command line.")
    parser.add_argument("--hub", required=True, help="the hub's URL (https://host:port)")
    parser.add_argument("--machine-id", required=True, help="the machine whose repository "
                        "this is (its backup token opens it)")
    parser.add_argument("--ca-file", required=True, help="the hub's CA certificate (PEM), "
                        "the only one trusted")
    parser.add_argument("--token-file", help=f"a file holding the backup token (else "
                        f"{TOKEN_ENV})")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for "
                        "the hub on one request (default 300)")
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("remote", nargs="?", default="", help="restic's remote name "
                        "(appended by restic; not used)")
    args = parser.parse_args(list(argv))
    if not args.hub.startswith("https://"):
        raise _failed(f"--hub must be an https:// URL, not {args.hub!r}")
    ca_file = Path(args.ca_file)
    if not ca_file.is_file():
        raise _failed(f"the CA file {ca_file} does not exist")
    return Options(args.hub, args.machine_id, ca_file, read_token(args.token_file, environ),
                   args.timeout)


class _Connection(httpcore.AsyncNetworkStream):
    """One connection to the hub on asyncio's own streams. Its TLS transport decrypts every
    record that has arrived in one go (up to 256 KiB), where anyio's stream, httpx's
    default, hands over one 16 KiB record a read, and each read costs httpcore, h11 and
    anyio far more than its bytes: most of the bridge's time on a restore."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                # At least HUB_READ: h11 takes what it is given, whatever it asked for.
                return await self.reader.read(max(max_bytes, HUB_READ))
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc) or "timed out reading from the hub") from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            self.writer.write(buffer)
            async with asyncio.timeout(timeout):
                await self.writer.drain()
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc) or "timed out writing to the hub") from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    async def aclose(self) -> None:
        self.writer.close()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                await self.writer.start_tls(ssl_context, server_hostname=server_hostname)
        except TimeoutError as exc:
            self.writer.close()
            raise httpcore.ConnectTimeout(str(exc) or "TLS handshake timed out") from exc
        except OSError as exc:  # ssl.SSLError among them: a certificate not of the CA
            self.writer.close()
            raise httpcore.ConnectError(str(exc)) from exc
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # asked of an idle connection: has the hub closed it?
            return self.reader.at_eof() or self.writer.is_closing()
        names = {"ssl_object": "ssl_object", "client_addr": "sockname",
                 "server_addr": "peername", "socket": "socket"}
        return self.writer.get_extra_info(names[info]) if info in names else None


class _Backend(httpcore.AsyncNetworkBackend):
    """httpcore's connections to the hub, on _Connection."""

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None
                          ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, limit=2 * HUB_READ,
                    local_addr=(local_address, 0) if local_address else None)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(str(exc) or "connecting timed out") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        sock = writer.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        return _Connection(reader, writer)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None
                                  ) -> httpcore.AsyncNetworkStream:
        raise httpcore.UnsupportedProtocol("the hub is reached over TCP")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class _Transport(httpx.AsyncHTTPTransport):
    """httpx's transport, its connections on _Backend (httpx has no setting for that: the
    pool it builds is replaced by the same pool on ours)."""

    def __init__(self, context: ssl.SSLContext, connections: int) -> None:
        super().__init__(verify=context)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=context, max_connections=connections,
            max_keepalive_connections=connections, keepalive_expiry=5.0,
            network_backend=_Backend())


class Forwarder:
    """The hub side: one HTTPS client, its CA pinned, the token in every request."""

    def __init__(self, options: Options) -> None:
        context = ssl.create_default_context(cafile=str(options.ca_file))
        self.prefix = options.prefix
        self.client = httpx.AsyncClient(
            transport=_Transport(context, 16),
            timeout=httpx.Timeout(options.timeout, connect=30.0),
            # identity: the bytes restic gets are the file's, as the hub's
            # Content-Length says (aiter_bytes would undo a compression).
            headers={"Authorization": f"Bearer {options.token}", "Accept-Encoding": "identity",
                     "User-Agent": f"outpost-restic-bridge/{__version__}"})

    async def aclose(self) -> None:
        await self.client.aclose()


@dataclass
class Stream:
    """One request restic sent: its body as it arrives, and the task answering it."""

    id: int
    method: str
    path: str
    headers: dict[str, str]
    body: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None


class Bridge:
    """The HTTP/2 server restic talks to, on a pair of byte streams."""

    def __init__(self, forwarder: Forwarder, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.forwarder = forwarder
        self.reader = reader
        self.writer = writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding="utf-8", validate_inbound_headers=True))
        self.streams: dict[int, Stream] = {}
        # Set when restic opens a send window (any stream's, or the connection's).
        self.window = asyncio.Event()
        self.closed = False  # restic sent GOAWAY
        self.pending: list[bytes] = []
        self.pending_size = 0

    def flush(self, force: bool = True) -> None:
        """Write what h2 has to send; unless ``force``, only once COALESCE bytes are
        waiting (a file's answer, framed 16 KiB at a time: a write to restic's pipe, and
        waking restic for it, costs more than its bytes)."""
        data = self.conn.data_to_send()
        if data:
            self.pending.append(data)
            self.pending_size += len(data)
        if self.pending and (force or self.pending_size >= COALESCE):
            pending = self.pending
            self.writer.write(pending[0] if len(pending) == 1 else b"".join(pending))
            self.pending, self.pending_size = [], 0

    async def run(self) -> None:
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                                   h2.settings.SettingCodes.MAX_FRAME_SIZE: FRAME})
        self.conn.increment_flow_control_window(WINDOW)
        # Taken at once, not from restic's acknowledgement on: h2 sizes its frame reader
        # once per receive_data, and restic's acknowledgement and its first larger frame
        # can arrive in one read.
        self.conn.max_inbound_frame_size = FRAME
        self.flush()
        try:
            while True:
                data = await self.reader.read(READ_SIZE)
                if not data:
                    return  # restic closed the connection: its command is done
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    _say(f"HTTP/2 protocol error from restic: {exc}")
                    self.flush()
                    return
                for event in events:
                    self.on_event(event)
                self.flush()
                await self.writer.drain()
                if self.closed:
                    return
        finally:
            for stream in list(self.streams.values()):
                if stream.task is not None:
                    stream.task.cancel()
            tasks = [s.task for s in self.streams.values() if s.task is not None]
            await asyncio.gather(*tasks, return_exceptions=True)
            self.writer.close()

    def on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            # Text, as header_encoding="utf-8" decodes every name and value.
            headers = {str(k): str(v) for k, v in (event.headers or [])}
            stream = Stream(event.stream_id, headers.get(":method", "GET"),
                            headers.get(":path", "/"), headers)
            self.streams[event.stream_id] = stream
            if event.stream_ended is not None:
                stream.body.put_nowait(None)
            stream.task = asyncio.create_task(self.answer(stream),
                                              name=f"stream-{event.stream_id}")
        elif isinstance(event, h2.events.DataReceived):
            found = self.streams.get(event.stream_id)
            data = event.data or b""
            if found is not None and data:
                # Acknowledged (restic's window reopened) as the hub takes it: body().
                found.body.put_nowait(data)
                unused = event.flow_controlled_length - len(data)  # padding
            else:
                unused = event.flow_controlled_length
            if unused > 0:
                self.conn.acknowledge_received_data(unused, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            found = self.streams.get(event.stream_id)
            if found is not None:
                found.body.put_nowait(None)
        elif isinstance(event, h2.events.StreamReset):
            found = self.streams.pop(event.stream_id, None)
            if found is not None and found.task is not None:
                found.task.cancel()
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self.window.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.closed = True

    async def body(self, stream: Stream) -> AsyncIterator[bytes]:
        """restic's request body, acknowledged (its window reopened) as the hub takes it.
        What has arrived meanwhile goes as one piece (restic's frames are 16 KiB, and each
        piece costs httpx and h11 a write)."""
        ended = False
        while not ended:
            chunk = await stream.body.get()
            if chunk is None:
                return
            parts = [chunk]
            size = len(chunk)
            while size < HUB_WRITE and not stream.body.empty():
                more = stream.body.get_nowait()
                if more is None:
                    ended = True
                    break
                parts.append(more)
                size += len(more)
            yield parts[0] if len(parts) == 1 else b"".join(parts)
            if stream.id in self.streams:
                try:
                    self.conn.acknowledge_received_data(size, stream.id)
                except h2.exceptions.StreamClosedError:
                    pass
                self.flush()

    async def answer(self, stream: Stream) -> None:
        try:
            await self._answer(stream)
        except asyncio.CancelledError:
            raise
        except (httpx.HTTPError, OSError) as exc:
            _say(f"{stream.method} {stream.path}: the hub could not be reached: {exc}")
            self._respond_error(stream, 502, f"the hub could not be reached: {exc}\n")
        except h2.exceptions.H2Error:
            pass  # restic reset or closed the stream: nobody to answer
        except Exception as exc:  # noqa: BLE001 - restic must get an answer, not a hang
            _say(f"{stream.method} {stream.path}: the bridge failed: {exc!r}")
            self._respond_error(stream, 500, f"the bridge failed: {exc!r}\n")
        finally:
            self.streams.pop(stream.id, None)
            self.flush()

    def _respond_error(self, stream: Stream, status: int, text: str) -> None:
        body = text.encode()
        try:
            self.conn.send_headers(stream.id, [(":status", str(status)),
                                               ("content-type", "text/plain"),
                                               ("content-length", str(len(body)))])
            self.conn.send_data(stream.id, body, end_stream=True)
        except h2.exceptions.H2Error:
            pass

    async def _answer(self, stream: Stream) -> None:
        headers = {k: v for k, v in stream.headers.items() if k in REQUEST_HEADERS}
        has_body = stream.method in ("POST", "PUT")
        request = self.forwarder.client.build_request(
            stream.method, self.forwarder.prefix + stream.path, headers=headers,
            content=self.body(stream) if has_body else None)
        response = await self.forwarder.client.send(request, stream=True)
        try:
            answer = [(":status", str(response.status_code))]
            answer += [(k, v) for k, v in response.headers.items() if k in ANSWER_HEADERS]
            if stream.method == "HEAD" or response.status_code in (204, 304):
                self.conn.send_headers(stream.id, answer, end_stream=True)
                self.flush()
                return
            if response.status_code >= 400 and response.status_code != 404:
                # A refusal (restic shows only its status): its reason goes to stderr, which
                # restic prints, before restic sees the status and may stop. 404 is an
                # answer restic expects, not a failure.
                text = await response.aread()
                _say(f"{stream.method} {stream.path}: {_refusal(response.status_code, text)}")
                self.conn.send_headers(stream.id, answer)
                await self._send(stream.id, text)
            else:
                self.conn.send_headers(stream.id, answer)
                self.flush()
                async for chunk in response.aiter_bytes():
                    await self._send(stream.id, chunk)
            self.conn.end_stream(stream.id)
            self.flush()
        finally:
            await response.aclose()

    async def _send(self, stream_id: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            room = min(self.conn.local_flow_control_window(stream_id),
                       self.conn.max_outbound_frame_size, len(view))
            if room <= 0:
                self.flush()
                self.window.clear()
                await self.writer.drain()
                await self.window.wait()
                continue
            self.conn.send_data(stream_id, view[:room])  # h2 copies it as it frames it
            view = view[room:]
        self.flush(force=False)
        await self.writer.drain()


def _refusal(status: int, body: bytes) -> str:
    """The hub's error body as one line: code, message and fix."""
    try:
        found = json.loads(body)
        return f"{found['code']} {found['message']} Fix: {found['fix']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}"


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _widen_pipes() -> None:
    """Pipes of 1 MiB rather than 64 KiB each way (Linux; best effort): fewer wake-ups of
    restic and of this process per MiB moved."""
    setsize = getattr(fcntl, "F_SETPIPE_SZ", 1031)
    for fd in (0, 1):
        try:
            fcntl.fcntl(fd, setsize, PIPE_SIZE)
        except OSError:
            pass  # not a pipe (a test's socket), or over the system's pipe-max-size


async def _stdio() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    _widen_pipes()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2 * READ_SIZE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                 os.fdopen(0, "rb", buffering=0))
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(1, "wb", buffering=0))
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer


async def serve(options: Options) -> None:
    forwarder = Forwarder(options)
    try:
        reader, writer = await _stdio()
        await Bridge(forwarder, reader, writer).run()
    finally:
        await forwarder.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    """The entry point: 0 when restic closed the connection, 2 on bad options."""
    try:
        options = parse_args(sys.argv[1:] if argv is None else argv, dict(os.environ))
    except OutpostError as exc:
        for line in describe(exc):
            _say(line)
        return 2
    os.environ.pop(TOKEN_ENV, None)
    try:
        asyncio.run(serve(options))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
