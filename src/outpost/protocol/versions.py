"""Version strings compared as tuples of integers (``0.10.0`` is newer than ``0.9.3``)."""

from __future__ import annotations

import re


def parse(version: str) -> tuple[int, ...]:
    """``"1.2.3rc1"`` -> ``(1, 2, 3)``; non-numeric parts end the comparison."""
    parts = []
    for piece in version.strip().split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    if not parts:
        raise ValueError(f"not a version: {version!r}")
    return tuple(parts)


def older_than(version: str, minimum: str) -> bool:
    have, need = parse(version), parse(minimum)
    width = max(len(have), len(need))  # "1.0" is the same version as "1.0.0"
    return have + (0,) * (width - len(have)) < need + (0,) * (width - len(need))
