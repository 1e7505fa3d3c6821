"""The agent's YAML config: defaults, validation, and ED-2's file:line:column errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from outpost.agent import config
from outpost.agent.config import AgentConfig, load, parse, validate
from outpost.protocol.errors import OutpostError

WHERE = Path("/etc/outpost/agent.yaml")


def _error(text: str) -> OutpostError:
    with pytest.raises(OutpostError) as caught:
        parse(text, WHERE)
    return caught.value


def test_defaults() -> None:
    cfg = AgentConfig()
    assert cfg.hub_urls == [] and cfg.proxy is None and cfg.constrained is False
    assert cfg.log_level == "info"
    assert cfg.heartbeat_interval == 30.0
    assert parse("", WHERE) == cfg
    assert parse("# only a comment\n", WHERE) == cfg
    assert load(None) == cfg


def test_every_setting() -> None:
    cfg = parse(
        "hub_urls:\n"
        "  - https://hub-a:8443\n"
        "  - https://hub-b:8443\n"
        "log_level: DEBUG\n"
        "proxy: http://proxy:3128\n"
        "heartbeat_interval: 1\n"
        "poll_timeout: 2.5\n"
        "max_concurrent_jobs: 8.0\n"
        "constrained: true\n"
        "request_timeout: 300\n"
        "backoff_max: 3600\n", WHERE)
    assert cfg == AgentConfig(
        hub_urls=["https://hub-a:8443", "https://hub-b:8443"], log_level="debug",
        proxy="http://proxy:3128", heartbeat_interval=1.0, poll_timeout=2.5,
        max_concurrent_jobs=8, constrained=True, request_timeout=300.0, backoff_max=3600.0)
    assert isinstance(cfg.max_concurrent_jobs, int)
    assert isinstance(cfg.heartbeat_interval, float)


# --- ED-2: tabs ----------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "line", "column"), [
    ("log_level: info\nhub_urls:\n\t- https://a:8443\n", 3, 1),
    ("hub_urls:\n  \t- https://a:8443\n", 2, 3),
    ("\tlog_level: info\n", 1, 1),
])
def test_tab_in_indentation_names_line_and_column_and_says_use_spaces(
        text: str, line: int, column: int) -> None:
    exc = _error(text)
    assert exc.code == "E2002"
    assert exc.message.startswith(f"{WHERE}:{line}:{column}: ")
    assert "use spaces" in exc.message
    assert f"line {line}, column {column}" in exc.fix
    assert exc.details == {"file": str(WHERE), "line": line, "column": column}


def test_tab_after_the_indentation_is_not_a_tab_error() -> None:
    assert parse("log_level: info  # a\ttab in a comment\n", WHERE).log_level == "info"


# --- ED-2: YAML syntax ---------------------------------------------------------------------
@pytest.mark.parametrize(("text", "line", "column"), [
    ("log_level: info\n  heartbeat_interval: 3\n", 2, 21),
    ("log_level: info\nheartbeat_interval: [1, 2\n", 3, 1),
    ("log_level: 'info\n", 2, 1),
])
def test_yaml_syntax_error_names_line_and_column(text: str, line: int, column: int) -> None:
    exc = _error(text)
    assert exc.code == "E2001"
    assert exc.message.startswith(f"{WHERE}:{line}:{column}: ")
    assert (exc.details["line"], exc.details["column"]) == (line, column)
    assert f"line {line}, column {column}" in exc.fix


@pytest.mark.parametrize("text", ["- a\n- b\n", "just words\n", "42\n"])
def test_the_file_must_be_a_mapping(text: str) -> None:
    exc = _error(text)
    assert exc.code == "E2001"
    assert exc.message.startswith(f"{WHERE}:1:1: the file must hold a mapping")


# --- ED-2: bad values name the setting and where it is ---------------------------------------
@pytest.mark.parametrize(("text", "setting", "line", "problem"), [
    ("log_level: info\nproxy: null\nheartbeat_interval: fast\n", "heartbeat_interval", 3,
     "must be a number"),
    ("heartbeat_interval: 0\n", "heartbeat_interval", 1, "must be between 1 and 3600"),
    ("heartbeat_interval: 3601\n", "heartbeat_interval", 1, "must be between 1 and 3600"),
    ("heartbeat_interval: .nan\n", "heartbeat_interval", 1, "must be between"),
    ("heartbeat_interval: true\n", "heartbeat_interval", 1, "must be a number"),
    ("poll_timeout: 301\n", "poll_timeout", 1, "between 1 and 300"),
    ("\n\nmax_concurrent_jobs: 2.5\n", "max_concurrent_jobs", 3, "whole number"),
    ("max_concurrent_jobs: 0\n", "max_concurrent_jobs", 1, "between 1 and 256"),
    ("constrained: 1\n", "constrained", 1, "true or false"),
    ("log_level: verbose\n", "log_level", 1, "one of debug, info, warning, error"),
    ("log_level: 3\n", "log_level", 1, "one of debug"),
    ("hub_urls: https://a:8443\n", "hub_urls", 1, "list of URLs"),
    ("hub_urls: [http://a:8443]\n", "hub_urls", 1, "'http://a:8443' is not an https:// URL"),
    ("hub_urls: [1]\n", "hub_urls", 1, "list of URLs"),
    ("proxy: 3128\n", "proxy", 1, "URL string"),
    ("log_level: info\nheartbeet_interval: 3\n", "heartbeet_interval", 2,
     "unknown setting 'heartbeet_interval'"),
])
def test_bad_value_names_file_line_column_and_setting(text: str, setting: str, line: int,
                                                       problem: str) -> None:
    exc = _error(text)
    # An unknown setting points at its name; a bad value at the value, which it quotes.
    unknown = problem.startswith("unknown setting")
    column = 1 if unknown else len(f"{setting}: ") + 1
    assert exc.code == "E2001"
    assert exc.message.startswith(f"{WHERE}:{line}:{column}: {setting}: ")
    assert problem in exc.message
    assert unknown or "(found " in exc.message
    assert exc.details["setting"] == setting
    assert (exc.details["line"], exc.details["column"]) == (line, column)
    assert f"'{setting}'" in exc.fix and f"line {line}" in exc.fix


def test_validate_without_a_file() -> None:
    assert validate({"heartbeat_interval": 5}).heartbeat_interval == 5.0
    with pytest.raises(KeyError):
        validate({"nope": 1})
    with pytest.raises(ValueError) as caught:
        validate({"backoff_max": "x"})
    assert caught.value.args == ("must be a number", "backoff_max")


# --- load ----------------------------------------------------------------------------------
def test_load_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("heartbeat_interval: 2\n")
    assert load(path).heartbeat_interval == 2.0


def test_load_a_missing_file_says_so(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(OutpostError) as caught:
        load(path)
    assert caught.value.code == "E2001"
    assert str(path) in caught.value.message and "does not exist" in caught.value.message


@pytest.mark.parametrize("content", [None, b"\xff\xfe not utf-8 \xff"])
def test_load_an_unreadable_file_says_so(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "agent.yaml"
    if content is None:
        path.mkdir()  # a directory where the file should be
    else:
        path.write_bytes(content)
    with pytest.raises(OutpostError) as caught:
        load(path)
    assert caught.value.code == "E2001"
    assert str(path) in caught.value.message


def test_log_levels_are_the_documented_four() -> None:
    assert config.LOG_LEVELS == ("debug", "info", "warning", "error")


def test_constrained_mode_caps_jobs_connections_and_logs() -> None:
    from outpost.agent.config import AgentConfig

    normal = AgentConfig(max_concurrent_jobs=8)
    small = AgentConfig(max_concurrent_jobs=8, constrained=True).effective()
    assert normal.effective().max_concurrent_jobs == 8
    assert small.max_concurrent_jobs == 1
    assert small.connections < normal.connections
    assert small.log_bytes[0] < normal.log_bytes[0]
