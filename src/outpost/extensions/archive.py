"""The deterministic archive of a shipped extension's ``package/`` directory: members
sorted, owner, modes and times fixed, gzip without a name or time, so a version's SHA-256 is
the same wherever and whenever it is built, and publishing it again is the same package."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

from outpost.protocol.extensions import MANIFEST_NAME

MTIME = 1_700_000_000  # fixed member times: the archive depends on the files only


def manifest(package_dir: Path) -> dict[str, object]:
    """The package's manifest, as its file holds it."""
    value = json.loads((package_dir / MANIFEST_NAME).read_text())
    assert isinstance(value, dict)
    return value


def _files(package_dir: Path) -> list[Path]:
    return sorted((p for p in package_dir.rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts),
                  key=lambda p: p.relative_to(package_dir).as_posix())


def build(package_dir: Path, executable: Callable[[str], bool] | None = None) -> bytes:
    """The package as a .tar.gz, byte for byte the same for the same files. ``executable``
    says which members (relative paths) get mode 755; by default those under bin/."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        dirs: set[str] = set()
        for path in _files(package_dir):
            rel = path.relative_to(package_dir).as_posix()
            parts = rel.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                directory = "/".join(parts[:i])
                if directory not in dirs:
                    dirs.add(directory)
                    info = tarfile.TarInfo(directory)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
                    archive.addfile(info)
            data = path.read_bytes()
            info = tarfile.TarInfo(rel)
            info.size, info.mtime = len(data), MTIME
            # By place, not by the file's mode here: an installed wheel may not keep the
            # executable bit, and the digest must not depend on how Outpost was installed.
            runs = executable(rel) if executable is not None else rel.startswith("bin/")
            info.mode = 0o755 if runs else 0o644
            archive.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()
