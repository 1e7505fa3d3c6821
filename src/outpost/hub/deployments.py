"""Deployments on the hub: module packages, the deployments operators aim at groups and
machines, what each agent is told to run, and what it reports (docs/modules.md).

A **module package** is published once per version and account, as an extension package is
(``packages.store``: immutable versions, the bytes in the shared database, served to agents
through the per-replica ``HeldPackages``).

A **deployment** is a manifest (``protocol.modules``) aimed at a group or one machine (by
name) with a priority. Creating one checks the manifest (E9150 names field, line and column)
and pins every package it names to a published version and its SHA-256 (E9153 otherwise);
creating an existing name replaces it and bumps its version. A machine runs the
highest-priority deployment that targets it (by its own name or its group); between equal
priorities the most recently updated wins, then the name.

Every agent learns whether its deployment changed from its heartbeat's ``deployment_etag``:
each account's deployments are held in memory (``AccountCache``, notify "deployments") and
dropped in the transaction of every change, so a heartbeat reads nothing.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from outpost.protocol import extpackage
from outpost.protocol import modules as mp
from outpost.protocol.errors import OutpostError
from outpost.protocol.extensions import NAME_RE

from . import notify, packages
from .config import random_id
from .db import deployments, machines, module_packages, module_reports
from .extension_goals import AccountCache, version_key
from .machines import target_name, wake_named

log = logging.getLogger("outpost.hub.deployments")

TARGET_KINDS = ("group", "machine")


@dataclass(frozen=True)
class Deployment:
    id: str
    name: str
    kind: str
    target: str
    priority: int
    version: int
    manifest: dict[str, Any]  # as validated, every package pinned
    created_at: float
    updated_at: float

    def targets(self, machine: Any) -> bool:
        return (self.kind == "machine" and self.target == machine.name) or \
            (self.kind == "group" and self.target == machine.group_name)

    @property
    def etag(self) -> str:
        return hashlib.sha256(f"{self.id}:{self.version}:{self.updated_at!r}".encode()
                              ).hexdigest()[:32]

    def packages(self) -> list[tuple[str, str, str]]:
        """(name, version, sha256) of every package the manifest names."""
        found = []
        for spec in (self.manifest.get("modules") or {}).values():
            ref = spec.get("package")
            if ref:
                found.append((ref["name"], ref["version"], ref["sha256"]))
        return found


def _order(d: Deployment) -> tuple[int, float, str]:
    # Highest priority first; then the most recently updated; then the name (stable).
    return (-d.priority, -d.updated_at, d.name)


@dataclass
class AccountDeployments:
    """One account's deployments (without the operator's text), as ``load`` reads them."""

    items: list[Deployment] = field(default_factory=list)
    _resolved: dict[tuple[str, str, str], Deployment | None] = field(default_factory=dict)

    def targeting(self, machine: Any) -> list[Deployment]:
        """The deployments that target ``machine``, the one it runs first."""
        return sorted((d for d in self.items if d.targets(machine)), key=_order)

    def resolve(self, machine: Any) -> Deployment | None:
        key = (machine.id, machine.name, machine.group_name)
        if key not in self._resolved:
            found = self.targeting(machine)
            self._resolved[key] = found[0] if found else None
        return self._resolved[key]

    def etag(self, machine: Any) -> str:
        """'' when no deployment targets the machine."""
        found = self.resolve(machine)
        return found.etag if found is not None else ""


async def load(conn: AsyncConnection, account_id: str) -> AccountDeployments:
    rows = await conn.execute(sa.select(
        *[c for c in deployments.c if c.name != "source"]).where(
        deployments.c.account_id == account_id))
    return AccountDeployments([Deployment(
        r.id, r.name, r.target_kind, r.target, int(r.priority), int(r.version), r.manifest,
        r.created_at, r.updated_at) for r in rows])


def _not_found(name: str) -> OutpostError:
    return OutpostError("deployment_not_found", f"No deployment '{name}' in this account.",
                        name=name)


def _forbidden(name: str, version: str) -> OutpostError:
    return OutpostError(
        "module_package_forbidden", f"403: this machine's deployment does not name module "
        f"package {name} {version}. Check the package's name and version in the deployment "
        "manifest, and that it is published in this account ('outpost module list').",
        name=name, version=version)


def _ago(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def _reason(key: str, message: str) -> dict[str, Any]:
    error = OutpostError(key, message)
    return {"code": error.code, "reason": error.reason, "message": message}


def module_ok(module: dict[str, Any]) -> bool:
    """Whether a reported module is as its deployment wants it."""
    return bool(module.get("state") == module.get("desired", "running"))


class Deployments:
    """Module packages, deployments, and what agents fetch and report; one per hub."""

    def __init__(self, engine: AsyncEngine, held: packages.HeldPackages) -> None:
        self.engine = engine
        self.held = held
        self.cache: AccountCache[AccountDeployments] = AccountCache(engine, load,
                                                                    "deployments")
        self.package_reads = 0  # reads of a package's bytes from the database, for tests

    async def _changed(self, conn: AsyncConnection, account_id: str) -> None:
        """Inside the change's transaction: every replica drops the account's deployments."""
        await notify.invalidate(conn, "deployments", account_id)

    # --- module packages --------------------------------------------------------------
    async def publish(self, account_id: str, data: bytes) -> tuple[dict[str, Any], bool]:
        """Store a module package: (its info, True) when new, (its info, False) when that
        version was already published with the same bytes. E9000 for a bad package, E9151
        for a version published with other bytes."""
        package = extpackage.read(data, kind="module")
        manifest = package.manifest

        def other_bytes(row: Any) -> OutpostError:
            return OutpostError(
                "module_version_exists", f"Module package {manifest.name} "
                f"{manifest.version} is already published with other content (SHA-256 "
                f"{row.sha256}, not {package.sha256}).", name=manifest.name,
                version=manifest.version, published_sha256=row.sha256,
                sha256=package.sha256)

        async def nothing(_conn: AsyncConnection) -> None:
            """A new package changes no deployment: each pins its versions."""

        info, created = await packages.store(self.engine, module_packages, account_id, data,
                                             package, other_bytes=other_bytes,
                                             changed=nothing)
        if created:
            log.info("module package %s %s published in account %s (sha256 %s, %d bytes)",
                     manifest.name, manifest.version, account_id, package.sha256,
                     package.size)
        return info, created

    @staticmethod
    def _package_row(row: Any) -> dict[str, Any]:
        manifest = row.manifest or {}
        return {"name": row.name, "version": row.version, "sha256": row.sha256,
                "size": int(row.size), "published_at": row.published_at,
                "description": manifest.get("description", ""),
                "run": (manifest.get("run") or {}).get("run", "")}

    async def _published(self, conn: AsyncConnection, account_id: str,
                         name: str | None = None) -> list[Any]:
        query = sa.select(*[c for c in module_packages.c if c.name != "blob"]).where(
            module_packages.c.account_id == account_id)
        if name is not None:
            query = query.where(module_packages.c.name == name)
        return list((await conn.execute(query)).all())

    async def packages(self, account_id: str) -> list[dict[str, Any]]:
        """Every published version of the account, the newest published first."""
        async with self.engine.connect() as conn:
            rows = await self._published(conn, account_id)
        rows.sort(key=lambda r: (-r.published_at, r.name))
        return [self._package_row(r) for r in rows]

    async def versions(self, account_id: str, name: str) -> dict[str, Any]:
        """One package's versions, the newest (by version) first; E9152 when none."""
        async with self.engine.connect() as conn:
            rows = await self._published(conn, account_id, name)
        if not rows:
            raise OutpostError("module_not_found", f"No module package '{name}' is "
                               "published in this account.", name=name)
        rows.sort(key=lambda r: version_key(r.version), reverse=True)
        return {"name": name, "newest": rows[0].version,
                "versions": [self._package_row(r) for r in rows]}

    # --- deployments ------------------------------------------------------------------
    async def _target(self, conn: AsyncConnection, account_id: str, kind: str,
                      target: str) -> str:
        name = await target_name(conn, account_id, kind, target)
        if name is None:
            raise OutpostError("deployment_target_unknown", f"Cannot aim a deployment at "
                               f"{kind} '{target}': this account has none by that name.",
                               kind=kind, target=target)
        return str(name)

    @staticmethod
    def _check(text: str) -> tuple[mp.DeploymentManifest, dict[tuple[Any, ...], mp.Position]]:
        """The manifest in ``text``, or E9150 with every problem in ``details.problems``."""
        try:
            data, positions = mp.parse_document(text)
            manifest, _routes = mp.validate_manifest(data, positions)
        except OutpostError as exc:
            if exc.reason == "deployment_invalid" and "problems" not in exc.details:
                exc.details["problems"] = [{k: exc.details.get(k) for k in
                                            ("field", "problem", "line", "column")}]
            raise
        return manifest, positions

    @staticmethod
    def _pin(manifest: mp.DeploymentManifest, positions: dict[tuple[Any, ...], mp.Position],
             published: list[Any]) -> dict[str, Any]:
        """The manifest as JSON with every package pinned to a published version and its
        SHA-256; E9153 naming the first that is not published (and where it is)."""
        by_name: dict[str, dict[str, Any]] = {}
        for row in published:
            by_name.setdefault(row.name, {})[row.version] = row
        pinned = manifest.model_dump(mode="json")
        for module, spec in manifest.modules.items():
            ref = spec.package
            if ref is None:
                continue
            versions = by_name.get(ref.name, {})
            version = ref.version or (max(versions, key=version_key) if versions else None)
            row = versions.get(version) if version is not None else None
            if row is None or (ref.sha256 is not None and ref.sha256 != row.sha256):
                where = positions.get(("modules", module, "package", "version")) or \
                    positions.get(("modules", module, "package"))
                at = f" (line {where[0]}, column {where[1]})" if where else ""
                if row is None and ref.version is None:
                    what = f"module package {ref.name}"
                    why = "no version of it is published in this account"
                elif row is None:
                    what = f"module package {ref.name} {ref.version}"
                    why = ("it is not published in this account" if not versions else
                           "that version is not published (published: "
                           f"{', '.join(sorted(versions, key=version_key))})")
                else:
                    what = f"module package {ref.name} {version}"
                    why = f"its SHA-256 is {row.sha256}, not {ref.sha256}"
                raise OutpostError(
                    "deployment_package_unknown", f"The deployment names {what} at "
                    f"modules.{module}.package{at}: {why}.", module=module, name=ref.name,
                    version=ref.version, field=f"modules.{module}.package",
                    line=where[0] if where else None, column=where[1] if where else None,
                    published=sorted(versions, key=version_key))
            pinned["modules"][module]["package"] = {"name": ref.name, "version": row.version,
                                                    "sha256": row.sha256}
        return pinned

    async def create(self, account_id: str, name: str, text: str, kind: str, target: str,
                     priority: int) -> dict[str, Any]:
        """Create deployment ``name`` (or replace it: its version grows by one)."""
        if not NAME_RE.match(name):
            raise OutpostError("invalid_request", f"'{name}' is not a deployment name.",
                               fix="Use 1 to 64 lowercase letters, digits, '.', '_' or '-', "
                                   "starting with a letter or digit.", field="name")
        if kind not in TARGET_KINDS:
            raise OutpostError("invalid_request", f"'{kind}' is not a kind of target.",
                               fix="Use group or machine.")
        manifest, positions = self._check(text)
        for _attempt in range(3):  # two operators racing to create the same name
            try:
                async with self.engine.begin() as conn:
                    stored = await self._target(conn, account_id, kind, target)
                    pinned = self._pin(manifest, positions,
                                       await self._published(conn, account_id))
                    mine = sa.and_(deployments.c.account_id == account_id,
                                   deployments.c.name == name)
                    old = (await conn.execute(sa.select(
                        deployments.c.id, deployments.c.version,
                        deployments.c.created_at).where(mine))).first()
                    now = time.time()
                    values = {"target_kind": kind, "target": stored, "priority": priority,
                              "source": text, "manifest": pinned, "updated_at": now}
                    if old is None:
                        version = 1
                        await conn.execute(deployments.insert().values(
                            id=random_id(), account_id=account_id, name=name,
                            version=version, created_at=now, **values))
                    else:
                        version = int(old.version) + 1
                        await conn.execute(deployments.update().where(mine).values(
                            version=version, **values))
                    await self._changed(conn, account_id)
                break
            except IntegrityError:
                continue
        else:
            raise OutpostError("conflict", f"Could not create deployment {name}; try again.")
        self.cache.forget(account_id)
        if kind == "machine":
            await wake_named(self.engine, account_id, stored)  # see extensions._wake
        log.info("deployment %s version %d aimed at %s '%s' (priority %d) in account %s",
                 name, version, kind, stored, priority, account_id)
        return {"name": name, "target_kind": kind, "target": stored, "priority": priority,
                "version": version, "created": old is None,
                "created_at": now if old is None else old.created_at, "updated_at": now,
                "manifest": pinned}

    async def _machines(self, account_id: str) -> list[Any]:
        async with self.engine.connect() as conn:
            return list((await conn.execute(sa.select(
                machines.c.id, machines.c.name, machines.c.group_name).where(
                machines.c.account_id == account_id).order_by(machines.c.name))).all())

    async def listing(self, account_id: str) -> list[dict[str, Any]]:
        held = await self.cache.get(account_id)
        rows = await self._machines(account_id)
        found = []
        for d in sorted(held.items, key=lambda d: d.name):
            targeted = [m for m in rows if d.targets(m)]
            applied = [m for m in targeted if (w := held.resolve(m)) and w.name == d.name]
            found.append({"name": d.name, "target_kind": d.kind, "target": d.target,
                          "priority": d.priority, "version": d.version,
                          "modules": len(d.manifest.get("modules") or {}),
                          "machines": len(targeted), "applied": len(applied),
                          "updated_at": d.updated_at})
        return found

    async def _one(self, account_id: str, name: str) -> tuple[AccountDeployments, Deployment]:
        held = await self.cache.get(account_id)
        for d in held.items:
            if d.name == name:
                return held, d
        raise _not_found(name)

    async def show(self, account_id: str, name: str) -> dict[str, Any]:
        """One deployment: its manifest (as sent and as pinned) and, per targeted machine,
        whether it is the one applied or which higher-priority one wins."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(deployments).where(
                deployments.c.account_id == account_id,
                deployments.c.name == name))).first()
        if row is None:
            raise _not_found(name)
        d = Deployment(row.id, row.name, row.target_kind, row.target, int(row.priority),
                       int(row.version), row.manifest, row.created_at, row.updated_at)
        held = await self.cache.get(account_id)
        shown = []
        for m in await self._machines(account_id):
            if not d.targets(m):
                continue
            winner = held.resolve(m)
            shown.append({"machine": m.name, "machine_id": m.id, "group": m.group_name,
                          "applied": winner is not None and winner.name == d.name,
                          "winner": winner.name if winner is not None else None,
                          "winner_priority": winner.priority if winner is not None else None})
        return {"name": d.name, "target_kind": d.kind, "target": d.target,
                "priority": d.priority, "version": d.version, "created_at": d.created_at,
                "updated_at": d.updated_at, "source": row.source, "manifest": d.manifest,
                "machines": shown}

    async def rollout(self, account_id: str, name: str) -> dict[str, Any]:
        """Per targeted machine: the version it should run against what its agent reported,
        and each module's state."""
        held, d = await self._one(account_id, name)
        targeted = [m for m in await self._machines(account_id) if d.targets(m)]
        async with self.engine.connect() as conn:
            reports = {r.machine_id: r for r in (await conn.execute(
                sa.select(module_reports).where(module_reports.c.machine_id.in_(
                    [m.id for m in targeted])))).all()} if targeted else {}
        found = []
        for m in targeted:
            winner = held.resolve(m)
            report = reports.get(m.id)
            body = (report.report if report is not None else None) or {}
            applied = winner is not None and winner.name == d.name
            reported_version = body.get("version") if body.get("deployment") == d.name else None
            modules = [{k: mod.get(k) for k in (
                "name", "state", "desired", "version", "pid", "exit_code", "restart_count",
                "last_start_at", "last_exit_at", "next_try_at", "healthy", "reason", "code")}
                for mod in body.get("modules") or []] if body.get("deployment") == d.name else []
            if not applied:
                status = "superseded"
            elif reported_version != d.version:
                status = "pending"
            elif body.get("error") or not all(module_ok(mod) for mod in modules):
                status = "failing"
            else:
                status = "applied"
            found.append({
                "machine": m.name, "machine_id": m.id, "group": m.group_name,
                "applied": applied, "winner": winner.name if winner is not None else None,
                "desired_version": d.version if applied else None,
                "reported_deployment": body.get("deployment"),
                "reported_version": body.get("version"), "status": status,
                "error": body.get("error"),
                "fetched_at": report.fetched_at if report is not None else None,
                "reported_at": report.reported_at if report is not None else None,
                "modules": modules,
                # The local message hub's counters, as the agent last reported them.
                "messages": body.get("messages") if body.get("deployment") == d.name else None})
        return {"name": d.name, "version": d.version, "machines": found,
                "complete": all(f["status"] in ("applied", "superseded") for f in found)}

    async def delete(self, account_id: str, name: str) -> dict[str, Any]:
        async with self.engine.begin() as conn:
            mine = sa.and_(deployments.c.account_id == account_id,
                           deployments.c.name == name)
            target = (await conn.execute(sa.select(deployments.c.target_kind,
                                                   deployments.c.target).where(mine))).first()
            gone = await conn.execute(deployments.delete().where(mine))
            if target is None or not gone.rowcount:
                raise _not_found(name)
            await self._changed(conn, account_id)
        self.cache.forget(account_id)
        if target.target_kind == "machine":
            await wake_named(self.engine, account_id, target.target)
        log.info("deployment %s deleted in account %s", name, account_id)
        return {"name": name, "deleted": True}

    # --- the agent's side -------------------------------------------------------------
    async def etag(self, machine: Any) -> str:
        """The heartbeat's ``deployment_etag``: no database read while the account's
        deployments are held."""
        return (await self.cache.get(machine.account_id)).etag(machine)

    async def doc_for(self, machine: Any) -> mp.DeploymentDoc:
        """What ``machine`` runs (its fetch recorded, for ``machine show``)."""
        d = (await self.cache.get(machine.account_id)).resolve(machine)
        await self._record(machine.id, {
            "fetched_at": time.time(), "fetched_deployment": d.name if d else None,
            "fetched_version": d.version if d else None})
        if d is None:
            return mp.DeploymentDoc(etag="")
        return mp.DeploymentDoc(etag=d.etag, deployment=d.name, version=d.version,
                                manifest=mp.DeploymentManifest.model_validate(d.manifest))

    async def package_for(self, machine: Any, name: str, version: str) -> tuple[bytes, str]:
        """The bytes and SHA-256 of a package the machine's deployment names; E9156 (403)
        for any other (another account's included)."""
        d = (await self.cache.get(machine.account_id)).resolve(machine)
        named = [p for p in (d.packages() if d else []) if p[:2] == (name, version)]
        if not named:
            raise _forbidden(name, version)
        held = self.held.get(named[0][2])
        if held is not None:
            return held, named[0][2]
        found = await packages.read_bytes(self.engine, module_packages, self.held,
                                          machine.account_id, name, version)
        if found is None:
            raise _forbidden(name, version)
        self.package_reads += 1
        return found

    async def report(self, machine: Any, body: mp.ModulesReport) -> bool:
        """Keep the machine's report unless the one held is newer; whether it was kept."""
        return await self._record(machine.id, {
            "report": body.model_dump(mode="json"), "reported_at": body.reported_at,
            "received_at": time.time()}, newer_than=body.reported_at)

    async def _record(self, machine_id: str, values: dict[str, Any],
                      newer_than: float | None = None) -> bool:
        key = module_reports.c.machine_id == machine_id
        for _attempt in range(3):
            try:
                async with self.engine.begin() as conn:
                    query = module_reports.update().where(key).values(**values)
                    if newer_than is not None:
                        query = query.where(sa.or_(module_reports.c.reported_at.is_(None),
                                                   module_reports.c.reported_at <= newer_than))
                    if (await conn.execute(query)).rowcount:
                        return True
                    if await conn.scalar(sa.select(sa.func.count()).where(key)):
                        return False  # a newer report is held
                    await conn.execute(module_reports.insert().values(machine_id=machine_id,
                                                                      **values))
                    return True
            except IntegrityError:  # the first two writes of a machine, racing
                continue
        return False

    async def machine_summary(self, machine: Any) -> dict[str, Any]:
        """``machine show``'s ``deployment``: what it should run, what its agent fetched and
        reported, and when none runs, why (ED-11)."""
        d = (await self.cache.get(machine.account_id)).resolve(machine)
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(module_reports).where(
                module_reports.c.machine_id == machine.id))).first()
        body = (row.report if row is not None else None) or {}
        states: dict[str, int] = {}
        for mod in body.get("modules") or []:
            states[mod.get("state", "?")] = states.get(mod.get("state", "?"), 0) + 1
        now = time.time()
        reason = None
        current = d is not None and body.get("deployment") == d.name and \
            body.get("version") == d.version
        if d is None:
            reason = _reason("deployment_none", "No deployment targets this machine.")
        elif body.get("error"):
            reason = _reason("deployment_not_applied", "The agent could not apply the "
                             f"deployment: {body['error']}.")
        elif current:
            reason = None
        elif row is None or row.fetched_at is None:
            reason = _reason("deployment_never_fetched",
                             "The agent has never fetched its deployment.")
        elif row.reported_at is None or (row.received_at or 0) < row.fetched_at:
            reason = _reason(
                "deployment_not_reported", f"The agent last fetched its deployment "
                f"{_ago(now - row.fetched_at)} and has not reported its modules since.")
        return {"name": d.name if d else None, "version": d.version if d else None,
                "priority": d.priority if d else None,
                "fetched_at": row.fetched_at if row is not None else None,
                "fetched_version": row.fetched_version if row is not None else None,
                "reported_deployment": body.get("deployment"),
                "reported_version": body.get("version"),
                "reported_at": row.reported_at if row is not None else None,
                "current": current, "modules": states, "reason": reason}
