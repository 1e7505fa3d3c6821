"""Extension packages built in memory for tests: a manifest and handler scripts, as the
operator's tar -czf would pack them."""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any

HANDLER = b"#!/bin/sh\nexit 0\n"


def manifest(name: str = "hello", version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
    found: dict[str, Any] = {
        "name": name, "version": version, "description": f"{name} for tests",
        "handlers": {h: {"run": f"bin/{h}"} for h in
                     ("install", "enable", "disable", "update", "uninstall")},
    }
    found.update(extra)
    return found


def package(manifest_data: dict[str, Any] | bytes | None = None, *,
            files: dict[str, tuple[bytes, int]] | None = None,
            links: dict[str, str] | None = None) -> bytes:
    """A .tar.gz: ``manifest_data`` (a dict, raw bytes, or None for none), the handlers
    its commands name (executable) unless ``files`` gives the members itself, and
    symbolic ``links`` (name to target)."""
    if manifest_data is None or isinstance(manifest_data, dict):
        data = manifest_data if manifest_data is not None else manifest()
        raw = json.dumps(data).encode() if manifest_data is not None else None
        commands = [*data.get("handlers", {}).values(), *data.get("operations", {}).values()]
        members = {c["run"]: (HANDLER, 0o755) for c in commands}
    else:
        raw, members = manifest_data, {}
    if files is not None:
        members = files
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        if raw is not None:
            _add(archive, "outpost-extension.json", raw, 0o644)
        for path, (content, mode) in members.items():
            _add(archive, path, content, mode)
        for path, target in (links or {}).items():
            info = tarfile.TarInfo(path)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            archive.addfile(info)
    return buffer.getvalue()


def _add(archive: tarfile.TarFile, path: str, content: bytes, mode: int) -> None:
    info = tarfile.TarInfo(path)
    info.size = len(content)
    info.mode = mode
    archive.addfile(info, io.BytesIO(content))
