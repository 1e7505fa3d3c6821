"""Version comparison used by the hub to refuse out-of-date agents (HW-5)."""

from __future__ import annotations

import pytest

from outpost import __version__
from outpost.protocol import versions


@pytest.mark.parametrize(("text", "parsed"), [
    ("1", (1,)),
    ("0.1.0", (0, 1, 0)),
    ("10.20.30", (10, 20, 30)),
    (" 1.2.3 ", (1, 2, 3)),
    ("1.2.3rc1", (1, 2, 3)),
    ("1.2.dev4", (1, 2)),
])
def test_parse(text: str, parsed: tuple[int, ...]) -> None:
    assert versions.parse(text) == parsed


@pytest.mark.parametrize("text", ["", "   ", "v1.2", "latest", ".1"])
def test_parse_refuses_what_is_not_a_version(text: str) -> None:
    with pytest.raises(ValueError, match="not a version"):
        versions.parse(text)


@pytest.mark.parametrize(("version", "minimum", "older"), [
    ("0.1.0", "99.0", True),
    ("0.9.3", "0.10.0", True),      # numeric, not string, comparison
    ("0.10.0", "0.9.3", False),
    ("1.2.3", "1.2.3", False),
    ("1.2.4", "1.2.3", False),
    ("1.2", "1.2.1", True),
    ("2", "1.99.99", False),
    # Trailing zeros do not make a version newer or older.
    ("1.0", "1.0.0", False),
    ("1.0.0", "1.0", False),
    ("0.1.0", "0.1.0.0", False),
])
def test_older_than(version: str, minimum: str, older: bool) -> None:
    assert versions.older_than(version, minimum) is older


def test_this_agent_is_not_older_than_itself() -> None:
    assert not versions.older_than(__version__, __version__)
    assert versions.older_than(__version__, "99.0")
