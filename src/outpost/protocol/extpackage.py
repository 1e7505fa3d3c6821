"""Reading and unpacking an extension or module package: the same checks at publish (the
hub) and before unpacking (the agent), so a bad package never reaches a machine half-way.

The two kinds differ only in the manifest at the archive's root (``outpost-extension.json``,
``outpost-module.json``) and the commands it names; ``kind="module"`` reads the second.

``read(data)`` validates the whole archive in memory and returns its ``Package``;
``unpack(data, dest, expected_sha256)`` checks the digest, validates again, and writes the
files into a fresh directory beside ``dest`` that is renamed into place only when complete
(an existing ``dest`` is left as it was).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

from .errors import OutpostError
from .pkgrules import (
    EXTENSION_MANIFEST, MODULE_MANIFEST, NAME_RE, PACKAGE_MAX_BYTES, PACKAGE_MAX_MEMBERS,
    UNPACKED_MAX_BYTES, check_version, inside_package,
)

if TYPE_CHECKING:
    from pydantic import ValidationError


Kind = Literal["extension", "module"]


@dataclass(frozen=True)
class Package:
    # extensions.Manifest, or modules.ModulePackageManifest for a module; read ``light``,
    # extreaders.Manifest or modreaders.ModulePackageManifest
    manifest: Any
    sha256: str
    size: int
    files: frozenset[str]  # regular files, as paths relative to the package's root
    executables: frozenset[str]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _bad(problem: str, kind: Kind = "extension") -> OutpostError:
    return OutpostError("ext_package_invalid", f"The {kind} package is not valid: "
                        f"{problem}.", problem=problem, package_kind=kind)


def _member_path(name: str) -> str:
    """The member's path relative to the package root, or a refusal naming it."""
    clean = name[2:] if name.startswith("./") else name
    path = PurePosixPath(clean)
    if (not clean or clean.startswith("/") or ".." in path.parts or "\\" in clean
            or "\x00" in clean):
        raise _bad(f"the member '{name}' would unpack outside the package")
    return str(path) if str(path) != "." else ""


def _field(error: ValidationError, manifest_name: str) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(the manifest)"
    return f"{manifest_name}: {where}: {first['msg']}"


def _manifest_name(kind: Kind) -> str:
    return MODULE_MANIFEST if kind == "module" else EXTENSION_MANIFEST


def _validate(raw: Any, kind: Kind, light: bool) -> Any:
    """The manifest in ``raw`` (its pydantic model; with ``light``, as the agent reads it,
    with the same rules and no pydantic: extreaders.Manifest for an extension,
    modreaders.ModulePackageManifest for a module), or E9000 naming the field."""
    name = _manifest_name(kind)
    if kind == "extension" and light:
        return _light_extension(raw, name)
    if kind == "module" and light:
        from .modreaders import ModulePackageManifest
        from .readers import ReadError

        try:
            manifest = ModulePackageManifest.read(raw)
            if not NAME_RE.match(manifest.name):
                raise ValueError(f"name: '{manifest.name}' is not a module package name")
            check_version(manifest.version)
            inside_package(manifest.run.run)
        except (ReadError, ValueError) as exc:
            raise _bad(f"{name}: {exc}", kind) from None
        return manifest
    from pydantic import ValidationError

    if kind == "module":
        from .modules import ModulePackageManifest as Model
    else:
        from .extensions import Manifest as Model  # type: ignore[assignment]
    try:
        return Model.model_validate(raw)
    except ValidationError as exc:
        raise _bad(_field(exc, name), kind) from None


def _light_extension(raw: Any, name: str) -> Any:
    """An extension's manifest as the agent reads it (extreaders.Manifest). What the reader
    refuses goes to the model (``read_lax``), so the agent refuses exactly what the hub
    refuses at publish, with the same words."""
    from .extreaders import Manifest, read_lax

    try:
        return read_lax(Manifest.read, "Manifest", raw)
    except ValueError as exc:
        from pydantic import ValidationError  # loaded by read_lax when it got here

        if isinstance(exc, ValidationError):
            raise _bad(_field(exc, name)) from None
        raise _bad(f"{name}: {exc}") from None  # the reader refused the model's own dump


def _commands(manifest: Any, kind: Kind) -> list[tuple[str, Any]]:
    if kind == "module":
        return [("run", manifest.run)]
    commands = [(f"handlers.{k}", c) for k, c in manifest.handlers.items()]
    return commands + [(f"operations.{k}", c) for k, c in manifest.operations.items()]


def read(data: bytes, kind: Kind = "extension", light: bool = False) -> Package:
    """The package in ``data``, validated; E9000/E9002 naming what is wrong otherwise.
    ``light`` (on the agent): its manifest read without pydantic, with the same rules."""
    manifest_name = _manifest_name(kind)
    if len(data) > PACKAGE_MAX_BYTES:
        raise OutpostError("ext_package_too_large",
                           f"The {kind} package is larger than "
                           f"{PACKAGE_MAX_BYTES // (1024 * 1024)} MiB.",
                           limit=PACKAGE_MAX_BYTES, size=len(data))
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise _bad(f"it is not a gzip-compressed tar archive ({exc})", kind) from None
    files: set[str] = set()
    executables: set[str] = set()
    manifest_bytes: bytes | None = None
    total = 0
    with archive:
        try:
            members = archive.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise _bad(f"the archive is damaged ({exc})", kind) from None
        if len(members) > PACKAGE_MAX_MEMBERS:
            raise _bad(f"it holds {len(members)} members, more than "
                       f"{PACKAGE_MAX_MEMBERS}", kind)
        for member in members:
            path = _member_path(member.name)
            if member.isdir():
                continue
            if not member.isfile():
                what = "a link" if member.issym() or member.islnk() else "not a regular file"
                raise _bad(f"the member '{member.name}' is {what}; a package holds only "
                           "regular files and directories", kind)
            if path in files:
                raise _bad(f"the member '{member.name}' appears twice", kind)
            total += member.size
            if total > UNPACKED_MAX_BYTES:
                raise _bad(f"it unpacks to more than {UNPACKED_MAX_BYTES // (1024 * 1024)} MiB",
                           kind)
            files.add(path)
            if member.mode & 0o111:
                executables.add(path)
            if path == manifest_name:
                handle = archive.extractfile(member)
                manifest_bytes = handle.read() if handle else b""
    if manifest_bytes is None:
        raise _bad(f"{manifest_name} is missing at the archive's root", kind)
    try:
        raw = json.loads(manifest_bytes)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"{manifest_name} is not JSON ({exc})", kind) from None
    manifest = _validate(raw, kind, light)
    for field, command in _commands(manifest, kind):
        run = str(PurePosixPath(command.run))
        if run not in files:
            raise _bad(f"{manifest_name}: {field}.run: '{command.run}' is not a file in the "
                       "package", kind)
        if run not in executables:
            raise _bad(f"{manifest_name}: {field}.run: '{command.run}' is not executable "
                       "(chmod +x it before building the archive)", kind)
    return Package(manifest=manifest, sha256=digest(data), size=len(data),
                   files=frozenset(files), executables=frozenset(executables))


def unpack(data: bytes, dest: Path, expected_sha256: str | None = None,
           kind: Kind = "extension", light: bool = False) -> Package:
    """Check, validate and unpack ``data`` into the new directory ``dest`` (which must not
    exist); nothing is left behind when a check fails."""
    if expected_sha256 is not None:
        actual = digest(data)
        if actual != expected_sha256:
            raise OutpostError("ext_package_digest", expected=expected_sha256, actual=actual,
                               name=dest.parent.name, version=dest.name)
    package = read(data, kind, light)
    dest.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
            for member in archive.getmembers():
                path = _member_path(member.name)
                if member.isdir() or not path:
                    continue
                target = scratch / path
                target.parent.mkdir(parents=True, exist_ok=True)
                source = archive.extractfile(member)
                assert source is not None  # a regular file, checked by read()
                with open(target, "wb") as out:
                    shutil.copyfileobj(source, out)
                os.chmod(target, 0o755 if path in package.executables else 0o644)
        os.chmod(scratch, 0o755)
        os.rename(scratch, dest)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return package
