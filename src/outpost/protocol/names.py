"""Did you mean: the nearest of the known names to one that was not found (difflib)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def nearest(name: str, known: Iterable[str]) -> str | None:
    """The known name closest to ``name`` (case aside), if one is close enough to be a typo."""
    names = [k for k in known if k != name]
    by_lower = {k.lower(): k for k in names}
    if name.lower() in by_lower:  # the same name in another case
        return by_lower[name.lower()]
    found = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[found[0]] if found else None


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``"did you mean 'local'?"``, or "" when nothing known is near."""
    found = nearest(name, known)
    return f"did you mean '{found}'?" if found else ""
