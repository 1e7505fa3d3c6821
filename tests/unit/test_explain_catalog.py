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


# --- every error line Outpost prints is explained back to its entry, first ----------------

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from outpost.protocol.messages import TEMPLATES  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = "sample-7"


def _render(template: str) -> str:
    """The message as a user sees it: each value filled in, literal braces as braces."""
    pieces = errors._pieces(template)
    return SAMPLE.join(pieces)


def test_the_raised_messages_are_current() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_error_docs
    finally:
        sys.path.pop(0)
    assert (ROOT / "src/outpost/protocol/messages.py").read_text() == \
        gen_error_docs.render_messages(), "run python scripts/gen_error_docs.py"
    assert len(TEMPLATES) > 100


@pytest.mark.parametrize("code", list(CATALOG))
def test_every_catalog_message_rendered_is_explained_first(code: str) -> None:
    rendered = _render(CATALOG[code].message)
    # Entries that share their text (HW-4's three causes of one 403) come first together.
    same = [e.code for e in CATALOG.values() if e.message == CATALOG[code].message]
    for pasted in (rendered, f"error: {rendered}", rendered.upper()):
        found = [e.code for e in find(pasted)]
        assert code in found[:len(same)], (pasted, found[:3])


# Messages that are nearly all values: a file, line and column before a problem the parser
# words; a command line and what it said. 'outpost explain' finds them by the code the
# CLI prints under them ("code: E2001").
TOO_BARE = {("config_invalid", "{}:{}:{}: {}"), ("config_invalid", "{}:{}:{}: {}: {}"),
            ("internal_error", "'{}' failed: {}")}


@pytest.mark.parametrize(("name", "template"), TEMPLATES,
                         ids=[f"{n}:{t[:40]}" for n, t in TEMPLATES])
def test_every_message_the_code_raises_is_explained_first(name: str, template: str) -> None:
    if (name, template) in TOO_BARE:
        assert errors.pattern(template)[1] < errors.MATCH_MIN_LETTERS
        rendered = _render(template)
        assert find(f"error: {rendered}\n  code:   {BY_CODE[name]} ({name})")[0].name == name
        return
    rendered = _render(template)
    for pasted in (rendered, f"error: {rendered}", rendered.swapcase()):
        found = [e.name for e in find(pasted)]
        assert found and found[0] == name, (pasted, found[:3])


BY_CODE = {e.name: e.code for e in CATALOG.values()}


@pytest.mark.parametrize(("text", "code"), [
    ("No runbook 'gret' in this account.", "E3002"),
    ("Cron expression '61 * * *': it has 4 fields", "E6001"),
    ("error: Parameter 'x' is given twice (--param x=1 and --param x=2).", "E8042"),
    ("--timeout '5x' is not a duration.", "E7051"),
    ("Job id prefix 'abcd' matches several jobs: abcd1 (greet, Queued), abcd2 (greet, "
     "Queued).", "E8040"),
])
def test_the_lines_of_the_issue_are_explained(text: str, code: str) -> None:
    assert find(text)[0].code == code, [e.code for e in find(text)][:3]
