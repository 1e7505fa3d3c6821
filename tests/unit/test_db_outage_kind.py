"""Which driver failures are a database outage (E3007, 503) and which are not.

The exceptions are real ones: raised by sqlite3 on a file another connection holds, by the
socket layer, or by SQLAlchemy wrapping them. The outage tests in tests/faults make them with
real servers; this pins the classification of each kind.
"""

from __future__ import annotations

import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from outpost.hub.db import DatabaseUnavailable, outage_kind
from outpost.protocol.errors import OutpostError


def _raised(fn: Callable[[], object]) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the exception is what is looked at
        return exc
    raise AssertionError("nothing was raised")


def test_a_sqlite_file_locked_by_another_connection(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")
    other = sqlite3.connect(path, timeout=0.05)
    try:
        exc = _raised(lambda: other.execute("INSERT INTO t VALUES (1)"))
        assert outage_kind(exc) == "locked"
        wrapped = sa.exc.OperationalError("INSERT", {}, exc)
        assert outage_kind(wrapped) == "locked"
    finally:
        other.close()
        holder.execute("ROLLBACK")
        holder.close()


def test_a_sqlite_file_that_cannot_be_opened(tmp_path: Path) -> None:
    exc = _raised(lambda: sqlite3.connect(tmp_path / "missing-dir" / "db.sqlite"))
    assert outage_kind(exc) == "unreadable"


def test_sqlite_errors_that_do_not_pass_are_not_outages(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "db.sqlite")
    try:
        assert outage_kind(_raised(lambda: conn.execute("SELECT * FROM nowhere"))) is None
        conn.execute("CREATE TABLE t (x UNIQUE)")
        conn.execute("INSERT INTO t VALUES (1)")
        duplicate = _raised(lambda: conn.execute("INSERT INTO t VALUES (1)"))
        assert outage_kind(duplicate) is None
        assert outage_kind(sa.exc.IntegrityError("INSERT", {}, duplicate)) is None
    finally:
        conn.close()
    (tmp_path / "garbage").write_bytes(b"this is not a database at all" * 100)
    garbage = sqlite3.connect(tmp_path / "garbage")
    try:
        assert outage_kind(_raised(lambda: garbage.execute("SELECT 1 FROM t"))) is None
    finally:
        garbage.close()


def test_sockets_refused_reset_and_unresolved() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: refused
    refused = _raised(lambda: socket.create_connection(("127.0.0.1", port), timeout=2))
    assert outage_kind(refused) == "refused"
    assert outage_kind(ConnectionResetError(104, "Connection reset by peer")) == "reset"
    assert outage_kind(TimeoutError()) == "timeout"
    assert outage_kind(socket.gaierror(-2, "Name or service not known")) == "dns"
    assert outage_kind(OSError(113, "No route to host")) == "unreachable"
    assert outage_kind(FileNotFoundError(2, "No such file or directory")) is None


class _PgError(Exception):
    """What asyncpg's errors carry, as SQLAlchemy's asyncpg adapter passes them on."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(("state", "kind"), [
    ("08006", "closed"), ("08003", "closed"), ("57P01", "shutdown"), ("57P03", "shutdown"),
    ("53300", "busy"), ("23505", None), ("42P01", None), ("22P05", None)])
def test_postgresql_states(state: str, kind: str | None) -> None:
    wrapped = sa.exc.DBAPIError("SELECT 1", {}, _PgError(state))
    assert outage_kind(wrapped) == kind


def test_a_connection_sqlalchemy_invalidated_and_an_empty_pool() -> None:
    gone = sa.exc.DBAPIError("SELECT 1", {}, Exception("boom"),
                             connection_invalidated=True)
    assert outage_kind(gone) == "reset"
    assert outage_kind(sa.exc.TimeoutError("QueuePool limit reached")) == "pool"


def test_the_hubs_own_answers_are_never_outages() -> None:
    try:
        try:
            raise ConnectionRefusedError(111, "refused")
        except ConnectionRefusedError:
            raise OutpostError("not_found", "No job 'x'.")  # noqa: B904 - context on purpose
    except OutpostError as exc:
        assert outage_kind(exc) is None
    assert outage_kind(DatabaseUnavailable("locked", "database is locked")) == "locked"
    assert outage_kind(ValueError("bad")) is None


@pytest.mark.anyio
async def test_a_request_that_waits_out_the_pool_is_overload_not_an_outage(
        tmp_path: Path) -> None:
    """The hub's one SQLite connection held past the pool's timeout: the next request is
    answered E3013 (503, Retry-After) and the engine's health records no outage."""
    import asyncio

    from outpost.hub.db import HubOverloaded, make_engine

    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'hub.db'}")
    engine.sync_engine.pool._timeout = 0.2  # type: ignore[attr-defined]
    try:
        async with engine.connect() as held:
            await held.execute(sa.text("SELECT 1"))
            with pytest.raises(HubOverloaded) as raised:
                async with engine.connect() as conn:
                    await conn.execute(sa.text("SELECT 1"))
        assert raised.value.code == "E3013" and raised.value.entry.http_status == 503
        assert isinstance(raised.value, DatabaseUnavailable)  # answered with Retry-After
        assert "waited 0 s for a database connection" in raised.value.message
        assert engine.health.failures == 0 and engine.health.down_since is None
        assert engine.health.by_kind == {"pool": 1}
        async with engine.connect() as conn:  # and it serves again once the load passes
            assert (await conn.execute(sa.text("SELECT 1"))).scalar() == 1
        await asyncio.sleep(0)
    finally:
        await engine.dispose()
