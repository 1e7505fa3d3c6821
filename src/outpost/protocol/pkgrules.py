"""What an extension or module package must be, without pydantic: names, versions, paths
inside a package and the size bounds. The pydantic models (extensions.py, modules.py) and
the package reader (extpackage.py) share these, and an agent that unpacks a module package
checks its manifest with them alone (modreaders.py): the agent's memory budget has no room
for pydantic (docs/architecture.md)."""

from __future__ import annotations

import re

EXTENSION_MANIFEST = "outpost-extension.json"
MODULE_MANIFEST = "outpost-module.json"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VERSION_RE = re.compile(r"^\d+(\.\d+){0,3}([-+][A-Za-z0-9.-]{1,32})?$")
# A package is read whole into memory at publish and by the agent before unpacking.
PACKAGE_MAX_BYTES = 64 * 1024 * 1024
PACKAGE_MAX_MEMBERS = 10_000
UNPACKED_MAX_BYTES = 512 * 1024 * 1024


def check_version(value: str) -> str:
    """``value`` when it is a version (numbers separated by dots), else ValueError."""
    if not VERSION_RE.match(value):
        raise ValueError(f"'{value}' is not a version: use numbers separated by dots, as "
                         "1.2.3")
    return value


def inside_package(value: str) -> str:
    """``value`` when it is a relative path inside a package (no '..'), else ValueError."""
    parts = value.split("/")
    if value.startswith("/") or ".." in parts or "\\" in value or "\x00" in value:
        raise ValueError(f"'{value}' is not a path inside the package: give a relative "
                         "path without '..'")
    return value
