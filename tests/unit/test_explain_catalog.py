"""Every catalog entry is findable the ways 'outpost explain' promises: by code, by name,
and by a piece of its message pasted in another case; and every message of SCENARIOS.md
that Outpost emits finds its entry."""

from __future__ import annotations

import re

import pytest

from outpost.protocol import errors
from outpost.protocol.errors import CATALOG, Entry, find


def _fragment(e: Entry) -> str:
    """A run of up to six words from the message, away from its {placeholders}, with every
    letter's case flipped (a user pastes what they saw, not what the catalog holds)."""
    pieces = [p.strip(" .:") for p in re.split(r"\{[a-z_]+\}", e.message)]
    words = max(pieces, key=len).split()
    middle = max(0, (len(words) - 6) // 2)
    return " ".join(words[middle:middle + 6]).swapcase()


@pytest.mark.parametrize("code", list(CATALOG))
def test_every_entry_is_found_by_code_name_and_a_piece_of_its_message(code: str) -> None:
    e = CATALOG[code]
    assert [x.code for x in find(code)] == [code]
    assert [x.code for x in find(code.lower())] == [code]
    assert [x.code for x in find(e.name.upper())] == [code]
    fragment = _fragment(e)
    assert fragment.lower() != fragment or not any(c.isalpha() for c in fragment)
    assert code in [x.code for x in find(fragment)], (code, fragment)
    # With the text the user saw around it: a prefix, and the message whole.
    assert code in [x.code for x in find(f"error: {e.message.upper()}")], code


# The seed texts Outpost reproduces (SCENARIOS.md), as a user would paste a piece of them.
SCENARIO_TEXTS = [
    ("attempted three times", {"E4010"}),                                        # HW-1
    ("The job action 'Activate' cannot be run", {"E4010"}),                      # HW-1
    ("because the process stopped unexpectedly", {"E4010"}),                     # HW-1
    ("process exited with code 4294967295", {"E4011"}),                          # HW-1a
    ("No certificate was found", {"E5001"}),                                     # HW-2
    ("No certificate was found in the certificate store with thumbprint 0000000000000000",
     {"E5001"}),                                                                 # HW-2
    ("You don't have permission", {"E1001", "E1002", "E1003"}),                  # HW-4
    ("Forbidden: You don\u2019t have permission to access / on this server.",
     {"E1001", "E1002", "E1003"}),                                               # HW-4
    ("The specified class does not exist", {"E1007"}),                           # HW-5
    ("not issued by the expected authority", {"E1006"}),                         # HW-7
    ("Machine is already registered", {"E1004"}),                                # HW-10
    ("machine IS ALREADY registered: account 1234, group web", {"E1004"}),       # HW-10
    ("port is already allocated", {"E2005"}),                                    # ED-5
    ("Bind for 0.0.0.0:443 failed: port is already allocated", {"E2005"}),       # ED-5
    ("invalid hostname", {"E1005"}),                                             # ED-7
    ("Hostname cannot be empty or greater than 64 characters", {"E1005"}),       # ED-7
    ("hub unreachable (dns)", {"E2004"}),                                        # ED-4
    ("contains a tab", {"E2002"}),                                               # ED-2
    ("The Outpost agent is not running", {"E2003"}),                             # HW-3
]


@pytest.mark.parametrize(("text", "codes"), SCENARIO_TEXTS)
def test_scenario_texts_find_their_entries(text: str, codes: set[str]) -> None:
    for variant in (text, text.lower(), text.upper()):
        found = {e.code for e in find(variant)}
        assert codes <= found, (variant, found)


def test_the_hub_suspends_with_the_catalog_text() -> None:
    from outpost.hub import jobs

    assert jobs.ACTIVATE_FAILED == errors.ACTIVATE_FAILED_TEXT


def test_a_code_inside_other_text_is_found() -> None:
    assert [e.code for e in find("request failed (code E2004) at 10:00")] == ["E2004"]
