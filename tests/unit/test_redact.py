"""The pieces behind ``outpost agent logs`` and the support bundle that need no I/O: the
redaction rules, durations, log levels and the JSON record format."""

from __future__ import annotations

import json
import logging

import pytest

from outpost.agent import logs
from outpost.agent.bundle import REDACTED, Redactor
from outpost.protocol.errors import OutpostError


@pytest.mark.parametrize(("text", "kept", "gone"), [
    ("proxy http://alice:s3cretpw@proxy:3128 refused", "http://[redacted]@proxy:3128",
     "s3cretpw"),
    ("Authorization: Bearer abcdef123456", "Bearer [redacted]", "abcdef123456"),
    ("account_key=QUJDREVGR0hJSg== group=web", "group=web", "QUJDREVGR0hJSg"),
    ('{"token": "tok-123456"}', '"token": "[redacted]"', "tok-123456"),
    ("password: 'hunter22' next", "next", "hunter22"),
    ("-----BEGIN OUTPOST ED25519 SEED-----\nc2VlZHNlZWQ=\n-----END OUTPOST ED25519 SEED-----",
     REDACTED, "c2VlZHNlZWQ"),
    ("-----BEGIN PRIVATE KEY-----\nMIIEvQ\n-----END PRIVATE KEY-----", REDACTED, "MIIEvQ"),
    ("The machine key /var/lib/outpost/machine.key is corrupt",
     "/var/lib/outpost/machine.key is corrupt", "[redacted]"),
])
def test_text_redaction(text: str, kept: str, gone: str) -> None:
    shown = Redactor().text(text)
    assert kept in shown and gone not in shown, shown


def test_known_secrets_go_wherever_they_are_and_short_values_are_not_secrets() -> None:
    red = Redactor(["Zx9-known-secret", "abc"])
    assert red.text("prefixZx9-known-secretsuffix") == f"prefix{REDACTED}suffix"
    assert red.text("abc stays") == "abc stays"


def test_data_redaction_by_name_keeps_the_shape() -> None:
    data = {"proxy": "http://u:p4ssw0rd@h:1", "hub_urls": ["https://hub:8443"],
            "OUTPOST_TOKEN": "t0k3n-value", "nested": {"client_secret": "x" * 8, "n": 3},
            "api_key": None, "log_level": "info"}
    shown = Redactor().data(data)
    assert shown == {"proxy": "http://[redacted]@h:1", "hub_urls": ["https://hub:8443"],
                     "OUTPOST_TOKEN": REDACTED, "nested": {"client_secret": REDACTED, "n": 3},
                     "api_key": None, "log_level": "info"}


def test_a_log_line_is_redacted_field_by_field() -> None:
    line = json.dumps({"message": "token=abcdef99", "password": "pw123456", "job": "j1"})
    assert json.loads(Redactor().log_line(line)) == {
        "message": "token=[redacted]", "password": REDACTED, "job": "j1"}
    assert Redactor().log_line("old text secret=abcdef99") == "old text secret=[redacted]"


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90), ("90s", 90), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1w", 604800),
    ("1h30m", 5400), (" 2H ", 7200), ("500ms", 0.5), (45, 45), (0, 0)])
def test_durations(text: str | int, seconds: float) -> None:
    assert logs.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten minutes", "10x", "-5", "5m-", "1h 30", True, -1])
def test_bad_durations(text: str | int) -> None:
    with pytest.raises(ValueError):
        logs.parse_duration(text)


def test_outpost_log_wins_over_the_config_and_bad_levels_have_a_code() -> None:
    assert logs.resolve_level("error", "DEBUG") == "debug"
    assert logs.resolve_level("warning", None) == "warning"
    assert logs.resolve_level("warning", "") == "warning"
    assert logs.resolve_level("info", "warn") == "warning"
    with pytest.raises(OutpostError) as caught:
        logs.resolve_level("info", "chatty")
    assert caught.value.code == "E7050" and "OUTPOST_LOG=chatty" in caught.value.message


def test_a_record_names_its_job_and_fields() -> None:
    record = logging.LogRecord("outpost.agent", logging.INFO, __file__, 1,
                               "job %s: running %s", ("abc-123", "greet"), None)
    record.attempt = 2
    data = logs.as_dict(record)
    assert data["job"] == "abc-123" and data["attempt"] == 2
    assert data["message"] == "job abc-123: running greet" and data["level"] == "INFO"
    assert data["time"].endswith("Z")
    parsed = logs.parse_line(json.dumps(data))
    assert parsed is not None and parsed["ts"] == pytest.approx(record.created, abs=0.001)
    assert logs.Filter(job="abc-123")(parsed) and not logs.Filter(job="other")(parsed)
    assert not logs.Filter(level="warning")(parsed)
    text = logs.text_line(parsed)
    assert " INFO " in text and "job=abc-123" in text and "attempt=2" in text


@pytest.mark.parametrize(("name", "secret"), [
    ("token", True), ("OUTPOST_ACCOUNT_KEY", True), ("X-Outpost-Signature", True),
    ("db_pwd", True), ("apiKey", True), ("Set-Cookie", True), ("private_key", True),
    ("PWD", False), ("OLDPWD", False), ("key_path", False), ("tokenizer", False),
    ("keyboard", False), ("state_dir", False), ("OUTPOST_TOKEN_DIR", False),
    ("HTTPS_PROXY", False), ("SSH_AUTH_SOCK", False)])
def test_secret_names_are_whole_words_not_substrings(name: str, secret: bool) -> None:
    from outpost.agent.redact import is_secret_name

    assert is_secret_name(name) is secret


def test_prose_and_paths_stay_and_product_shapes_go() -> None:
    text = ("/srv/pwd/token-tests/secret-garden/state: bearer tokens read [redacted]; "
            "opt_" + "A" * 43 + " ojt_job1." + "b" * 43 + " https://hub/v1/hooks/" + "c" * 43)
    shown = Redactor().text(text)
    assert shown.startswith("/srv/pwd/token-tests/secret-garden/state: bearer tokens read ")
    assert "A" * 43 not in shown and "b" * 43 not in shown and "c" * 43 not in shown
    assert "ojt_job1.[redacted]" in shown and "/v1/hooks/[redacted]" in shown
