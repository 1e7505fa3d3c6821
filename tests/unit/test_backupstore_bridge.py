"""outpost-restic-bridge (src/outpost/backup/bridge.py) through its two seams: an HTTP/2
client speaking to it over a socket pair as restic does over the pipes, and the hub's side
replaced by httpx's MockTransport. Its options, and where the token may come from."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from outpost.backup import bridge
from outpost.protocol.errors import OutpostError

pytestmark = [pytest.mark.anyio]

PREFIX = "https://hub.test/v1/backup/m-1"


class FakeHub:
    """The hub's side: what the bridge forwarded, and a repository in a dict."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.seen: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        path = request.url.path.removeprefix("/v1/backup/m-1")
        if request.method == "POST":
            self.files[path] = await request.aread()
            return httpx.Response(200)
        if path not in self.files:
            return httpx.Response(404, json={"code": "E9065", "message": "no file",
                                             "fix": "none"})
        content = self.files[path]
        if request.method == "HEAD":
            return httpx.Response(200, headers={"Content-Length": str(len(content))})
        if "range" in request.headers:
            start, end = request.headers["range"][6:].split("-")
            part = content[int(start):int(end) + 1]
            return httpx.Response(206, content=part, headers={
                "Content-Range": f"bytes {start}-{end}/{len(content)}"})
        return httpx.Response(200, content=content)


class Restic:
    """The client side of the HTTP/2 connection, as restic's rclone backend opens it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.writer.write(self.conn.data_to_send())

    async def requests(self, *asked: tuple[str, str, dict[str, str], bytes]
                       ) -> list[dict[str, Any]]:
        """Send every request at once (concurrent streams) and read every answer."""
        answers: dict[int, dict[str, Any]] = {}
        pending: dict[int, memoryview] = {}
        for method, path, headers, body in asked:
            stream = self.conn.get_next_available_stream_id()
            extra = [(k, v) for k, v in headers.items()]
            if body:
                extra.append(("content-length", str(len(body))))
            self.conn.send_headers(stream, [(":method", method), (":path", path),
                                            (":scheme", "http"), (":authority", "localhost"),
                                            *extra], end_stream=not body)
            answers[stream] = {"body": bytearray(), "done": False}
            if body:
                pending[stream] = memoryview(body)
        while not all(a["done"] for a in answers.values()):
            for stream, left in list(pending.items()):
                # Everything the windows allow, then wait for the bridge to open them.
                while (room := min(self.conn.local_flow_control_window(stream), len(left),
                                   self.conn.max_outbound_frame_size)) > 0:
                    self.conn.send_data(stream, left[:room].tobytes(),
                                        end_stream=room == len(left))
                    left = left[room:]
                pending[stream] = left
                if not left:
                    del pending[stream]
            self.writer.write(self.conn.data_to_send())
            await self.writer.drain()
            data = await asyncio.wait_for(self.reader.read(65536), 10)
            assert data, "the bridge closed the connection"
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    answers[event.stream_id]["headers"] = dict(event.headers)  # type: ignore
                elif isinstance(event, h2.events.DataReceived):
                    answers[event.stream_id]["body"] += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                        event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    answers[event.stream_id]["done"] = True
                elif isinstance(event, h2.events.StreamReset):
                    raise AssertionError(f"stream {event.stream_id} reset")
            self.writer.write(self.conn.data_to_send())
        return [{**answers[k], "body": bytes(answers[k]["body"])} for k in sorted(answers)]


async def _connected(hub: FakeHub) -> tuple[Restic, asyncio.Task[None], Any]:
    ours, theirs = socket.socketpair()
    forwarder = bridge.Forwarder.__new__(bridge.Forwarder)
    forwarder.prefix = PREFIX
    forwarder.client = httpx.AsyncClient(transport=httpx.MockTransport(hub),
                                         headers={"Authorization": "Bearer obk_t"})
    reader, writer = await asyncio.open_connection(sock=theirs)
    served = asyncio.create_task(bridge.Bridge(forwarder, reader, writer).run())
    client = Restic(*await asyncio.open_connection(sock=ours))
    return client, served, forwarder


async def test_requests_and_bodies_larger_than_every_window_pass_both_ways() -> None:
    hub = FakeHub()
    client, served, forwarder = await _connected(hub)
    big = os.urandom(20 * 1024 * 1024)  # more than the bridge's and h2's default windows
    small = b"config"
    name = hashlib.sha256(big).hexdigest()
    answers = await client.requests(("POST", f"/data/{name}", {}, big),
                                    ("POST", "/config", {}, small))
    assert [a["headers"][":status"] for a in answers] == ["200", "200"]
    assert hub.files[f"/data/{name}"] == big and hub.files["/config"] == small

    answers = await client.requests(
        ("GET", f"/data/{name}", {"accept": "application/vnd.x.restic.rest.v2"}, b""),
        ("GET", f"/data/{name}", {"range": "bytes=10-19"}, b""),
        ("HEAD", "/config", {}, b""),
        ("GET", "/keys/missing", {}, b""))
    assert answers[0]["body"] == big
    assert answers[1]["headers"][":status"] == "206" and answers[1]["body"] == big[10:20]
    assert answers[1]["headers"]["content-range"] == f"bytes 10-19/{len(big)}"
    assert answers[2]["headers"]["content-length"] == "6" and answers[2]["body"] == b""
    assert answers[3]["headers"][":status"] == "404"
    # Forwarded under the machine's repository, with the token, the headers restic sent.
    assert all(r.headers["authorization"] == "Bearer obk_t" for r in hub.seen)
    assert all(str(r.url).startswith(PREFIX + "/") for r in hub.seen)
    assert [r.headers.get("range") for r in hub.seen if r.method == "GET"][1] == "bytes=10-19"

    client.writer.close()  # restic is done: the bridge ends
    await asyncio.wait_for(served, 10)
    await client.writer.wait_closed()
    await forwarder.client.aclose()


async def test_an_unreachable_hub_is_answered_502_and_the_bridge_goes_on() -> None:
    calls = 0

    async def down(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, content=b"ok")

    client, served, forwarder = await _connected(down)  # type: ignore[arg-type]
    first = await client.requests(("GET", "/config", {}, b""))
    assert first[0]["headers"][":status"] == "502"
    assert b"could not be reached" in first[0]["body"]
    second = await client.requests(("GET", "/config", {}, b""))
    assert second[0]["headers"][":status"] == "200" and second[0]["body"] == b"ok"
    client.writer.close()
    await asyncio.wait_for(served, 10)
    await client.writer.wait_closed()
    await forwarder.client.aclose()


def test_the_token_comes_from_the_environment_or_a_file(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    argv = ["--hub", "https://hub:8443", "--machine-id", "m-1", "--ca-file", str(ca),
            "outpost"]
    options = bridge.parse_args(argv, {bridge.TOKEN_ENV: "obk_env\n"})
    assert options.token == "obk_env" and options.prefix == "https://hub:8443/v1/backup/m-1"
    assert "obk_env" not in repr(options)
    token_file = tmp_path / "token"
    token_file.write_text("obk_file\n")
    from_file = bridge.parse_args([*argv[:-1], "--token-file", str(token_file), "outpost"],
                                  {bridge.TOKEN_ENV: "obk_env"})
    assert from_file.token == "obk_file"


@pytest.mark.parametrize(("argv", "environ", "named"), [
    (["--hub", "https://h", "--machine-id", "m", "--ca-file", "CA"], {}, "no backup token"),
    (["--hub", "http://h", "--machine-id", "m", "--ca-file", "CA"], {"OUTPOST_BACKUP_TOKEN":
                                                                    "t"}, "https:// URL"),
    (["--hub", "https://h", "--machine-id", "m", "--ca-file", "/nonexistent"],
     {"OUTPOST_BACKUP_TOKEN": "t"}, "does not exist"),
    (["--hub", "https://h", "--machine-id", "m", "--ca-file", "CA", "--token-file",
      "/nonexistent"], {}, "cannot be read"),
])
def test_bad_options_say_what_is_missing(tmp_path: Path, argv: list[str],
                                         environ: dict[str, str], named: str) -> None:
    (tmp_path / "CA").write_text("x")
    argv = [str(tmp_path / "CA") if a == "CA" else a for a in argv]
    with pytest.raises(OutpostError) as caught:
        bridge.parse_args(argv, environ)
    assert caught.value.code == "E9069" and named in caught.value.message


def test_main_exits_2_and_prints_the_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert bridge.main(["--hub", "https://h", "--machine-id", "m", "--ca-file", "/no"]) == 2
    err = capsys.readouterr().err
    assert "E9069" in err and "/no" in err
