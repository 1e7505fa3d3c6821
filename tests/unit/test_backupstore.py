"""The backup store's files on disk (hub/backupstore.py), through its own interface: names,
ranges, whole-or-nothing writes, the quota's count."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from outpost.hub import backupstore
from outpost.hub.backupstore import Credential, Store
from outpost.protocol.errors import OutpostError

pytestmark = [pytest.mark.anyio]

MACHINE = "6f1c2a9e-0b7d-4e3a-9c51-2d8f0e4b7a10"
ACCOUNT = "0d9b3c1a-5e2f-4a7b-8c6d-1e0f2a3b4c5d"


def _repo(tmp_path: Path) -> backupstore.Repository:
    return Store(tmp_path / "backup").repository(Credential(MACHINE, ACCOUNT, None))


async def _body(*chunks: bytes, fail_after: int | None = None) -> AsyncIterator[bytes]:
    for index, chunk in enumerate(chunks):
        if fail_after is not None and index == fail_after:
            raise ConnectionResetError("the client went away")
        yield chunk


def _code(exc: pytest.ExceptionInfo[OutpostError]) -> str:
    return exc.value.code


@pytest.mark.parametrize(("header", "size", "expected"), [
    ("", 10, None), ("bytes=0-", 10, (0, 9)), ("bytes=2-4", 10, (2, 4)),
    ("bytes=5-100", 10, (5, 9)), ("bytes=-3", 10, (7, 9)), ("bytes=-30", 10, (0, 9)),
    ("bytes=0-", 0, None),
])
def test_ranges_within_the_file(header: str, size: int,
                                expected: tuple[int, int] | None) -> None:
    assert backupstore.parse_range(header, size) == expected


@pytest.mark.parametrize("header", ["bytes=10-", "bytes=4-2", "bytes=-", "items=0-1",
                                    "bytes=0-1,3-4", "bytes=x-1"])
def test_ranges_outside_the_file_are_refused(header: str) -> None:
    with pytest.raises(OutpostError) as caught:
        backupstore.parse_range(header, 10, "data", "ab" * 32)
    assert _code(caught) == "E9067" and "10 bytes" in caught.value.message


@pytest.mark.parametrize(("kind", "name"), [
    ("data", "../" + "a" * 61), ("data", "A" * 64), ("config", "a" * 64), ("tmp", "a" * 64),
    ("keys", "a" * 65), ("locks", ""), ("index", "a/" + "b" * 62)])
def test_names_outside_the_layout_are_refused(kind: str, name: str) -> None:
    with pytest.raises(OutpostError) as caught:
        backupstore.check_name(kind, name)
    assert _code(caught) == "E9062"


def test_machine_ids_are_checked_before_a_path_is_built(tmp_path: Path) -> None:
    with pytest.raises(OutpostError) as caught:
        Store(tmp_path).repository(Credential("..", ACCOUNT, None))
    assert _code(caught) == "E9062"


async def test_a_file_is_stored_whole_where_restic_looks(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    repo.create()
    content = os.urandom(3 * backupstore.WRITE_CHUNK + 5)
    name = hashlib.sha256(content).hexdigest()
    chunks = [content[i:i + 65536] for i in range(0, len(content), 65536)]
    assert await repo.save("data", name, _body(*chunks), len(content), 0) == len(content)
    stored = tmp_path / "backup" / ACCOUNT / MACHINE / "data" / name[:2] / name
    assert stored.read_bytes() == content
    assert repo.listing("data") == [{"name": name, "size": len(content)}]
    small = await repo.read("data", name, "bytes=7-1006")  # read at once, the file closed
    assert (small.size, small.start, small.length, small.ranged) == (len(content), 7, 1000,
                                                                      True)
    assert small.data == content[7:1007] and small.fh is None
    whole = await repo.read("data", name)  # larger than WHOLE_READ: left open to stream
    assert (whole.start, whole.length, whole.ranged, whole.data) == (0, len(content), False,
                                                                     None)
    assert whole.fh is not None
    repo.delete("data", name)  # an open file stays readable whole
    read = b"".join([piece async for piece in repo.pieces(whole.fh, 7, len(content) - 7)])
    assert read == content[7:] and whole.fh.closed


@pytest.mark.parametrize("fail_after", [1, 3])
async def test_a_body_cut_short_leaves_nothing(tmp_path: Path, fail_after: int) -> None:
    repo = _repo(tmp_path)
    content = os.urandom(4 * backupstore.WRITE_CHUNK)
    name = hashlib.sha256(content).hexdigest()
    pieces = [content[i:i + backupstore.WRITE_CHUNK] for i in range(0, len(content),
                                                                     backupstore.WRITE_CHUNK)]
    with pytest.raises(ConnectionResetError):
        await repo.save("data", name, _body(*pieces, fail_after=fail_after), None, 0)
    assert [p for p in (tmp_path / "backup").rglob("*") if p.is_file()] == []
    assert repo.listing("data") == []


async def test_content_that_does_not_match_its_name_is_not_kept(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    with pytest.raises(OutpostError) as caught:
        await repo.save("snapshots", "0" * 64, _body(b"something else"), None, 0)
    assert _code(caught) == "E9063"
    assert hashlib.sha256(b"something else").hexdigest() in caught.value.message
    assert [p for p in (tmp_path / "backup").rglob("*") if p.is_file()] == []


async def test_config_is_written_once(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    await repo.save("config", "", _body(b"first"), 5, 0)
    with pytest.raises(OutpostError) as caught:
        await repo.save("config", "", _body(b"second"), 6, 0)
    assert _code(caught) == "E9066"
    assert repo.path("config", "").read_bytes() == b"first"
    assert sorted(p.name for p in repo.root.iterdir()) == ["config"]  # no temporary left


async def test_the_quota_counts_what_is_stored_and_deleted(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    blobs = [os.urandom(400) for _ in range(3)]
    names = [hashlib.sha256(b).hexdigest() for b in blobs]
    await repo.save("data", names[0], _body(blobs[0]), 400, 1000)
    await repo.save("data", names[1], _body(blobs[1]), 400, 1000)
    # Declared too large: refused before a byte is read; undeclared: refused as it streams.
    for declared in (400, None):
        with pytest.raises(OutpostError) as caught:
            await repo.save("data", names[2], _body(blobs[2]), declared, 1000)
        assert _code(caught) == "E9064" and "(it holds 800)" in caught.value.message
    repo.delete("data", names[0])
    await repo.save("data", names[2], _body(blobs[2]), 400, 1000)
    assert await repo.store.used(repo.root) == 800
    # A new store (a restarted hub) counts the same from disk.
    assert await Store(tmp_path / "backup").used(repo.root) == 800


async def test_a_missing_file_is_reported_as_such(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    for call in (lambda: repo.size("keys", "a" * 64), lambda: repo.delete("keys", "a" * 64)):
        with pytest.raises(OutpostError) as caught:
            call()
        assert _code(caught) == "E9065"
    with pytest.raises(OutpostError) as caught:
        await repo.read("keys", "a" * 64)
    assert _code(caught) == "E9065"


def test_listings_leave_out_temporary_and_foreign_files(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    repo.create()
    (repo.root / "keys" / ("c" * 64)).write_bytes(b"k")
    (repo.root / "keys" / ".tmp-cccc-1234").write_bytes(b"partial")
    (repo.root / "keys" / "README").write_bytes(b"x")
    assert repo.listing("keys") == [{"name": "c" * 64, "size": 1}]
