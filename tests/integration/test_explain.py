"""`outpost explain` finds an entry by code or by pasted text, any case."""

from __future__ import annotations

import json

import pytest

from tests.support import run_cli


@pytest.mark.parametrize("query, code", [
    ("E1003", "E1003"),
    ("clock_skew", "E1003"),
    ("machine is ALREADY registered", "E1004"),
    ("Hostname cannot be empty", "E1005"),
    ("error: Bind for 0.0.0.0:443 failed: port is already allocated", "E2005"),
    ("proxy may be intercepting", "E1006"),
    ("The job action was ATTEMPTED THREE TIMES.", "E4010"),
    ("No certificate was found", "E5001"),
])
def test_explain_finds_the_entry(query: str, code: str) -> None:
    done = run_cli("explain", query)
    assert done.returncode == 0, done.stderr
    assert code in done.stdout
    assert "causes:" in done.stdout and "fixes:" in done.stdout


def test_explain_of_an_unknown_text_says_so() -> None:
    done = run_cli("explain", "no such thing at all here")
    assert done.returncode == 1
    assert "No catalog entry matches" in done.stdout


def test_explain_json_lists_the_matching_entries() -> None:
    done = run_cli("explain", "--json", "You don't have permission")
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert [e["code"] for e in found] == ["E1001", "E1002", "E1003"]
    assert all(e["causes"] and e["fixes"] and e["scenario"] == "HW-4" for e in found)
    nothing = run_cli("explain", "--json", "no such thing at all here")
    assert nothing.returncode == 1 and json.loads(nothing.stdout) == []
