"""The error catalog and the exception tree every command and the hub report through."""

from __future__ import annotations

import re

import pytest

from outpost.protocol import errors
from outpost.protocol.errors import (
    CATALOG,
    HubRefused,
    OutpostError,
    TransportError,
    describe,
    entry,
    find,
)


# --- the catalog ---------------------------------------------------------------------------
def test_codes_and_names_are_unique_and_well_formed() -> None:
    entries = list(CATALOG.values())
    assert len({e.code for e in entries}) == len(entries)
    assert len({e.name for e in entries}) == len(entries)
    for e in entries:
        assert re.fullmatch(r"E\d{4}", e.code), e.code
        assert re.fullmatch(r"[a-z][a-z0-9_]*", e.name), e.name
        assert e.message and e.causes and e.fixes, e.code
        assert 400 <= e.http_status <= 599, e.code


@pytest.mark.parametrize(("name", "code", "status"), [
    ("unknown_account", "E1001", 403),
    ("already_registered", "E1004", 409),
    ("agent_outdated", "E1007", 426),
    ("config_invalid", "E2001", 400),
    ("config_tab", "E2002", 400),
    ("agent_not_running", "E2003", 503),
    ("hub_unreachable", "E2004", 503),
    ("agent_already_running", "E2006", 409),
    ("internal_error", "E3006", 500),
])
def test_stable_codes(name: str, code: str, status: int) -> None:
    # Codes are an interface: scripts and 'outpost explain' depend on them not moving.
    assert entry(name).code == code
    assert entry(code).name == name
    assert entry(code).http_status == status


def test_entry_of_an_unknown_key_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        entry("E9999")
    with pytest.raises(KeyError):
        OutpostError("no_such_error")


def test_seed_texts_are_kept_verbatim() -> None:
    assert entry("E1001").message == errors.FORBIDDEN_TEXT
    assert entry("E1004").message == "Machine is already registered"
    assert entry("E1005").message == (
        "invalid hostname. Hostname cannot be empty or greater than 64 characters")
    assert "The specified class does not exist" in entry("agent_outdated").message


# --- find (outpost explain) ----------------------------------------------------------------
@pytest.mark.parametrize("query", ["E2004", "e2004", " hub_unreachable ", "HUB_UNREACHABLE"])
def test_find_by_code_or_name_is_exact(query: str) -> None:
    assert [e.code for e in find(query)] == ["E2004"]


def test_find_pasted_text_with_extra_words_and_spacing() -> None:
    hits = find("error:   Machine is already\n registered (while starting)")
    assert "E1004" in [e.code for e in hits]


def test_find_by_a_piece_of_a_cause_or_fix() -> None:
    assert "E2002" in [e.code for e in find("tab")]
    assert "E1003" in [e.code for e in find("timedatectl")]


def test_find_forbidden_text_lists_every_entry_sharing_it() -> None:
    codes = [e.code for e in find(errors.FORBIDDEN_TEXT)]
    assert {"E1001", "E1002", "E1003"} <= set(codes)


@pytest.mark.parametrize("query", ["", "   ", "zzzz no such text zzzz"])
def test_find_nothing(query: str) -> None:
    assert find(query) == []


# --- OutpostError ---------------------------------------------------------------------------
def test_defaults_come_from_the_catalog() -> None:
    exc = OutpostError("agent_not_running")
    assert exc.code == "E2003" and exc.reason == "agent_not_running"
    assert exc.message == entry("E2003").message == str(exc)
    assert exc.fix == entry("E2003").fixes[0]
    assert exc.details == {}


def test_message_fix_and_details_override() -> None:
    exc = OutpostError("E2001", "a.yaml:3:1: bad", fix="Fix line 3.", file="a.yaml", line=3)
    assert exc.entry.name == "config_invalid"
    assert exc.to_body() == {"code": "E2001", "reason": "config_invalid",
                             "message": "a.yaml:3:1: bad", "fix": "Fix line 3.",
                             "details": {"file": "a.yaml", "line": 3}}


def test_details_may_be_named_like_the_positional_parameters() -> None:
    exc = OutpostError("invalid_request", key="k", message="m")
    assert exc.details == {"key": "k", "message": "m"}
    assert exc.message == entry("invalid_request").message


def test_describe_shows_message_code_cause_fix_details_and_explain() -> None:
    exc = OutpostError("config_tab", "f.yaml:2:1: tab", file="f.yaml", line=2, empty="",
                       none=None)
    lines = describe(exc)
    assert lines[0] == "error: f.yaml:2:1: tab"
    assert lines[1] == "  code:   E2002 (config_tab)"
    assert lines[2].startswith("  cause:  ")
    assert lines[3] == f"  fix:    {exc.fix}"
    assert lines[4] == "  details: file=f.yaml, line=2"
    assert lines[-1] == "  more:   outpost explain E2002"


def test_describe_lists_problems_but_at_most_ten() -> None:
    problems = [{"field": f"f{i}", "problem": "missing"} for i in range(15)]
    lines = describe(OutpostError("invalid_request", problems=problems))
    shown = [line for line in lines if line.startswith("  - ")]
    assert shown[0] == "  - f0: missing"
    assert len(shown) == 10
    assert not any("problems=" in line for line in lines)


# --- the exception tree --------------------------------------------------------------------
def test_hub_refused_carries_the_hub_body() -> None:
    body = {"code": "E1007", "reason": "agent_outdated", "message": "needs 99.0",
            "fix": "Upgrade to 99.0.", "details": {"min_agent_version": "99.0"}}
    exc = HubRefused(426, body)
    assert isinstance(exc, OutpostError)
    assert (exc.status, exc.code, exc.reason) == (426, "E1007", "agent_outdated")
    assert exc.message == "needs 99.0" and exc.fix == "Upgrade to 99.0."
    assert exc.details == {"min_agent_version": "99.0"}
    assert exc.body is body


def test_hub_refused_with_an_unknown_code_is_an_internal_error() -> None:
    exc = HubRefused(502, {"code": "E9999", "message": "bad gateway"})
    assert exc.code == "E3006" and exc.status == 502
    assert exc.message == "bad gateway"
    assert exc.body["code"] == "E9999"


def test_hub_refused_without_message_uses_the_catalog_text() -> None:
    exc = HubRefused(403, {"code": "E1001"})
    assert exc.message == errors.FORBIDDEN_TEXT
    assert exc.fix == entry("E1001").fixes[0]


@pytest.mark.parametrize("details", [["a", "b"], "text", 7, None,
                                     {"fix": "from details", "x": 1}])
def test_hub_refused_survives_any_details(details: object) -> None:
    # A proxy or a different server may answer with a body of any shape.
    exc = HubRefused(400, {"code": "E3003", "message": "m", "fix": "the fix",
                           "details": details})
    assert exc.code == "E3003"
    assert exc.fix == "the fix"
    assert isinstance(exc.details, dict)


def test_transport_error_names_kind_and_url() -> None:
    exc = TransportError("refused", "https://hub:8443", "Connection refused")
    assert isinstance(exc, OutpostError) and not isinstance(exc, HubRefused)
    assert exc.code == "E2004" and exc.kind == "refused"
    assert exc.details == {"kind": "refused", "url": "https://hub:8443"}
    assert "https://hub:8443" in exc.message and "(refused)" in exc.message
    assert "Connection refused" in exc.message


def test_outpost_error_is_not_raised_for_programming_errors() -> None:
    assert not issubclass(TypeError, OutpostError)
    assert not issubclass(OutpostError, (TypeError, ValueError, KeyError))


def test_a_transport_error_shows_the_cause_and_fix_of_its_kind() -> None:
    tls = describe(TransportError("tls", "https://hub:8443", "certificate verify failed"))
    assert "  cause:  tls: the TLS handshake failed." in tls
    assert any(line.startswith("  fix:    Check that the URL names the hub you mean")
               for line in tls)
    refused = describe(TransportError("refused", "https://hub:8443", "connection refused"))
    assert any(line.startswith("  cause:  refused: nothing listens") for line in refused)
    dns = describe(TransportError("dns", "https://nowhere.invalid", "not known"))
    assert any(line.startswith("  cause:  dns: the hub's host name") for line in dns)
    other = describe(TransportError("other", "https://hub:8443", "Server disconnected"))
    cause = next(line for line in other if line.startswith("  cause:"))
    assert "other: none of the usual causes" in cause and "dns" not in cause
