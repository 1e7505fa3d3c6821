"""What extension packages and module packages share on the hub: storing a published
version (immutable: the same bytes again change nothing, other bytes are refused) and the
per-replica store of packages served to agents, by SHA-256.

A package's bytes live in the database every replica shares (``extension_packages``,
``module_packages``); a fleet that updates at once reads each package from it once per
replica, through ``HeldPackages``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from outpost.protocol.errors import OutpostError
from outpost.protocol.extpackage import Package

from .config import random_id


class HeldPackages:
    """Packages served to agents, by SHA-256 (a digest names its bytes, whatever the account
    or kind), the least recently served dropped first beyond ``limit`` bytes."""

    def __init__(self, limit: int = 256 * 1024 * 1024) -> None:
        self.limit = limit
        self._held: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0

    def get(self, sha256: str) -> bytes | None:
        held = self._held.get(sha256)
        if held is not None:
            self._held.move_to_end(sha256)
        return held

    def hold(self, sha256: str, data: bytes) -> None:
        if len(data) > self.limit // 4 or sha256 in self._held:
            return
        self._held[sha256] = data
        self._size += len(data)
        while self._size > self.limit:
            _, dropped = self._held.popitem(last=False)
            self._size -= len(dropped)


def package_view(row: Any) -> dict[str, Any]:
    return {"name": row.name, "version": row.version, "sha256": row.sha256,
            "size": int(row.size), "published_at": row.published_at,
            "manifest": row.manifest}


async def store(engine: AsyncEngine, table: sa.Table, account_id: str, data: bytes,
                package: Package, *, other_bytes: Callable[[Any], OutpostError],
                changed: Callable[[AsyncConnection], Awaitable[None]]
                ) -> tuple[dict[str, Any], bool]:
    """Store ``package`` (read from ``data``) in ``table``: (its info, True) when new, (its
    info, False) when that version was already published with the same bytes;
    ``other_bytes(row)`` is raised when it was published with other bytes. ``changed`` runs
    inside the insert's transaction (to notify every replica)."""
    manifest = package.manifest
    mine = sa.and_(table.c.account_id == account_id, table.c.name == manifest.name,
                   table.c.version == manifest.version)
    columns = [c for c in table.c if c.name != "blob"]
    for _attempt in range(3):  # two publishers racing with the same version
        try:
            async with engine.begin() as conn:
                row = (await conn.execute(sa.select(*columns).where(mine))).first()
                if row is not None:
                    if row.sha256 != package.sha256:
                        raise other_bytes(row)
                    return package_view(row), False
                now = time.time()
                await conn.execute(table.insert().values(
                    id=random_id(), account_id=account_id, name=manifest.name,
                    version=manifest.version, sha256=package.sha256, size=package.size,
                    manifest=manifest.model_dump(mode="json"), blob=data, published_at=now))
                await changed(conn)
            return {"name": manifest.name, "version": manifest.version,
                    "sha256": package.sha256, "size": package.size, "published_at": now,
                    "manifest": manifest.model_dump(mode="json")}, True
        except IntegrityError:
            continue
    raise OutpostError("conflict", f"Could not publish {manifest.name} {manifest.version}; "
                       "try again.")


async def read_bytes(engine: AsyncEngine, table: sa.Table, held: HeldPackages,
                     account_id: str, name: str, version: str) -> tuple[bytes, str] | None:
    """A published package's bytes and SHA-256 (from ``held`` when there), or None."""
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(table.c.blob, table.c.sha256).where(
            table.c.account_id == account_id, table.c.name == name,
            table.c.version == version))).first()
    if row is None:
        return None
    data, sha256 = bytes(row.blob), str(row.sha256)
    held.hold(sha256, data)
    return data, sha256
