"""The recovery extension shipped with Outpost: recovery points of a protected machine's
paths, taken with restic into the same per-machine repository on the hub as the backup
extension's snapshots (so both deduplicate against each other), and recovered on that
machine or on another (docs/extensions.md, "The recovery extension").

``package/`` holds the package's files (its manifest and ``bin/recovery``, a shell wrapper
that runs ``outpost.extensions.recovery.main`` with the agent's own Python); ``build()``
makes the archive the hub publishes, deterministically (outpost.extensions.archive).
"""

from __future__ import annotations

from pathlib import Path

from outpost.extensions import archive

NAME = "recovery"
PACKAGE_DIR = Path(__file__).parent / "package"


def manifest() -> dict[str, object]:
    return archive.manifest(PACKAGE_DIR)


def version() -> str:
    return str(manifest()["version"])


def build() -> bytes:
    """The package as a .tar.gz, byte for byte the same for the same files."""
    return archive.build(PACKAGE_DIR)
