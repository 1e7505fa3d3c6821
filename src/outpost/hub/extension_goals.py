"""Each account's extension goals, held in memory: what answers the heartbeats' etags.

``AccountGoals`` is one account's goals, its packages (without their bytes) and its
machines' retry counters, as ``load`` reads them; ``resolve(machine)`` says which goal
applies to a machine for each extension (its own, else its group's; a goal without a
version follows the newest, by ``version_key``). ``GoalCache`` keeps one per account until a
change from any replica drops it (notify, "extensions"), or ``TTL`` seconds at most.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from . import notify
from .db import extension_goals, extension_holds, extension_packages, extension_retries, machines

_VERSION_PARTS = re.compile(r"^(\d+(?:\.\d+)*)(?:([-+])(.*))?$")


def version_key(version: str) -> tuple[Any, ...]:
    """Orders versions as people read them: 1.10 after 1.9, and 1.0-rc1 before 1.0."""
    match = _VERSION_PARTS.match(version)
    if match is None:
        return ((), 0, version)
    numbers = tuple(int(p) for p in match.group(1).split("."))
    numbers += (0,) * (4 - len(numbers))
    return (numbers, 0 if match.group(2) == "-" else 1, match.group(3) or "")


@dataclass(frozen=True)
class Goal:
    name: str
    kind: str
    target: str
    version: str | None
    settings: dict[str, Any]
    protected: str | None  # sealed by the vault
    enabled: bool
    run_as: str | None
    seq: int
    updated_at: float


@dataclass(frozen=True)
class Published:
    name: str
    version: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Resolved:
    """The goal that applies to one machine for one extension, and its package."""

    goal: Goal
    package: Published
    retry: int


@dataclass
class AccountGoals:
    """One account's goals, packages (without their bytes) and machines' retry counters."""

    by_target: dict[tuple[str, str], dict[str, Goal]] = field(default_factory=dict)
    packages: dict[tuple[str, str], Published] = field(default_factory=dict)
    newest: dict[str, Published] = field(default_factory=dict)
    retries: dict[tuple[str, str], int] = field(default_factory=dict)
    # (machine id, name): uninstalled from that machine until its next operation
    holds: set[tuple[str, str]] = field(default_factory=set)
    loaded_at: float = 0.0
    _etags: dict[str, str] = field(default_factory=dict)

    def resolve(self, machine: Any, *, held: bool = False) -> list[Resolved]:
        """The goals that apply to ``machine`` (a machines row), by extension name: its own
        goal, else its group's; a goal whose version is not published is skipped, and so is
        one held back for the machine (uninstalled there) unless ``held``."""
        own = self.by_target.get(("machine", machine.name), {})
        group = self.by_target.get(("group", machine.group_name), {})
        found = []
        for name in sorted(set(own) | set(group)):
            if not held and (machine.id, name) in self.holds:
                continue  # uninstalled there by the operator (extension_ops.hold)
            goal = own.get(name) or group[name]
            package = (self.packages.get((name, goal.version)) if goal.version
                       else self.newest.get(name))
            if package is not None:
                found.append(Resolved(goal, package,
                                      self.retries.get((machine.id, name), 0)))
        return found

    def etag(self, machine: Any) -> str:
        """A digest of what the machine should have; '' when nothing applies."""
        known = self._etags.get(machine.id)
        if known is not None:
            return known
        resolved = self.resolve(machine)
        etag = ""
        if resolved:
            text = json.dumps([[r.goal.name, r.package.sha256, r.goal.seq, r.retry,
                                r.goal.enabled, r.goal.run_as] for r in resolved])
            etag = hashlib.sha256(text.encode()).hexdigest()[:32]
        self._etags[machine.id] = etag
        return etag


async def load(conn: AsyncConnection, account_id: str) -> AccountGoals:
    found = AccountGoals(loaded_at=time.monotonic())
    rows = await conn.execute(sa.select(extension_goals).where(
        extension_goals.c.account_id == account_id))
    for r in rows:
        found.by_target.setdefault((r.target_kind, r.target), {})[r.name] = Goal(
            r.name, r.target_kind, r.target, r.version, r.settings or {}, r.protected,
            bool(r.enabled), r.run_as, int(r.seq), r.updated_at)
    rows = await conn.execute(sa.select(
        extension_packages.c.name, extension_packages.c.version, extension_packages.c.sha256,
        extension_packages.c.size).where(extension_packages.c.account_id == account_id))
    for r in rows:
        package = Published(r.name, r.version, r.sha256, int(r.size))
        found.packages[(r.name, r.version)] = package
        newest = found.newest.get(r.name)
        if newest is None or version_key(r.version) > version_key(newest.version):
            found.newest[r.name] = package
    rows = await conn.execute(
        sa.select(extension_retries).join(machines, machines.c.id == extension_retries.c.machine_id)
        .where(machines.c.account_id == account_id))
    for r in rows:
        found.retries[(r.machine_id, r.name)] = int(r.retry)
    rows = await conn.execute(
        sa.select(extension_holds).join(machines, machines.c.id == extension_holds.c.machine_id)
        .where(machines.c.account_id == account_id))
    found.holds = {(r.machine_id, r.name) for r in rows}
    return found


T = TypeVar("T")


class AccountCache(Generic[T]):
    """Each account's value as ``loader`` reads it, kept until a change (from any replica,
    notified as ``kind``) drops it, or for ``TTL`` seconds at most. Concurrent callers for
    an account not held share one read. Extension goals and deployments both use it."""

    TTL = 30.0
    MAX_ACCOUNTS = 10_000

    def __init__(self, engine: AsyncEngine,
                 loader: Callable[[AsyncConnection, str], Awaitable[T]],
                 kind: notify.Kind) -> None:
        self._engine = engine
        self._loader = loader
        self._kind: notify.Kind = kind
        self._held: dict[str, tuple[float, T]] = {}
        self._loading: dict[str, asyncio.Future[T]] = {}
        self._forgets: dict[str, int] = {}
        self.loads = 0  # reads of the database, for tests

    def forget(self, account_id: str) -> None:
        """Drop an account's value (``notify.ALL``: every account's)."""
        if account_id == notify.ALL:
            self._held.clear()
            self._loading.clear()
            self._forgets = {k: v + 1 for k, v in self._forgets.items()}
            return
        self._held.pop(account_id, None)
        self._loading.pop(account_id, None)
        self._forgets[account_id] = self._forgets.get(account_id, 0) + 1

    def follow(self, notifier: notify.Notifier) -> None:
        notifier.on_invalidate(self._kind, self.forget)

    async def get(self, account_id: str) -> T:
        held = self._held.get(account_id)
        if held is not None and time.monotonic() - held[0] < self.TTL:
            return held[1]
        loading = self._loading.get(account_id)
        if loading is None or loading.get_loop() is not asyncio.get_running_loop():
            loading = asyncio.ensure_future(self._load(account_id))
            loading.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._loading[account_id] = loading
        return await asyncio.shield(loading)

    async def _load(self, account_id: str) -> T:
        forgets = self._forgets.get(account_id, 0)
        loaded_at = time.monotonic()
        try:
            async with self._engine.connect() as conn:
                found = await self._loader(conn, account_id)
            self.loads += 1
        finally:
            if self._loading.get(account_id) is asyncio.current_task():
                del self._loading[account_id]
        # A read that a change overtook (forgotten meanwhile) answers its callers but is
        # not kept: it may predate the change's commit.
        if forgets == self._forgets.get(account_id, 0):
            if len(self._held) >= self.MAX_ACCOUNTS:
                self._held.clear()
            self._held[account_id] = (loaded_at, found)
        return found


class GoalCache(AccountCache[AccountGoals]):
    """Each account's ``AccountGoals`` (notified as "extensions")."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine, load, "extensions")
