"""Module packages and deployment manifests built in memory for tests."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from typing import Any

RUN = b"#!/bin/sh\nexec sleep 3600\n"


def module_manifest(name: str = "sensor", version: str = "1.0.0",
                    **extra: Any) -> dict[str, Any]:
    return {"name": name, "version": version, "description": f"{name} for tests",
            "run": {"run": "bin/run"}, **extra}


def module_package(name: str = "sensor", version: str = "1.0.0", *,
                   content: bytes = RUN, **extra: Any) -> bytes:
    """A module package: outpost-module.json and its executable bin/run."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for path, data, mode in (
                ("outpost-module.json", json.dumps(module_manifest(name, version, **extra)
                                                   ).encode(), 0o644),
                ("bin/run", content, 0o755)):
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), mode
            archive.addfile(info, io.BytesIO(data))
    return gzip.compress(buffer.getvalue(), mtime=0)  # the same bytes for the same files


def manifest_yaml(package: str = "sensor", version: str | None = "1.0.0") -> str:
    """A deployment of two modules: a package and a command, and a route between them."""
    pinned = f"\n      version: \"{version}\"" if version else ""
    return f"""schema_version: 1
modules:
  sensor:
    package:
      name: {package}{pinned}
    env:
      RATE: "5"
  filter:
    command: ["/bin/sleep", "3600"]
    order: 1
routes:
  up: FROM /messages/modules/sensor/outputs/* INTO $upstream
"""
