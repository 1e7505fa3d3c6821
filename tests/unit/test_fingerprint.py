"""The one reading of a CA fingerprint that the CLI and the agent share."""

from __future__ import annotations

import pytest

from outpost.protocol import errors
from outpost.protocol.errors import OutpostError
from outpost.protocol.fingerprint import parse

FP = "3f9a" + "0123456789abcdef" * 3 + "c0ffee000000"


def _colons(text: str) -> str:
    return ":".join(text[i:i + 2] for i in range(0, len(text), 2))


@pytest.mark.parametrize("text", [
    FP, FP.upper(), f"  {FP}\n", _colons(FP), _colons(FP).upper(),
    f"sha256={FP}", f"SHA256={_colons(FP)}", f"SHA256:{FP}", f"sha256:{FP.upper()}",
    f"SHA256 Fingerprint={_colons(FP).upper()}",  # as 'openssl x509 -fingerprint' prints it
    f"sha-256={FP}",
])
def test_every_usual_spelling_reads_the_same(text: str) -> None:
    assert len(FP) == 64
    assert parse(text) == FP


@pytest.mark.parametrize(("text", "problem"), [
    ("xyz", "not hexadecimal digits ('x' 'y' 'z')"),
    ("", "fingerprint (empty) is malformed: it is empty"),
    ("sha256=", "it is empty"),
    (FP[:-1], "63 hexadecimal digits where a SHA-256 has 64"),
    (FP + "ab", "66 hexadecimal digits"),
    (_colons(FP[:40]), "40 hexadecimal digits"),  # a SHA-1 fingerprint
    (FP[:-1] + "g", "('g')"),
    ("md5=" + FP, "('m' '=')"),
])
def test_a_malformed_value_is_refused_with_its_own_code(text: str, problem: str) -> None:
    with pytest.raises(OutpostError) as caught:
        parse(text)
    exc = caught.value
    assert exc.code == "E8001" and exc.reason == "fingerprint_malformed"
    assert problem in exc.message
    assert "proxy" not in exc.message + exc.fix
    # 'outpost explain' finds the entry from the printed line.
    assert [e.code for e in errors.find(f"error: {exc.message}")] == ["E8001"]


def test_a_long_value_is_cut_in_the_message() -> None:
    with pytest.raises(OutpostError) as caught:
        parse("z" * 500)
    assert len(caught.value.message) < 300
