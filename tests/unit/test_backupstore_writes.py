"""How the backup store writes a body (hub/backupstore.py): the pieces the server hands
over are hashed and written as they came, however many and however small."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from outpost.hub.backupstore import IOV_MAX, WRITE_CHUNK, Credential, Store

pytestmark = [pytest.mark.anyio]

MACHINE = "6f1c2a9e-0b7d-4e3a-9c51-2d8f0e4b7a10"
ACCOUNT = "0d9b3c1a-5e2f-4a7b-8c6d-1e0f2a3b4c5d"


async def _body(pieces: list[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


@pytest.mark.parametrize("size", [100, 65536, 300_000])
async def test_a_body_is_stored_whole_whatever_its_pieces(tmp_path: Path, size: int) -> None:
    repo = Store(tmp_path / "backup").repository(Credential(MACHINE, ACCOUNT, None))
    repo.create()
    data = os.urandom(2 * WRITE_CHUNK + 5000)
    name = hashlib.sha256(data).hexdigest()
    pieces = [data[i:i + size] for i in range(0, len(data), size)]
    if size == 100:  # more pieces within one write than one writev takes
        assert WRITE_CHUNK // size > IOV_MAX
    assert await repo.save("data", name, _body(pieces), None, 0) == len(data)
    assert repo.path("data", name).read_bytes() == data
    assert not list(repo.root.rglob(".tmp-*"))
