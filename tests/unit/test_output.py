"""The CLI's text view: what a runbook or a hub controls is shown escaped; values as JSON."""

from __future__ import annotations

from outpost.cli.output import cell, safe, value_text


def test_control_characters_are_escaped_and_tab_and_newline_kept() -> None:
    assert safe("\x1b[31mred\x1b[0m") == r"\x1b[31mred\x1b[0m"
    assert safe("a\x00b\x07c\x08d\x7fe") == r"a\x00b\x07c\x08d\x7fe"
    assert safe("over\rwrite") == r"over\rwrite"
    assert safe("one\ttwo\nthree") == "one\ttwo\nthree"
    assert safe("one\ntwo", one_line=True) == r"one\ntwo"
    # C1 (0x9b is a one-byte CSI) and bidirectional overrides.
    assert safe("\x9b2J \u202eevil\u2069") == r"\x9b2J \u202eevil\u2069"
    assert safe("é ü 漢 \ufffd") == "é ü 漢 \ufffd"


def test_values_are_json() -> None:
    assert value_text(False) == "false"
    assert value_text({"a": 1, "b": [True, None]}) == '{"a": 1, "b": [true, null]}'
    assert value_text("World") == '"World"'
    assert value_text({"k": "\x1b[2J"}) == r'{"k": "\u001b[2J"}'
    assert cell("plain") == "plain" and cell(3) == "3" and cell(None) == ""
    assert cell(True) == "true" and cell(["x"]) == '["x"]'


def test_record_printer_joins_pieces_per_stream_and_attempt(capsys: object) -> None:
    from outpost.cli.output import RecordPrinter

    printer = RecordPrinter(False)
    printer.print([{"seq": 0, "stream": "Output", "text": "ab", "continues": True},
                   {"seq": 1, "stream": "Error", "text": "\x1b!", "continues": False}])
    printer.print([{"seq": 2, "stream": "Output", "text": "cd", "continues": False},
                   {"seq": 3, "stream": "Output", "text": "cut", "continues": True},
                   # the next attempt: the cut line is shown as it came
                   {"seq": 1 << 32, "stream": "Output", "text": "again", "continues": False}])
    printer.flush()
    assert capsys.readouterr().out.splitlines() == [  # type: ignore[attr-defined]
        r"ERROR: \x1b!", "abcd", "cut", "again"]
