"""The backup extension shipped with Outpost: restic, run by the agent's handler runner,
backing a machine's paths up into that machine's repository on its hub (docs/backup.md,
"The backup extension").

``package/`` holds the package's files (its manifest and ``bin/backup``, a shell wrapper
that runs ``outpost.extensions.backup.main`` with the agent's own Python); ``build()`` makes
the archive the hub publishes, deterministically (outpost.extensions.archive).
"""

from __future__ import annotations

from pathlib import Path

from outpost.extensions import archive
from outpost.extensions.archive import MTIME as MTIME

NAME = "backup"
PACKAGE_DIR = Path(__file__).parent / "package"


def manifest() -> dict[str, object]:
    return archive.manifest(PACKAGE_DIR)


def version() -> str:
    return str(manifest()["version"])


def build() -> bytes:
    """The package as a .tar.gz, byte for byte the same for the same files."""
    return archive.build(PACKAGE_DIR)
