"""restic's REST protocol as a real hub process serves it over HTTPS (hub/routes/restic.py,
handed every request under /v1/backup/ by the edge): the answers restic reads (HEAD's
length, whole files, ranges, listings), the refusals with their codes, bodies cut off in
the middle, quotas, and clients that leave in the middle of an answer. restic itself:
tests/integration/test_backup_store.py."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from tests.support import Hub, register, wait_until

V2 = "application/vnd.x.restic.rest.v2"


def _repository(hub: Hub, tmp_path: Path, name: str = "m1", **body: Any
                ) -> tuple[httpx.Client, str, Path]:
    """A client with the machine's backup token, the repository's URL path, its directory."""
    assert register(hub, tmp_path / name, name).returncode == 0
    issued = hub.api("POST", f"/v1/machines/{name}/backup-token", json=body).json()
    base = f"/v1/backup/{issued['machine_id']}"
    with hub.client(issued["token"]) as client:
        assert client.post(f"{base}/?create=true").status_code == 200
    return (hub.client(issued["token"]), base,
            hub.data_dir / "backup" / hub.account_id / issued["machine_id"])


def _blob(size: int) -> tuple[bytes, str]:
    data = os.urandom(size)
    return data, hashlib.sha256(data).hexdigest()


def _leftovers(repo: Path) -> list[str]:
    return [p.name for p in repo.rglob(".tmp-*")]


def test_files_heads_ranges_and_listings_over_https(hub: Hub, tmp_path: Path) -> None:
    client, base, repo = _repository(hub, tmp_path)
    with client:
        big, big_name = _blob(5 * 1024 * 1024 + 3)  # streamed in pieces when read whole
        small, small_name = _blob(70_000)
        for data, name in ((big, big_name), (small, small_name)):
            assert client.post(f"{base}/data/{name}", content=data).status_code == 200
        assert (repo / "data" / big_name[:2] / big_name).read_bytes() == big

        head = client.head(f"{base}/data/{big_name}")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(big))
        whole = client.get(f"{base}/data/{big_name}")
        assert whole.status_code == 200 and whole.content == big
        assert whole.headers["content-type"] == "application/octet-stream"
        for wanted, start, end in (("bytes=0-0", 0, 0), ("bytes=1000-2999999", 1000, 2999999),
                                   (f"bytes={len(big) - 10}-", len(big) - 10, len(big) - 1),
                                   ("bytes=-7", len(big) - 7, len(big) - 1),
                                   (f"bytes=5-{len(big) * 2}", 5, len(big) - 1)):
            part = client.get(f"{base}/data/{big_name}", headers={"Range": wanted})
            assert part.status_code == 206, (wanted, part.text)
            assert part.content == big[start:end + 1], wanted
            assert part.headers["content-range"] == f"bytes {start}-{end}/{len(big)}"
        past = client.get(f"{base}/data/{small_name}", headers={"Range": "bytes=70000-"})
        assert past.status_code == 416 and past.json()["code"] == "E9067"

        listed = client.get(f"{base}/data/", headers={"Accept": V2})
        assert listed.headers["content-type"] == V2
        assert sorted(listed.json(), key=lambda f: f["size"]) == [
            {"name": small_name, "size": len(small)}, {"name": big_name, "size": len(big)}]
        assert sorted(client.get(f"{base}/data/").json()) == sorted([small_name, big_name])

        # A body without a declared length (chunked), in many pieces.
        chunked, chunked_name = _blob(3 * 1024 * 1024)
        pieces = (chunked[i:i + 100_000] for i in range(0, len(chunked), 100_000))
        assert client.post(f"{base}/index/{chunked_name}", content=pieces).status_code == 200
        assert client.get(f"{base}/index/{chunked_name}").content == chunked

        missing = "0" * 64
        for method in ("HEAD", "GET", "DELETE"):
            gone = client.request(method, f"{base}/keys/{missing}")
            assert gone.status_code == 404, method
            if method != "HEAD":
                assert gone.json()["code"] == "E9065"
        assert client.delete(f"{base}/data/{small_name}").status_code == 200
        assert not (repo / "data" / small_name[:2] / small_name).exists()

        # Other shapes and methods: the framework's codes, the Allow header.
        assert client.get(f"{base}/data/x/y").json()["code"] == "E3002"
        assert client.get(f"{base}/data/{'A' * 64}").json()["code"] == "E9062"
        assert client.get(f"{base}/unknown/").json()["code"] == "E9062"
        repository_delete = client.delete(f"{base}/")
        assert repository_delete.status_code == 405
        assert repository_delete.json()["code"] == "E3012"
        assert repository_delete.headers["allow"] == "POST"
        put = client.put(f"{base}/config", content=b"x")
        assert put.status_code == 405 and put.headers["allow"] == "HEAD, GET, POST, DELETE"
        without = client.post(f"{base}/")
        assert without.status_code == 400 and without.json()["code"] == "E9062"
        assert _leftovers(repo) == []
    assert "Traceback" not in hub.log()


def test_refusals_come_before_the_body_and_keep_nothing(sqlite_hub: Hub,
                                                        tmp_path: Path) -> None:
    hub = sqlite_hub
    client, base, repo = _repository(hub, tmp_path, quota_bytes=4_000_000)
    data, name = _blob(3_000_000)
    with client:
        wrong = client.post(f"{base}/data/{'ab' * 32}", content=data)
        assert wrong.status_code == 400 and wrong.json()["code"] == "E9063"
        assert name in wrong.json()["message"]
        assert client.post(f"{base}/data/{name}", content=data).status_code == 200
        # Over the quota: at once by the declared length, and by the bytes of a body that
        # declares none.
        more, more_name = _blob(2_000_000)
        declared = client.post(f"{base}/data/{more_name}", content=more)
        assert declared.status_code == 413 and declared.json()["code"] == "E9064"
        undeclared = client.post(f"{base}/data/{more_name}",
                                 content=(more[i:i + 65536] for i in range(0, len(more), 65536)))
        assert undeclared.status_code == 413 and undeclared.json()["code"] == "E9064"
        # A wrong token: refused before the body, over the same connection as the rest.
        refused = client.post(f"{base}/data/{more_name}", content=more,
                              headers={"Authorization": "Bearer obk_" + "x" * 43})
        assert refused.status_code == 401 and refused.json()["code"] == "E9060"
        assert "obk_" not in refused.text
    assert sorted(p.name for p in repo.rglob("*") if p.is_file()) == [name]


def _raw(hub: Hub) -> ssl.SSLSocket:
    where = urlsplit(hub.url)
    raw = socket.create_connection((where.hostname or "127.0.0.1", where.port or 443))
    return hub.ssl_context().wrap_socket(raw, server_hostname=where.hostname)


def _token_header(client: httpx.Client) -> str:
    return str(client.headers["authorization"])


def test_an_upload_cut_off_in_the_middle_leaves_nothing(sqlite_hub: Hub,
                                                        tmp_path: Path) -> None:
    hub = sqlite_hub
    client, base, repo = _repository(hub, tmp_path)
    data, name = _blob(8 * 1024 * 1024)
    with client, _raw(hub) as conn:
        conn.sendall(f"POST {base}/data/{name} HTTP/1.1\r\nHost: hub\r\n"
                     f"Authorization: {_token_header(client)}\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode())
        conn.sendall(data[:3 * 1024 * 1024])
        # The hub has begun writing it (its temporary file), then the client is gone.
        wait_until(lambda: _leftovers(repo), 10, what="the upload's temporary file")
        conn.close()
        wait_until(lambda: not _leftovers(repo), 10, what="the temporary file to be removed")
        assert not (repo / "data" / name[:2] / name).exists()
        assert client.head(f"{base}/data/{name}").status_code == 404
        assert client.post(f"{base}/data/{name}", content=data).status_code == 200
    assert "Traceback" not in hub.log()


def _read_some(conn: ssl.SSLSocket, wanted: int) -> bytes:
    got = b""
    while len(got) < wanted:
        piece = conn.recv(65536)
        if not piece:
            break
        got += piece
    return got


def test_a_client_that_leaves_in_the_middle_of_a_file(sqlite_hub: Hub,
                                                       tmp_path: Path) -> None:
    hub = sqlite_hub
    client, base, _repo = _repository(hub, tmp_path)
    data, name = _blob(24 * 1024 * 1024)
    with client:
        assert client.post(f"{base}/data/{name}", content=data).status_code == 200
        for _ in range(3):
            with _raw(hub) as conn:
                conn.sendall(f"GET {base}/data/{name} HTTP/1.1\r\nHost: hub\r\n"
                             f"Authorization: {_token_header(client)}\r\n\r\n".encode())
                head = _read_some(conn, 1024 * 1024)
                assert head.startswith(b"HTTP/1.1 200"), head[:100]
        # The hub goes on answering, whole.
        started = time.monotonic()
        assert client.get(f"{base}/data/{name}",
                          headers={"Range": "bytes=100-"}).content == data[100:]
        assert time.monotonic() - started < 30
    assert "Traceback" not in hub.log()


def _pieces(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


def test_many_requests_on_one_connection(sqlite_hub: Hub, tmp_path: Path) -> None:
    """restic keeps its connections open: small and large requests, answered and refused,
    one after another on one connection, each answered whole."""
    hub = sqlite_hub
    client, base, _repo = _repository(hub, tmp_path)
    blobs = [_blob(size) for size in (10, 300_000, 2_500_000, 1)]
    with client:
        for data, name in blobs:
            assert client.post(f"{base}/snapshots/{name}",
                               content=_pieces(data, 40_000)).status_code == 200
            assert client.get(f"{base}/config").status_code == 404
            assert client.get(f"{base}/snapshots/{name}").content == data
        assert sorted(client.get(f"{base}/snapshots/").json()) == sorted(n for _, n in blobs)


def test_both_event_loops_store_whole_packs_and_refuse_a_corrupted_one(
        sqlite_hub: Hub, tmp_path: Path) -> None:
    """The hub runs on asyncio's loop unless told otherwise (``--event-loop uvloop``), and either
    way a 16 MiB pack (large TLS reads, many body pieces) is stored and read back whole, and
    one whose last byte differs from what its name says is refused and not kept."""
    default = sqlite_hub
    own = default.replica()
    own.extra_args.extend(["--event-loop", "uvloop"])
    own.start()
    try:
        client, base, repo = _repository(default, tmp_path)
        data, name = _blob(16 * 1024 * 1024)
        corrupted = data[:-1] + bytes([data[-1] ^ 1])
        with client:
            token = _token_header(client)
        for hub, loop in ((default, "asyncio"), (own, "uvloop")):
            assert f"event loop {loop})" in hub.log()
            with httpx.Client(base_url=hub.url, verify=hub.ssl_context(), timeout=60,
                              headers={"Authorization": token}) as each:
                wrong = each.post(f"{base}/data/{name}", content=corrupted)
                assert wrong.status_code == 400 and wrong.json()["code"] == "E9063", loop
                assert not (repo / "data" / name[:2] / name).exists()
                assert each.post(f"{base}/data/{name}", content=data).status_code == 200
                assert each.get(f"{base}/data/{name}").content == data
                assert each.get(f"{base}/data/{name}", headers={
                    "Range": "bytes=5000000-"}).content == data[5000000:]
            (repo / "data" / name[:2] / name).unlink()
            assert _leftovers(repo) == []
            assert "Traceback" not in hub.log()
    finally:
        own.stop()
