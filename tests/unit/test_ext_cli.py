"""Reading settings files for 'outpost extension set' (no hub)."""

from __future__ import annotations

from pathlib import Path

import pytest

from outpost.cli.extension_cmd import read_settings
from outpost.cli.output import exit_code
from outpost.protocol.errors import OutpostError


def _refusal(path: Path, protected: bool = False) -> OutpostError:
    with pytest.raises(OutpostError) as caught:
        read_settings(path, protected)
    assert caught.value.code == "E9010" and exit_code(caught.value) == 2
    assert str(path) in caught.value.message
    return caught.value


def test_json_and_yaml_objects_are_read(tmp_path: Path) -> None:
    as_json = tmp_path / "s.json"
    as_json.write_text('{"paths": ["/srv"], "keep": 7}')
    assert read_settings(as_json, False) == {"paths": ["/srv"], "keep": 7}
    as_yaml = tmp_path / "s.yaml"
    as_yaml.write_text("paths:\n  - /srv\nsince: 2026-12-05\n")
    assert read_settings(as_yaml, True) == {"paths": ["/srv"], "since": "2026-12-05"}


def test_what_is_not_an_object_is_refused_naming_what_it_is(tmp_path: Path) -> None:
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    assert "it holds list, not an object" in _refusal(listed).message
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert "it holds nothing" in _refusal(empty).message
    assert "No such file" in _refusal(tmp_path / "missing.json").message


def test_a_broken_protected_file_is_refused_by_line_without_quoting_it(
        tmp_path: Path) -> None:
    broken = tmp_path / "p.yaml"
    broken.write_text("password: hunter2-very-secret\n  token: [\n")
    plain = _refusal(broken)
    assert "line 2" in plain.message
    hidden = _refusal(broken, protected=True)
    assert "line 2" in hidden.message and "hunter2" not in hidden.message
    assert "hunter2" not in repr(hidden.details)
