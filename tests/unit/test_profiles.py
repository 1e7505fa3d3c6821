"""The profiles file and the global --profile option, through their narrow seams."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from outpost.cli.main import take_profile
from outpost.cli.profiles import Profile, Profiles
from outpost.protocol.errors import OutpostError

FP = "ab" * 32


@pytest.mark.parametrize(("argv", "rest", "name"), [
    (["job", "list"], ["job", "list"], None),
    (["--profile", "prod", "job", "list"], ["job", "list"], "prod"),
    (["job", "list", "--profile", "prod", "--json"], ["job", "list", "--json"], "prod"),
    (["job", "--profile=prod", "list"], ["job", "list"], "prod"),
    (["--profile", "a", "job", "list", "--profile", "b"], ["job", "list"], "b"),
    (["explain", "--", "--profile", "x"], ["explain", "--", "--profile", "x"], None),
    (["up", "--profile-name", "dev"], ["up", "--profile-name", "dev"], None),
    (["job", "list", "--profile"], ["job", "list", "--profile"], None),  # click says why
])
def test_profile_is_taken_from_anywhere_before_the_double_dash(
        argv: list[str], rest: list[str], name: str | None) -> None:
    assert take_profile(argv) == (rest, name)


def test_the_file_keeps_no_token_and_round_trips(tmp_path: Path) -> None:
    root = tmp_path / "outpost"
    store = Profiles.load(root)
    store.put(Profile("local", ["https://localhost:8443"], f"SHA256:{FP.upper()}",
                      data_dir=tmp_path / ".outpost", state_dir=tmp_path / ".outpost/agent"),
              token="secret-token")
    assert "secret-token" not in (root / "profiles.yaml").read_text()
    assert stat.S_IMODE((root / "profiles.yaml").stat().st_mode) == 0o600
    again = Profiles.load(root)
    local = again.get("local")
    assert again.current == "local" and local.ca_fingerprint == FP  # stored normalised
    assert local.token() == "secret-token" and local.state_dir == tmp_path / ".outpost/agent"
    assert not list(root.glob(".*tmp*"))  # written whole, then renamed


def test_unknown_names_and_broken_files_are_coded_errors(tmp_path: Path) -> None:
    root = tmp_path / "outpost"
    store = Profiles.load(root)
    store.put(Profile("prod", ["https://hub:8443"], FP), token="t")
    with pytest.raises(OutpostError) as caught:
        store.get("prd")
    assert caught.value.code == "E8002" and "Did you mean 'prod'?" in caught.value.message
    assert "prod" in caught.value.fix
    with pytest.raises(OutpostError) as caught:
        store.put(Profile("no/slash", ["https://hub:8443"], FP))
    assert caught.value.code == "E8006"
    with pytest.raises(OutpostError) as caught:
        store.put(Profile("bad-fp", ["https://hub:8443"], "xyz"))
    assert caught.value.code == "E8001"
    (root / "credentials" / "prod.token").unlink()
    with pytest.raises(OutpostError) as caught:
        Profiles.load(root).get("prod").token()
    assert caught.value.code == "E8004"
    (root / "profiles.yaml").write_text("profiles: [1, 2]\n")
    with pytest.raises(OutpostError) as caught:
        Profiles.load(root)
    assert caught.value.code == "E8003" and str(root / "profiles.yaml") in caught.value.message
