"""The backup store: one restic repository per machine, on the hub's file system, and the
credentials that open them.

A repository lives in ``<data_dir>/backup/<account_id>/<machine_id>/`` in restic's own
layout: ``config``, ``keys/``, ``locks/``, ``snapshots/``, ``index/`` and ``data/xx/``
(the first two hex digits of a data file's name), so a copy of the directory is a
repository restic opens directly (``restic -r /path/to/it``).

What the store promises restic (docs/backup.md):

- A file appears whole or not at all: it is written to a temporary file in its directory,
  fsynced, renamed into place, and the directory fsynced. A request cut short leaves nothing.
- A file is never replaced. Every file but ``config`` is named by the SHA-256 of its
  content, which the store checks as the body streams in (E9063); a second upload of the
  same name therefore carries the same bytes and is answered as done.
- Names are checked before any path is built (E9062): a type restic knows and 64
  lower-case hex digits, so no request reaches outside its repository.
- The bytes a repository holds are bounded by its machine's quota (E9064), when one is set.

Credentials: each machine has at most one backup token (``obk_...``); the hub keeps its
SHA-256 only (``backup_credentials``). A request carries it as ``Bearer`` (the bridge) or
as HTTP Basic's password with the machine id as user name (restic's own REST backend).
Issuing a new one retires the old at once. A restore grant (``obg_...``,
``backup_grants``) opens another machine's repository read-only (every read, and restic's
locks) for one restore operation, while it runs.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import os
import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from outpost.protocol.errors import OutpostError, entry

from . import machines
from .db import backup_credentials, backup_grants, extension_operations
from .db import machines as machine_rows
from .vault import token_hash

T = TypeVar("T")
TYPES = ("data", "keys", "locks", "snapshots", "index")
NAME_RE = re.compile(r"^[0-9a-f]{64}$")
ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
TOKEN_PREFIX = "obk_"
GRANT_PREFIX = "obg_"
# Bodies are written to disk in pieces of this size, each in a worker thread: the event loop
# never waits on the disk, and a GiB body costs a few hundred thread hops, not thousands.
WRITE_CHUNK = 1024 * 1024
READ_CHUNK = 1024 * 1024
# A range of at most this many bytes is read in the same worker-thread call that opens the
# file, and answered whole (restic's trees, indexes, keys and snapshots are all smaller).
WHOLE_READ = 1024 * 1024
# The most pieces one writev takes (POSIX guarantees 16; Linux takes 1024).
IOV_MAX = 512


@dataclass(frozen=True)
class Credential:
    """Whose repository a valid backup token opens."""

    machine_id: str
    account_id: str
    quota_bytes: int | None
    read_only: bool = False  # a restore grant: reads, and restic's locks

    def check_write(self, method: str, kind: str) -> None:
        """E9114 for a change a read-only credential may not make."""
        if self.read_only and method in ("POST", "DELETE") and kind != "locks":
            raise refusal("backup_grant_read_only", machine_id=self.machine_id)


def refusal(key: str, **details: Any) -> OutpostError:
    """The catalog entry ``key`` with its message's values filled in from ``details``."""
    return OutpostError(key, entry(key).message.format(**details), **details)


# --- credentials --------------------------------------------------------------------------
def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


async def issue_token(engine: AsyncEngine, account_id: str, machine: str,
                      quota_bytes: int | None = None) -> dict[str, Any]:
    """A new backup token for one machine of the account (by name or id), replacing any it
    had; the token is returned this once. ``quota_bytes`` (None: the hub's default) is kept
    with it."""
    if quota_bytes is not None and quota_bytes < 0:
        raise OutpostError("invalid_request", f"quota_bytes must be 0 (unlimited) or more, "
                           f"not {quota_bytes}.", fix="Send a quota in bytes, or leave it out "
                           "for the hub's default.", field="quota_bytes")
    row = await machines.find(engine, account_id, machine)
    token, now = new_token(), time.time()
    async with engine.begin() as conn:
        await conn.execute(backup_credentials.delete().where(
            backup_credentials.c.machine_id == row.id))
        await conn.execute(backup_credentials.insert().values(
            machine_id=row.id, account_id=row.account_id, token_hash=token_hash(token),
            quota_bytes=quota_bytes, created_at=now))
    return {"machine": row.name, "machine_id": row.id, "token": token,
            "repository": f"/v1/backup/{row.id}/", "quota_bytes": quota_bytes,
            "created_at": now}


def presented_token(authorization: str | None, machine_id: str) -> str:
    """The token an ``Authorization`` header carries for the repository of ``machine_id``:
    ``Bearer TOKEN``, or HTTP Basic with the machine id as user name and the token as
    password (restic's own REST backend, RESTIC_REST_USERNAME and RESTIC_REST_PASSWORD).
    E9060 for no token or a header of another form; E9061 for a user name that is not the
    path's machine id. The token is never part of a refusal."""
    scheme, _, value = (authorization or "").partition(" ")
    scheme, value = scheme.lower(), value.strip()
    if scheme == "bearer":
        return value
    if scheme != "basic":
        raise refusal("backup_token_invalid", machine_id=machine_id)
    try:
        user, colon, token = base64.b64decode(value, validate=True).decode().partition(":")
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        raise refusal("backup_token_invalid", machine_id=machine_id) from None
    if not colon:
        raise refusal("backup_token_invalid", machine_id=machine_id)
    if user != machine_id:
        shown = user if len(user) <= 64 else user[:64] + "..."
        raise OutpostError("backup_forbidden", "This backup credential is for another "
                           f"machine's repository: the user name {shown!r} is not the "
                           f"machine id {machine_id} the path names.", machine_id=machine_id,
                           user=shown)
    return token


async def authorize(engine: AsyncEngine, authorization: str | None,
                    machine_id: str) -> Credential:
    """The credential of a backup token (``Bearer``, or HTTP Basic with the machine id as
    user name), for the repository of ``machine_id``: E9060 (401) without a valid token,
    E9061 (403) when it is another machine's."""
    token = presented_token(authorization, machine_id)
    if token.startswith(GRANT_PREFIX):
        return await _granted(engine, token, machine_id)
    if not token.startswith(TOKEN_PREFIX):
        raise refusal("backup_token_invalid", machine_id=machine_id)
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(backup_credentials).where(
            backup_credentials.c.token_hash == token_hash(token)))).first()
    if row is None:
        raise refusal("backup_token_invalid", machine_id=machine_id)
    if row.machine_id != machine_id:
        raise refusal("backup_forbidden", machine_id=machine_id)
    return Credential(row.machine_id, row.account_id, row.quota_bytes)


@dataclass
class Reading:
    """What a GET of a file answers: ``length`` bytes from ``start`` of a file of ``size``
    bytes, either read (``data``) or to stream from an open file (``fh``)."""

    size: int
    start: int
    length: int
    ranged: bool
    data: bytes | None = None
    fh: BinaryIO | None = None


def _pread(fd: int, start: int, length: int) -> bytes:
    parts, offset, end = [], start, start + length
    while offset < end:
        part = os.pread(fd, end - offset, offset)
        if not part:
            break  # shorter than its size said: truncated meanwhile (not by this store)
        parts.append(part)
        offset += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


# --- paths ----------------------------------------------------------------------------------
async def authorize_any(engine: AsyncEngine, token: str) -> Credential:
    """The credential of a machine's own backup token, whichever machine (E9060)."""
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(backup_credentials).where(
            backup_credentials.c.token_hash == token_hash(token)))).first()
    if row is None:
        raise refusal("backup_token_invalid", machine_id="(unknown)")
    return Credential(row.machine_id, row.account_id, row.quota_bytes)


async def _granted(engine: AsyncEngine, token: str, machine_id: str) -> Credential:
    """A restore grant: valid while its operation runs and before it expires."""
    g, ops = backup_grants, extension_operations
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(g, ops.c.status).join(
            ops, ops.c.id == g.c.op_id).where(g.c.token_hash == token_hash(token)))).first()
    if row is None or row.status != "Running" or row.expires_at < time.time():
        raise refusal("backup_token_invalid", machine_id=machine_id)
    if row.source_machine_id != machine_id:
        raise refusal("backup_forbidden", machine_id=machine_id)
    return Credential(row.source_machine_id, row.account_id, None, read_only=True)


# The operations that read another machine's repository through a grant: (extension, name).
GRANTED = (("backup", "restore"), ("recovery", "recover"))


async def issue_grant(engine: AsyncEngine, holder: Credential,
                      ttl: float = 86400.0) -> dict[str, Any]:
    """A read-only grant to the source repository of the operation that reads another
    machine's repository on the holder's machine: the backup extension's ``restore`` or the
    recovery extension's ``recover`` with a ``source_machine_id`` (E9116 when none runs, its
    source is not of the same account, or its grant was issued already: one per operation)."""
    def refused(problem: str) -> OutpostError:
        return OutpostError("backup_grant_refused", "No restore grant for this machine: "
                            f"{problem}.", problem=problem)

    if holder.read_only:
        raise refused("a grant does not lead to another")
    ops = extension_operations
    async with engine.begin() as conn:
        running = (await conn.execute(sa.select(ops).where(
            ops.c.machine_id == holder.machine_id, ops.c.status == "Running",
            sa.or_(*(sa.and_(ops.c.extension == extension, ops.c.operation == operation)
                     for extension, operation in GRANTED))))).all()
        reading = [r for r in running if (r.params or {}).get("source_machine_id")]
        if not reading:
            raise refused("no restore (backup) or recover (recovery) from another machine's "
                          "repository runs on it")
        issued = {r.op_id for r in (await conn.execute(sa.select(backup_grants.c.op_id).where(
            backup_grants.c.op_id.in_([r.id for r in reading])))).all()}
        # A backup restore and a recovery may run at once: the one without its grant yet.
        op = next((r for r in reading if r.id not in issued), reading[0])
        source_id = str(op.params["source_machine_id"])
        source = (await conn.execute(sa.select(machine_rows).where(
            machine_rows.c.id == source_id))).first()
        if source is None or source.account_id != op.account_id:
            raise refused(f"the source machine {source_id} is not a machine of its account")
        if op.id in issued:
            raise refused(f"the grant of operation {op.id} was issued already")
        token, now = GRANT_PREFIX + secrets.token_urlsafe(32), time.time()
        await conn.execute(backup_grants.insert().values(
            token_hash=token_hash(token), op_id=op.id, account_id=op.account_id,
            machine_id=holder.machine_id, source_machine_id=source.id, created_at=now,
            expires_at=now + ttl))
    return {"token": token, "machine_id": source.id, "machine": source.name, "op_id": op.id,
            "expires_at": now + ttl}


def invalid_path(path: str) -> OutpostError:
    return OutpostError("backup_path_invalid", f"Not a path of a restic repository: {path}.",
                        path=path)


def check_machine_id(machine_id: str) -> None:
    if not ID_RE.match(machine_id):
        raise invalid_path(f"/v1/backup/{machine_id}/")


def check_type(kind: str) -> None:
    if kind not in TYPES:
        raise invalid_path(f"{kind}/")


def check_name(kind: str, name: str) -> None:
    check_type(kind)
    if not NAME_RE.match(name):
        raise invalid_path(f"{kind}/{name}")


def parse_range(header: str, size: int, kind: str = "", name: str = ""
                ) -> tuple[int, int] | None:
    """The (start, end inclusive) of one ``bytes=`` range within ``size`` bytes; None for
    no header. A range past the end or of another form is E9067 (416)."""
    if not header:
        return None
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    start = end = -1
    if match and (match.group(1) or match.group(2)):
        if match.group(1):
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else size - 1
        else:  # the last N bytes
            start, end = max(size - int(match.group(2)), 0), size - 1
    if start == 0 and size == 0:
        return None  # the whole of an empty file
    if start < 0 or start >= size or end < start:
        raise refusal("backup_range_invalid", range=header, size=size, type=kind, name=name)
    return start, min(end, size - 1)


# --- the store ------------------------------------------------------------------------------
def _storage_failed(exc: OSError) -> OutpostError:
    what = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else str(exc)
    return refusal("backup_storage_failed", problem=what)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _tree_size(root: Path) -> int:
    total = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            if name.startswith(".tmp-"):
                continue  # an upload under way, or left by a hub that was killed
            try:
                total += os.stat(os.path.join(folder, name)).st_size
            except FileNotFoundError:
                pass
    return total


class Repository:
    """One machine's repository directory."""

    def __init__(self, store: Store, root: Path) -> None:
        self.store = store
        self.root = root

    def path(self, kind: str, name: str) -> Path:
        """Where a file lives (its type and name checked already)."""
        if kind == "config":
            return self.root / "config"
        if kind == "data":
            return self.root / "data" / name[:2] / name
        return self.root / kind / name

    def create(self) -> None:
        """The directories of an empty repository (kept as they are when it exists)."""
        try:
            for kind in TYPES:
                (self.root / kind).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _storage_failed(exc) from exc

    def size(self, kind: str, name: str) -> int:
        try:
            return self.path(kind, name).stat().st_size
        except FileNotFoundError:
            raise refusal("backup_file_missing", type=kind, name=name) from None

    def listing(self, kind: str) -> list[dict[str, Any]]:
        """The files of one type, with their sizes (temporary files are not listed)."""
        folder = self.root / kind
        found: list[dict[str, Any]] = []
        if not folder.is_dir():
            return found
        folders = sorted(p for p in folder.iterdir() if p.is_dir()) if kind == "data" \
            else [folder]
        for where in folders:
            with os.scandir(where) as entries:
                for entry in entries:
                    if NAME_RE.match(entry.name) and entry.is_file(follow_symlinks=False):
                        try:
                            found.append({"name": entry.name, "size": entry.stat().st_size})
                        except FileNotFoundError:
                            pass  # deleted while listed
        return found

    async def read(self, kind: str, name: str, range_header: str = "") -> Reading:
        """The bytes of a file that ``range_header`` asks for (all of it without one): read
        at once when they are at most WHOLE_READ, else the file left open for ``pieces``.
        One trip to a worker thread either way: restic's restore asks for its trees one
        small range at a time, each waiting for the last. Once open, a file's bytes stay
        readable whole even when a delete removes its name meanwhile."""
        return await asyncio.to_thread(self._read, kind, name, range_header)

    def _read(self, kind: str, name: str, range_header: str) -> Reading:
        try:
            fh = open(self.path(kind, name), "rb")  # noqa: SIM115 - closed here or by pieces
        except FileNotFoundError:
            raise refusal("backup_file_missing", type=kind, name=name) from None
        kept = False
        try:
            size = os.fstat(fh.fileno()).st_size
            wanted = parse_range(range_header, size, kind, name)
            start, end = wanted if wanted is not None else (0, size - 1)
            reading = Reading(size, start, end - start + 1, wanted is not None)
            if reading.length <= WHOLE_READ:
                reading.data = _pread(fh.fileno(), start, reading.length)
            else:
                reading.fh, kept = fh, True
            return reading
        finally:
            if not kept:
                fh.close()

    @staticmethod
    async def pieces(fh: BinaryIO, start: int, length: int) -> AsyncGenerator[bytes, None]:
        """``length`` bytes of an opened file from ``start``, in pieces; closes it."""
        try:
            offset, end = start, start + length
            while offset < end:
                piece = await asyncio.to_thread(os.pread, fh.fileno(),
                                                min(READ_CHUNK, end - offset), offset)
                if not piece:
                    return
                offset += len(piece)
                yield piece
        finally:
            fh.close()  # a descriptor opened for reading: closing it does not wait on the disk

    def delete(self, kind: str, name: str) -> None:
        path = self.path(kind, name)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            raise refusal("backup_file_missing", type=kind, name=name) from None
        except OSError as exc:
            raise _storage_failed(exc) from exc
        self.store.used_changed(self.root, -size)

    async def save(self, kind: str, name: str, body: AsyncIterator[bytes],
                   declared: int | None, quota: int) -> int:
        """Store a file from a streamed body: whole and checked, or not at all. Returns
        its size. ``quota`` 0 is unlimited."""
        path = self.path(kind, name)
        used = await self.store.used(self.root) if quota else 0
        if quota and declared is not None and used + declared > quota:
            raise refusal("backup_quota_exceeded", machine_id=self.root.name,
                          quota=quota, used=used)
        try:
            await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
            fd, temp = await asyncio.to_thread(_temp_file, path)
        except OSError as exc:
            raise _storage_failed(exc) from exc
        digest = hashlib.sha256()
        written = 0
        kept = False
        try:
            pending: list[bytes] = []
            pending_size = 0
            async for chunk in body:
                written += len(chunk)
                if quota and used + written > quota:
                    raise refusal("backup_quota_exceeded", machine_id=self.root.name,
                                  quota=quota, used=used)
                pending.append(chunk)
                pending_size += len(chunk)
                if pending_size >= WRITE_CHUNK:
                    await _on_disk(_hash_and_write, digest, fd, pending)
                    pending, pending_size = [], 0
            if pending:
                await _on_disk(_hash_and_write, digest, fd, pending)
            if kind != "config" and digest.hexdigest() != name:
                raise refusal("backup_blob_mismatch", type=kind, name=name,
                              actual=digest.hexdigest())
            closing, fd = fd, -1  # _settle closes it, whatever happens
            kept = await _on_disk(_settle, closing, temp, path, kind == "config")
        finally:
            if fd >= 0:
                os.close(fd)
            if not kept:
                _remove(temp)
        if kept:
            self.store.used_changed(self.root, written)
        elif kind == "config":
            raise refusal("backup_file_exists", type=kind, name=name)
        return written


async def _on_disk(call: Callable[..., T], *args: Any) -> T:
    """``call(*args)`` in a worker thread; a failure of the file system is E9068 (an error
    of the body's own stream, such as the client leaving, passes as it is)."""
    try:
        return await asyncio.to_thread(call, *args)
    except OSError as exc:
        raise _storage_failed(exc) from exc


def _temp_file(path: Path) -> tuple[int, Path]:
    temp = path.parent / f".tmp-{path.name[:16]}-{secrets.token_hex(8)}"
    return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), temp


def _hash_and_write(digest: Any, fd: int, pieces: list[bytes]) -> None:
    """Hashed in the worker thread that writes it: hashlib lets go of the GIL for a large
    buffer, so the event loop goes on meanwhile (the pieces of one body are written one
    after another, so the digest sees them in order). The pieces are written as they came
    (one writev), not joined: a copy of every byte less."""
    for piece in pieces:
        digest.update(piece)
    views = [memoryview(piece) for piece in pieces]
    while views:
        written = os.writev(fd, views[:IOV_MAX])
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _settle(fd: int, temp: Path, path: Path, exclusive: bool) -> bool:
    """fsync, close and move the temporary file into place; False (the temporary file left
    to remove) when the file exists already. A file named by its content's hash that exists
    holds these bytes: that upload is done. Only ``config`` (``exclusive``) differs."""
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if path.exists():
        return False
    if exclusive:
        # link() fails where the name is taken: two concurrent first configs cannot both win.
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
        temp.unlink()
    else:
        os.rename(temp, path)
    _fsync_dir(path.parent)
    return True


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


class Store:
    """Every machine's repository under ``root`` (``<data_dir>/backup``), and the bytes each
    holds (counted once from disk when a quota first needs it, then kept up to date)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._used: dict[Path, int] = {}
        self._counting: dict[Path, asyncio.Lock] = {}

    def repository(self, credential: Credential) -> Repository:
        check_machine_id(credential.machine_id)
        return Repository(self, self.root / credential.account_id / credential.machine_id)

    async def used(self, root: Path) -> int:
        """The bytes the repository at ``root`` holds."""
        if root not in self._used:
            lock = self._counting.setdefault(root, asyncio.Lock())
            async with lock:
                if root not in self._used:
                    self._used[root] = await asyncio.to_thread(_tree_size, root)
        return self._used[root]

    def used_changed(self, root: Path, delta: int) -> None:
        if root in self._used:
            self._used[root] += delta
