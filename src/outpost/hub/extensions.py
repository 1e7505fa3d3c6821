"""Extensions on the hub: published packages, the goals operators set per group or machine,
and what an agent is told to have.

A package is published once per version and account (``publish``); its bytes are kept in
the database every replica shares, and a version never changes. A goal says which
extension a group or a machine (by name, so it survives the machine registering again)
should have: a version (None: the newest published), public settings, protected settings
(sealed by the vault here, and sealed again to the machine's own key when its agent fetches
them), enabled or not, and the user its handlers run as. For one machine, its own goal for
an extension overrides its group's.

Every agent learns whether its goals changed from its heartbeat's ``extensions_etag``: a
fleet of 10,000 agents sends 333 heartbeats a second, so the etag comes from ``GoalCache``,
each account's goals held in memory and dropped when any replica changes them (notify,
"extensions", in ``extension_goals``); ``GoalCache.TTL`` bounds what a lost notification
costs.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import jsonschema
import sqlalchemy as sa
from nacl.public import SealedBox
from nacl.signing import VerifyKey
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from outpost.protocol import extpackage
from outpost.protocol.errors import OutpostError
from outpost.protocol.extensions import MANIFEST_NAME, ExtensionGoal, ExtensionGoals, Manifest
from outpost.protocol.signing import b64, unb64

from . import notify, packages
from .config import random_id
from .db import extension_goals, extension_packages, extension_retries, machines
from .extension_goals import Goal, GoalCache, Published, load, version_key
from .groups import USER_RE
from .machines import target_name, wake_named
from .vault import Vault

log = logging.getLogger("outpost.hub.extensions")

TARGET_KINDS = ("group", "machine")
# Extensions that write into the machine's one restic repository on the hub: a goal of one
# that has no password of its own takes the other's for the same target (docs/recovery.md).
SHARED_REPOSITORY = ("backup", "recovery")


def seal_to_machine(public_key: str, plaintext: bytes) -> str:
    """``plaintext`` sealed so that only the machine holding the Ed25519 key whose public
    half is ``public_key`` (base64, as registered) opens it."""
    curve = VerifyKey(unb64(public_key)).to_curve25519_public_key()
    return b64(SealedBox(curve).encrypt(plaintext))


def _context(account_id: str, name: str, kind: str, target: str) -> str:
    # The vault's associated data: a sealed value copied onto another goal does not open.
    return f"extension:{account_id}:{name}:{kind}:{target}"


# --- settings against the manifest's schemas ------------------------------------------------

def _check_schemas(manifest: Manifest) -> None:
    for field_name in ("settings_schema", "protected_settings_schema"):
        schema = getattr(manifest, field_name)
        if schema is None:
            continue
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            where = ".".join(str(p) for p in exc.absolute_path)
            at = f" at {where}" if where else ""
            raise OutpostError(
                "ext_package_invalid", f"The extension package is not valid: "
                f"{MANIFEST_NAME}: {field_name}: not a valid JSON Schema{at} "
                f"({exc.message}).", problem=f"{field_name}: not a valid JSON Schema") from None


# Messages of these validators name properties only, never a value: safe for secrets.
_NAMES_ONLY = ("required", "additionalProperties", "dependentRequired", "propertyNames")


def check_settings(schema: dict[str, Any] | None, value: dict[str, Any], *, field_name: str,
                   name: str, version: str, secret: bool) -> None:
    """E9006 naming the first field of ``value`` that ``schema`` refuses; for protected
    settings (``secret``) without quoting any value."""
    if schema is None:
        return
    validator = jsonschema.validators.validator_for(schema)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return
    where = ".".join([field_name, *(str(p) for p in error.absolute_path)])
    if secret and error.validator not in _NAMES_ONLY:
        problem = (f"{where}: does not satisfy '{error.validator}' "
                   f"({json.dumps(error.validator_value)})")
    else:
        problem = f"{where}: {error.message}"
    what = "protected settings" if secret else "settings"
    raise OutpostError(
        "ext_settings_invalid", f"The {what} of extension {name} {version} do not satisfy "
        f"its schema: {problem}.", field=where, name=name, version=version)


# --- the operator's side --------------------------------------------------------------------

def goal_view(goal: Goal, newest: Published | None) -> dict[str, Any]:
    return {"name": goal.name, "target_kind": goal.kind, "target": goal.target,
            "version": goal.version,
            "resolved_version": goal.version or (newest.version if newest else None),
            "settings": goal.settings, "protected": goal.protected is not None,
            "enabled": goal.enabled, "run_as": goal.run_as, "seq": goal.seq,
            "updated_at": goal.updated_at}


class Extensions:
    """Publishing, goals, and what agents fetch; one per hub process."""

    def __init__(self, engine: AsyncEngine, vault: Vault,
                 held: packages.HeldPackages | None = None) -> None:
        self.engine = engine
        self.vault = vault
        self.cache = GoalCache(engine)
        # Packages served to agents, by SHA-256, shared with module packages (hub/packages):
        # a fleet that updates at once reads each package from the database once.
        self.held = held or packages.HeldPackages()
        self.package_reads = 0  # reads of a package's bytes from the database, for tests

    async def _changed(self, conn: AsyncConnection, account_id: str) -> None:
        """Inside the change's transaction: every replica drops the account's goals."""
        await notify.invalidate(conn, "extensions", account_id)

    # --- packages ---------------------------------------------------------------------
    async def publish(self, account_id: str, data: bytes) -> tuple[dict[str, Any], bool]:
        """Store a package; (its info, True) when new, (its info, False) when that version
        was already published with the same bytes. E9000/E9002 for a bad package, E9003
        for a version published with other bytes."""
        package = extpackage.read(data)
        manifest = package.manifest
        _check_schemas(manifest)

        def other_bytes(row: Any) -> OutpostError:
            return OutpostError(
                "ext_version_exists", f"Extension {manifest.name} {manifest.version} is "
                f"already published with other content (SHA-256 {row.sha256}, not "
                f"{package.sha256}).", name=manifest.name, version=manifest.version,
                published_sha256=row.sha256, sha256=package.sha256)

        info, created = await packages.store(
            self.engine, extension_packages, account_id, data, package,
            other_bytes=other_bytes, changed=lambda conn: self._changed(conn, account_id))
        if created:
            self.cache.forget(account_id)
            log.info("extension %s %s published in account %s (sha256 %s, %d bytes)",
                     manifest.name, manifest.version, account_id, package.sha256,
                     package.size)
        return info, created

    async def listing(self, account_id: str) -> list[dict[str, Any]]:
        """Each extension of the account: its versions (oldest first) and the newest."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(sa.select(
                extension_packages.c.name, extension_packages.c.version,
                extension_packages.c.published_at, extension_packages.c.manifest).where(
                extension_packages.c.account_id == account_id))).all()
        by_name: dict[str, list[Any]] = {}
        for row in rows:
            by_name.setdefault(row.name, []).append(row)
        found = []
        for name in sorted(by_name):
            versions = sorted(by_name[name], key=lambda r: version_key(r.version))
            newest = versions[-1]
            found.append({"name": name, "newest": newest.version,
                          "versions": [r.version for r in versions],
                          "published_at": newest.published_at,
                          "description": (newest.manifest or {}).get("description", "")})
        return found

    async def show(self, account_id: str, name: str) -> dict[str, Any]:
        """One extension: every version, and the goals that name it."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(sa.select(
                *[c for c in extension_packages.c if c.name != "blob"]).where(
                extension_packages.c.account_id == account_id,
                extension_packages.c.name == name))).all()
            goals = await load(conn, account_id)
        if not rows:
            raise OutpostError("ext_not_found", f"No extension '{name}' is published in "
                               "this account.", name=name)
        rows = sorted(rows, key=lambda r: version_key(r.version))
        versions = [{"version": r.version, "sha256": r.sha256, "size": int(r.size),
                     "min_agent_version": r.manifest.get("min_agent_version", "0.0.0"),
                     "operations": sorted(r.manifest.get("operations") or {}),
                     "description": r.manifest.get("description", ""),
                     "published_at": r.published_at} for r in rows]
        newest = goals.newest.get(name)
        shown = [goal_view(g, newest) for target in sorted(goals.by_target)
                 for n, g in goals.by_target[target].items() if n == name]
        return {"name": name, "newest": rows[-1].version, "versions": versions,
                "goals": shown}

    # --- goals ------------------------------------------------------------------------
    async def _target(self, conn: AsyncConnection, account_id: str, kind: str,
                      target: str) -> str:
        """The name a goal is stored under: a machine's name (given its name or id), or a
        group's name; E9007 when the account has no such machine or group."""
        name = await target_name(conn, account_id, kind, target)
        if name is None:
            raise OutpostError("ext_target_unknown", f"Cannot set an extension on {kind} "
                               f"'{target}': this account has none by that name.",
                               kind=kind, target=target)
        return str(name)

    async def _manifests(self, conn: AsyncConnection, account_id: str,
                         name: str) -> dict[str, Manifest]:
        rows = (await conn.execute(sa.select(
            extension_packages.c.version, extension_packages.c.manifest).where(
            extension_packages.c.account_id == account_id,
            extension_packages.c.name == name))).all()
        if not rows:
            raise OutpostError("ext_not_found", f"No extension '{name}' is published in "
                               "this account.", name=name)
        return {r.version: Manifest.model_validate(r.manifest) for r in rows}

    def _open(self, account_id: str, name: str, kind: str, target: str,
              sealed: str) -> bytes:
        try:
            return self.vault.open(sealed, _context(account_id, name, kind, target))
        except Exception as exc:  # InvalidTag, or a value that is no vault seal at all
            raise OutpostError(
                "ext_protected_unreadable", f"The protected settings of extension {name} "
                f"for {kind} '{target}' cannot be opened.", name=name, kind=kind,
                target=target) from exc

    async def _sibling_password(self, conn: AsyncConnection, account_id: str, name: str,
                                kind: str, target: str) -> str | None:
        """The repository password of the other extension of ``SHARED_REPOSITORY`` for the
        same target, sealed for ``name``'s goal; None when it has none."""
        for other in SHARED_REPOSITORY:
            if other == name:
                continue
            sealed = await conn.scalar(sa.select(extension_goals.c.protected).where(
                extension_goals.c.account_id == account_id, extension_goals.c.name == other,
                extension_goals.c.target_kind == kind, extension_goals.c.target == target))
            if sealed is None:
                continue
            password = json.loads(self._open(account_id, other, kind, target, sealed)).get(
                "repository_password")
            if isinstance(password, str) and password:
                return self.vault.seal(json.dumps({"repository_password": password}).encode(),
                                       _context(account_id, name, kind, target))
        return None

    async def set_goal(self, account_id: str, name: str, kind: str, target: str,
                       changes: dict[str, Any]) -> dict[str, Any]:
        """Create or change the goal of extension ``name`` for a group or machine. Only
        the fields in ``changes`` change (``version`` None: the newest version;
        ``protected_settings`` None: none); the result is checked against the manifest of
        the version it resolves to."""
        if kind not in TARGET_KINDS:
            raise OutpostError("invalid_request", f"'{kind}' is not a kind of target.",
                               fix="Use group or machine.")
        run_as = changes.get("run_as")
        if run_as is not None and not USER_RE.match(run_as):
            raise OutpostError("invalid_request", f"'{run_as}' is not a valid user name.",
                               fix="Give a user name such as 'backup' (lower-case letters, "
                                   "digits, '_', '-', '.'; at most 32 characters).",
                               field="run_as")
        for _attempt in range(3):  # two operators racing to create the same goal
            try:
                async with self.engine.begin() as conn:
                    view = await self._set_goal(conn, account_id, name, kind, target,
                                                changes)
                break
            except IntegrityError:
                continue
        else:
            raise OutpostError("conflict", f"Could not set extension {name} for {kind} "
                               f"'{target}'; try again.")
        self.cache.forget(account_id)
        if kind == "machine":
            await self._wake(account_id, view["target"])
        log.info("extension %s set for %s '%s' in account %s (seq %d)", name, kind,
                 view["target"], account_id, view["seq"])
        return view

    async def _set_goal(self, conn: AsyncConnection, account_id: str, name: str, kind: str,
                        target: str, changes: dict[str, Any]) -> dict[str, Any]:
        manifests = await self._manifests(conn, account_id, name)
        target = await self._target(conn, account_id, kind, target)
        mine = sa.and_(extension_goals.c.account_id == account_id,
                       extension_goals.c.name == name, extension_goals.c.target_kind == kind,
                       extension_goals.c.target == target)
        old = (await conn.execute(sa.select(extension_goals).where(mine))).first()
        version = changes["version"] if "version" in changes else (old.version if old else None)
        if version is not None and version not in manifests:
            raise OutpostError("ext_version_not_found", f"Extension {name} has no version "
                               f"{version}.", name=name, version=version,
                               published=sorted(manifests, key=version_key))
        resolved = version or max(manifests, key=version_key)
        manifest = manifests[resolved]
        settings = changes.get("settings") if "settings" in changes else (
            old.settings if old else None)
        settings = settings or {}
        check_settings(manifest.settings_schema, settings, field_name="settings", name=name,
                       version=resolved, secret=False)
        context = _context(account_id, name, kind, target)
        if "protected_settings" in changes:
            protected = changes["protected_settings"]
            sealed = None if protected is None else self.vault.seal(
                json.dumps(protected).encode(), context)
        else:
            sealed = old.protected if old else None
            if sealed is None and name in SHARED_REPOSITORY:
                sealed = await self._sibling_password(conn, account_id, name, kind, target)
            protected = (None if sealed is None else
                         json.loads(self._open(account_id, name, kind, target, sealed)))
        if protected is not None:
            check_settings(manifest.protected_settings_schema, protected,
                           field_name="protected_settings", name=name, version=resolved,
                           secret=True)
        if changes.get("enabled") is not None:
            enabled = bool(changes["enabled"])
        else:
            enabled = bool(old.enabled) if old else True
        run_as = changes["run_as"] if "run_as" in changes else (old.run_as if old else None)
        # Greater than any goal's of this extension in the account: a machine that moves
        # from its group's goal to its own sees its number change.
        seq = int(await conn.scalar(sa.select(sa.func.max(extension_goals.c.seq)).where(
            extension_goals.c.account_id == account_id,
            extension_goals.c.name == name)) or 0) + 1
        now = time.time()
        values = {"version": version, "settings": settings, "protected": sealed,
                  "enabled": enabled, "run_as": run_as, "seq": seq, "updated_at": now}
        if old is not None:
            await conn.execute(extension_goals.update().where(mine).values(**values))
        else:
            await conn.execute(extension_goals.insert().values(
                id=random_id(), account_id=account_id, name=name, target_kind=kind,
                target=target, **values))
        await self._changed(conn, account_id)
        goal = Goal(name, kind, target, version, settings, sealed, enabled, run_as, seq, now)
        newest = manifests[max(manifests, key=version_key)]
        return {**goal_view(goal, Published(name, newest.version, "", 0)),
                "created": old is None}

    async def remove_goal(self, account_id: str, name: str, kind: str,
                          target: str) -> dict[str, Any]:
        """Remove a goal: the machines it applied to uninstall the extension (or fall back
        to their group's goal)."""
        async with self.engine.begin() as conn:
            stored = await conn.scalar(sa.select(extension_goals.c.target).where(
                extension_goals.c.account_id == account_id, extension_goals.c.name == name,
                extension_goals.c.target_kind == kind, sa.or_(
                    extension_goals.c.target == target,
                    extension_goals.c.target == sa.select(machines.c.name).where(
                        machines.c.account_id == account_id,
                        machines.c.id == target).scalar_subquery())))
            if stored is None:
                raise OutpostError("ext_goal_not_found", f"Extension {name} has no goal for "
                                   f"{kind} '{target}'.", name=name, kind=kind,
                                   target=target)
            await conn.execute(extension_goals.delete().where(
                extension_goals.c.account_id == account_id, extension_goals.c.name == name,
                extension_goals.c.target_kind == kind, extension_goals.c.target == stored))
            await self._changed(conn, account_id)
        self.cache.forget(account_id)
        if kind == "machine":
            await self._wake(account_id, stored)
        log.info("extension %s removed from %s '%s' in account %s", name, kind, stored,
                 account_id)
        return {"name": name, "target_kind": kind, "target": stored, "removed": True}

    async def retry(self, account_id: str, machine: Any, name: str) -> dict[str, Any]:
        """Let ``machine`` try a version that failed there again (its retry counter
        grows, and with it the goal the agent sees)."""
        async with self.engine.begin() as conn:
            goals = await load(conn, account_id)
            if not any(r.goal.name == name for r in goals.resolve(machine)):
                raise OutpostError("ext_goal_not_found", f"Extension {name} has no goal for "
                                   f"machine '{machine.name}'.", name=name, kind="machine",
                                   target=machine.name)
            key = sa.and_(extension_retries.c.machine_id == machine.id,
                          extension_retries.c.name == name)
            count = await conn.scalar(sa.select(extension_retries.c.retry).where(key))
            if count is None:
                count = 1
                await conn.execute(extension_retries.insert().values(
                    machine_id=machine.id, name=name, retry=count))
            else:
                count = int(count) + 1
                await conn.execute(extension_retries.update().where(key).values(retry=count))
            await self._changed(conn, account_id)
        self.cache.forget(account_id)
        notify.of(self.engine).wake_committed(notify.machine(machine.id))
        log.info("extension %s: retry %d asked on machine %s", name, count, machine.name)
        return {"name": name, "machine": machine.name, "machine_id": machine.id,
                "retry": count}

    # --- the agent's side -------------------------------------------------------------
    async def _wake(self, account_id: str, machine_name: str) -> None:
        """A machine's own goal changed (committed, and the account's goals dropped): its
        agent's long-poll answers at once with the new etag (routes/agents.py), so the change
        reaches the machine in milliseconds rather than at its next heartbeat. A group's goal
        is left to each machine's heartbeat, which spreads a fleet's goal fetches and
        downloads over a heartbeat interval instead of all at once."""
        await wake_named(self.engine, account_id, machine_name)

    async def etag(self, machine: Any) -> str:
        """The heartbeat's ``extensions_etag`` for ``machine``: no database read while the
        account's goals are held."""
        return (await self.cache.get(machine.account_id)).etag(machine)

    async def goals_for(self, machine: Any) -> ExtensionGoals:
        """What ``machine`` should have, its protected settings sealed to its key."""
        goals = await self.cache.get(machine.account_id)
        found = []
        for r in goals.resolve(machine):
            goal = r.goal
            protected = None
            if goal.protected is not None:
                plain = self._open(machine.account_id, goal.name, goal.kind, goal.target,
                                   goal.protected)
                protected = seal_to_machine(machine.public_key, plain)
            found.append(ExtensionGoal(
                name=goal.name, version=r.package.version, sha256=r.package.sha256,
                size=r.package.size, enabled=goal.enabled, seq=goal.seq,
                settings=goal.settings, protected=protected, run_as=goal.run_as,
                retry=r.retry))
        return ExtensionGoals(etag=goals.etag(machine), goals=found)

    async def package_for(self, machine: Any, name: str, version: str) -> tuple[bytes, str]:
        """The bytes and SHA-256 of a package one of ``machine``'s goals names; E9009
        for any other (another account's included)."""
        goals = await self.cache.get(machine.account_id)
        named = [r.package for r in goals.resolve(machine)
                 if r.package.name == name and r.package.version == version]
        if not named:
            raise OutpostError("ext_package_not_assigned", f"This machine has no goal "
                               f"naming extension {name} {version}.", name=name,
                               version=version)
        held = self.held.get(named[0].sha256)
        if held is not None:
            return held, named[0].sha256
        found = await packages.read_bytes(self.engine, extension_packages, self.held,
                                          machine.account_id, name, version)
        if found is None:  # held goals older than a removal
            raise OutpostError("ext_package_not_assigned", f"This machine has no goal "
                               f"naming extension {name} {version}.", name=name,
                               version=version)
        self.package_reads += 1
        return found
