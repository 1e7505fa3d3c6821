"""The hub's choice of event loop (hub/server.py): asyncio's own by default, uvloop when asked
for and it imports, asyncio's where uvloop is missing."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from outpost.hub import server


def test_asyncio_by_default() -> None:
    assert server.RunOptions(data_dir=Path("/nowhere")).event_loop == "asyncio"
    assert server.loop_factory(server.RunOptions(data_dir=Path("/nowhere")).event_loop) == (
        None, "asyncio")


def test_uvloop_when_asked_for_and_installed() -> None:
    import uvloop

    factory, name = server.loop_factory("uvloop")
    assert name == "uvloop" and factory is uvloop.new_event_loop
    loop = factory()
    try:
        assert loop.run_until_complete(asyncio.sleep(0, "ran")) == "ran"
    finally:
        loop.close()


def test_asyncio_when_asked_for() -> None:
    assert server.loop_factory("asyncio") == (None, "asyncio")


def test_asyncio_where_uvloop_cannot_be_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop: ImportError
    assert server.loop_factory("uvloop") == (None, "asyncio")
