"""One duration parser for every option and API field, one error code (E7051)."""

from __future__ import annotations

from pathlib import Path

import pytest

from outpost.hub.schedules import parse_spread
from outpost.protocol import durations
from outpost.protocol.errors import OutpostError, entry, find
from tests.support import run_cli


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90), ("90s", 90), ("1.5s", 1.5), ("250ms", 0.25), ("5m", 300), ("10min", 600),
    ("10 min", 600), ("2h", 7200), ("1d", 86400), ("1w", 604800), ("1h30m", 5400),
    ("1m30s", 90), (" 2H ", 7200), ("3 hours", 10800), ("45sec", 45), (45, 45), (0.5, 0.5),
    (0, 0)])
def test_the_forms_it_takes(text: str | float, seconds: float) -> None:
    assert durations.parse(text, "--timeout") == seconds


@pytest.mark.parametrize("text", ["5x", "", "ten minutes", "-5", "5m-", "1h 30", "m",
                                  "1e3", "nan", "inf", True, -1, float("nan")])
def test_what_it_refuses_has_one_code_and_names_the_option(text: str | float) -> None:
    with pytest.raises(OutpostError) as caught:
        durations.parse(text, "--timeout")
    assert caught.value.code == "E7051"
    assert caught.value.message.startswith("--timeout ")


def test_out_of_range_is_the_same_code_with_the_range() -> None:
    with pytest.raises(OutpostError) as caught:
        durations.parse("8d", "spread", maximum=7 * 86400)
    assert caught.value.code == "E7051" and "0s to 7d" in caught.value.message
    with pytest.raises(OutpostError) as caught:
        durations.parse("0", "--timeout", positive=True)
    assert caught.value.code == "E7051" and "more than 0 s" in caught.value.message


def test_spread_uses_it_and_e6003_is_kept_as_an_alias() -> None:
    assert parse_spread("10min") == 600
    with pytest.raises(OutpostError) as caught:
        parse_spread("10x")
    assert caught.value.code == "E7051"
    # An older hub's answer with E6003, and 'outpost explain E6003', land on the same entry.
    assert entry("E6003").code == "E7051"
    assert [e.code for e in find("E6003")] == ["E7051"]


def test_the_cli_refuses_a_bad_timeout_with_the_code_not_a_usage_error() -> None:
    done = run_cli("job", "start", "rb", "--group", "g", "--timeout", "5x",
                   "--hub", "https://127.0.0.1:9", "--token", "t")
    assert done.returncode == 2, done.stderr
    assert "E7051" in done.stderr and "--timeout '5x' is not a duration" in done.stderr
    done = run_cli("schedule", "create", "s", "--runbook", "rb", "--group", "g", "--cron",
                   "@hourly", "--spread", "10x", "--hub", "https://127.0.0.1:9",
                   "--token", "t")
    assert done.returncode == 2 and "E7051" in done.stderr, done.stderr
    assert "--spread '10x' is not a duration" in done.stderr


def test_every_other_duration_option_takes_the_same_forms(tmp_path: Path) -> None:
    done = run_cli("hub", "run", "--data-dir", str(tmp_path), "--heartbeat-interval", "5x")
    assert done.returncode == 2 and "--heartbeat-interval '5x' is not a duration" in done.stderr
    assert "E7051" in done.stderr
    done = run_cli("agent", "logs", "--state-dir", str(tmp_path), "--since", "5x")
    assert done.returncode == 2 and "--since '5x' is not a duration" in done.stderr
    done = run_cli("agent", "logs", "--state-dir", str(tmp_path), "--since", "10min")
    assert done.returncode == 0, done.stderr  # no log yet: said on stderr, exit 0
