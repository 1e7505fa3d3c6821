"""SQLite's log checkpointed off the event loop (hub/walcheck.py): the hub's connection never
checkpoints on commit, and the Checkpointer copies the log back from a worker thread."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest
import sqlalchemy as sa

from outpost.hub import db, walcheck

ROUND = 2 * 1024 * 1024  # bytes written per round


async def _write_rounds(path: Path, rounds: int, check: bool) -> tuple[list[int], int]:
    engine = db.make_engine(f"sqlite:///{path}", checkpoint_off_loop=True)
    checkpointer = engine.checkpointer
    assert isinstance(checkpointer, walcheck.Checkpointer)
    sizes = []
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)"))
            auto = (await conn.execute(sa.text("PRAGMA wal_autocheckpoint"))).scalar()
            assert auto == 0  # commits never checkpoint in the caller's thread
        for _ in range(rounds):
            async with engine.begin() as conn:
                await conn.execute(sa.text("INSERT INTO t (v) VALUES (:v)"),
                                   [{"v": os.urandom(4096)} for _ in range(ROUND // 4096)])
            if check:
                await checkpointer.check()
            sizes.append(os.stat(f"{path}-wal").st_size)
        return sizes, checkpointer.checkpoints
    finally:
        await engine.dispose()
        checkpointer.close()


def test_the_log_grows_without_the_checkpointer_and_stays_bounded_with_it(
        tmp_path: Path) -> None:
    grown, none = asyncio.run(_write_rounds(tmp_path / "a.db", 6, check=False))
    assert none == 0
    assert grown[-1] > 5 * ROUND  # nothing checkpointed it: the commits did not
    bounded, ran = asyncio.run(_write_rounds(tmp_path / "b.db", 6, check=True))
    assert ran >= 5
    # Once copied back, the log is written again from its start: the file stops growing at
    # about the checkpoint's threshold plus a round.
    assert max(bounded) < 3 * ROUND, bounded
    assert bounded[-1] == bounded[2], bounded


def test_a_small_log_is_left_alone_and_the_data_reads_back(tmp_path: Path) -> None:
    async def main() -> None:
        engine = db.make_engine(f"sqlite:///{tmp_path / 'c.db'}", checkpoint_off_loop=True)
        checkpointer = engine.checkpointer
        try:
            async with engine.begin() as conn:
                await conn.execute(sa.text("CREATE TABLE t (v TEXT)"))
                await conn.execute(sa.text("INSERT INTO t VALUES ('kept')"))
            assert await checkpointer.check() is False  # far below PAGES pages
            checkpointer.pages = 1
            assert await checkpointer.check() is True
            async with engine.connect() as conn:
                assert (await conn.execute(sa.text("SELECT v FROM t"))).scalar() == "kept"
        finally:
            await engine.dispose()
            checkpointer.close()

    asyncio.run(main())


def test_other_engines_keep_sqlite_s_own_checkpoints(tmp_path: Path) -> None:
    async def main() -> None:
        engine = db.make_engine(f"sqlite:///{tmp_path / 'd.db'}")
        try:
            assert engine.checkpointer is None
            async with engine.connect() as conn:
                auto = (await conn.execute(sa.text("PRAGMA wal_autocheckpoint"))).scalar()
            assert auto == walcheck.PAGES
        finally:
            await engine.dispose()

    asyncio.run(main())


def test_a_checkpoint_that_fails_is_logged_once_and_tried_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "e.db"
    checkpointer = walcheck.Checkpointer(str(path), pages=0)
    Path(f"{path}-wal").write_bytes(b"x")  # a log to look at
    path.mkdir()  # the database's path is a directory: SQLite cannot open it

    async def main() -> None:
        with caplog.at_level(logging.WARNING, logger="outpost.hub"):
            assert await checkpointer.check() is False
            assert await checkpointer.check() is False
        path.rmdir()
        assert await checkpointer.check() is True  # the file is back: it runs again

    asyncio.run(main())
    checkpointer.close()
    warned = [r.message for r in caplog.records if "could not be checkpointed" in r.message]
    assert len(warned) == 1, warned
