"""Fixtures: a real hub process on SQLite or PostgreSQL, and real agent processes; and the
fast tier's hub in this process (``fast_hub``, ``fast_hub_any``: tests/inproc.py).

PostgreSQL tests use the server at 127.0.0.1:5432 (user postgres, trust auth), each in a
database created for it and dropped after (``module_hub``: one for the module). Where no
PostgreSQL answers they skip with the reason, except under CI=true, where a missing
PostgreSQL fails the run.

A hub's database (``database_url``, ``sqlite_hub``, ``fast_hub_any``) starts as a copy of one
migrated once per test process, so a test does not pay for the migrations; ``module_hub``,
``empty_database_url`` and ``postgres_url`` start empty, and the hubs on them run the
migrations themselves, on both databases.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests import zygote
from tests.inproc import Clock, InprocHub, running_hub
from tests.support import (PG_ADMIN, Agent, Hub, config_home, init_hub, migrate_outside_loop,
                           migrated_sqlite, shared_dir)

# The processes the tests start fork from a zygote (tests/zygote.py) unless
# OUTPOST_TEST_ZYGOTE=0, the one OUTPOST_* variable kept here (the xdist workers inherit
# this process's environment; clean_env leaves it out of the processes under test).
zygote.activate()
for _name in [k for k in os.environ if k.startswith("OUTPOST_") and k != zygote.SWITCH]:
    del os.environ[_name]
# Commands run in this process (CliRunner) keep their profiles away from ~/.config too.
os.environ["XDG_CONFIG_HOME"] = config_home()

_pg_error: str | None = None
_pg_checked = False


def _postgres_problem() -> str | None:
    global _pg_error, _pg_checked
    if not _pg_checked:
        _pg_checked = True
        try:
            import psycopg

            with psycopg.connect(PG_ADMIN, connect_timeout=3):
                pass
        except Exception as exc:
            _pg_error = f"PostgreSQL at 127.0.0.1:5432 did not answer: {exc}"
    return _pg_error


def require_postgres() -> None:
    problem = _postgres_problem()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{problem} (CI=true: the PostgreSQL tests may not be skipped)")
        pytest.skip(problem)


_pg_template: str | None = None


def _postgres_template() -> str:
    """A database this test process migrated once to the newest revision, empty otherwise (no
    account seeded), dropped when the process ends: the template of ``migrated`` ones."""
    global _pg_template
    if _pg_template is None:
        import atexit

        import psycopg

        from outpost.hub import db

        name = f"outpost_tpl_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

        def drop() -> None:
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

        atexit.register(drop)
        migrate_outside_loop(db.migrate_sync, f"postgresql://postgres@127.0.0.1:5432/{name}")
        _pg_template = name
    return _pg_template


@contextlib.contextmanager
def postgres_database(migrated: bool = False) -> Iterator[str]:
    """The URL of a PostgreSQL database created for the caller and dropped after: empty, or
    with ``migrated`` at the newest revision (a copy of a template migrated once per test
    process: PostgreSQL copies it in a fraction of the seconds its migrations take; the hub
    started on it finds the schema current and seeds its account)."""
    require_postgres()
    import psycopg

    name = f"outpost_t_{uuid.uuid4().hex[:12]}"
    template = f' TEMPLATE "{_postgres_template()}"' if migrated else ""
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{template}')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A freshly created PostgreSQL database, empty, dropped after the test."""
    with postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new empty database, SQLite then PostgreSQL (for the migrations themselves)."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return f"sqlite:///{tmp_path / 'empty.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The hub's database, SQLite then PostgreSQL: new, at the newest revision, no account
    in it yet (the hub seeds its own as it starts)."""
    if request.param == "postgres":
        with postgres_database(migrated=True) as url:
            yield url
        return
    yield migrated_sqlite(tmp_path / "hub-under-test.db")


@pytest.fixture
def hub_dir(tmp_path: Path) -> Path:
    return tmp_path / "hub"


@pytest.fixture
def new_hub(hub_dir: Path, database_url: str) -> Iterator[Hub]:
    """An initialised hub, not started yet (the test may add arguments first)."""
    hub = init_hub(hub_dir, database_url)
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture
def hub(new_hub: Hub) -> Hub:
    """A running hub on the database of the test's parameter."""
    return new_hub.start()


@pytest.fixture(scope="module")
def module_sqlite_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """One running hub on SQLite for the whole module (its tests share it)."""
    root = tmp_path_factory.mktemp("module-sqlite-hub")
    hub = init_hub(root / "hub", migrated_sqlite(root / "hub.db"))
    try:
        yield hub.start()
    finally:
        hub.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def module_hub(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """One running hub per module and database, shared by the module's tests that use it:
    for tests that look at the hub's answers and leave nothing another of them reads (each
    still starts from what it needs, not from an empty hub)."""
    root = tmp_path_factory.mktemp("module-hub")
    with contextlib.ExitStack() as stack:
        url = (stack.enter_context(postgres_database()) if request.param == "postgres"
               else f"sqlite:///{root / 'hub.db'}")
        hub = init_hub(root / "hub", url)
        try:
            yield hub.start()
        finally:
            hub.stop()


@pytest.fixture
def sqlite_hub(tmp_path: Path) -> Iterator[Hub]:
    """A running hub on SQLite only, for tests of what happens on the machine."""
    hub = init_hub(tmp_path / "hub", migrated_sqlite(tmp_path / "hub.db"))
    try:
        yield hub.start()
    finally:
        hub.stop()


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory the test and its runbooks (run as job users) may both write."""
    with shared_dir() as path:
        yield path


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    """Agents started by the test go here and are stopped after it."""
    started: list[Agent] = []
    try:
        yield started
    finally:
        for agent in started:
            agent.stop()


# --- the fast tier: the hub's app in this process (tests/inproc.py) ---------------------
@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def fast_hub(tmp_path: Path, anyio_backend: str) -> AsyncIterator[InprocHub]:
    """The hub's app in this process on a new SQLite database, its lifespan running."""
    async with running_hub(tmp_path) as hub:
        yield hub


@pytest.fixture(params=["sqlite", "postgres"])
async def fast_hub_any(request: pytest.FixtureRequest, tmp_path: Path,
                       anyio_backend: str) -> AsyncIterator[InprocHub]:
    """``fast_hub`` on SQLite, then on a new PostgreSQL database."""
    with contextlib.ExitStack() as stack:
        url = (stack.enter_context(postgres_database(migrated=True))
               if request.param == "postgres" else None)
        async with running_hub(tmp_path, url) as hub:
            yield hub


@pytest.fixture
def hub_clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Moves the process's ``time.time`` forward on ``advance(seconds)`` (leases, ages)."""
    return Clock(lambda fake: monkeypatch.setattr(time, "time", fake))
