"""Profiles: the CLI remembers the hubs 'outpost hub init' and 'outpost up' made.

No test here changes the hub (each writes profiles in a config directory of its own), so
one hub serves the module."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from tests.support import Hub, clean_env, config_home, run_cli


@pytest.fixture(scope="module")
def sqlite_hub(module_sqlite_hub: Hub) -> Hub:
    """The module's one running hub, on SQLite (conftest's sqlite_hub, for the module)."""
    return module_sqlite_hub


def _init_profile(hub: Hub, env: dict[str, str], *extra: str) -> dict[str, object]:
    """'hub init' again on the running hub's directory: it changes nothing but writes the
    profile of this hub and makes it current."""
    done = run_cli("hub", "init", "--data-dir", str(hub.data_dir), "--json", *extra, env=env)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_after_hub_init_commands_need_no_options(sqlite_hub: Hub) -> None:
    env = clean_env(XDG_CONFIG_HOME=config_home())
    nothing = run_cli("machine", "list", env=env)
    assert nothing.returncode == 2 and "E3008" in nothing.stderr
    # With nothing configured, the fix names every way to configure it.
    assert "outpost up" in nothing.stderr and "outpost profile use" in nothing.stderr
    assert "--hub" in nothing.stderr and "--data-dir" in nothing.stderr

    assert _init_profile(sqlite_hub, env)["profile"] == "default"  # a localhost hub
    listing = run_cli("machine", "list", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    assert json.loads(listing.stdout) == []

    # The file holds no token; the token file is private, in a private directory.
    home = Path(env["XDG_CONFIG_HOME"]) / "outpost"
    text = (home / "profiles.yaml").read_text()
    assert sqlite_hub.admin_token not in text and "current: default" in text
    token_file = home / "credentials" / "default.token"
    assert token_file.read_text().strip() == sqlite_hub.admin_token
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_profile_list_show_use_remove(sqlite_hub: Hub) -> None:
    env = clean_env(XDG_CONFIG_HOME=config_home())
    _init_profile(sqlite_hub, env, "--profile-name", "local")
    _init_profile(sqlite_hub, env, "--profile-name", "prod")  # now current

    rows = json.loads(run_cli("profile", "list", "--json", env=env).stdout)
    assert [(r["name"], r["current"]) for r in rows] == [("local", False), ("prod", True)]
    assert rows[0]["hub_urls"] == [sqlite_hub.url]
    assert rows[0]["ca_fingerprint"] == sqlite_hub.fingerprint
    assert rows[0]["token_present"] is True
    table = run_cli("profile", "list", env=env).stdout.splitlines()
    assert [line.split()[:3] for line in table[1:]] == [
        ["local", sqlite_hub.url, "-"], ["*", "prod", sqlite_hub.url]]

    shown = run_cli("profile", "show", "local", env=env)
    assert shown.returncode == 0, shown.stderr
    assert sqlite_hub.admin_token not in shown.stdout + shown.stderr
    assert "credentials/local.token (present)" in shown.stdout
    assert sqlite_hub.fingerprint in shown.stdout
    as_json = json.loads(run_cli("profile", "show", "--json", env=env).stdout)
    assert as_json["name"] == "prod" and sqlite_hub.admin_token not in json.dumps(as_json)

    used = run_cli("profile", "use", "local", env=env)
    assert used.returncode == 0 and "'local' is current" in used.stdout
    assert json.loads(run_cli("profile", "show", "--json", env=env).stdout)["name"] == "local"

    removed = run_cli("profile", "remove", "local", env=env)
    assert removed.returncode == 0, removed.stderr
    assert "no profile is current now" in removed.stdout and "prod" in removed.stdout
    home = Path(env["XDG_CONFIG_HOME"]) / "outpost"
    assert not (home / "credentials" / "local.token").exists()
    assert (home / "credentials" / "prod.token").exists()
    rows = json.loads(run_cli("profile", "list", "--json", env=env).stdout)
    assert [(r["name"], r["current"]) for r in rows] == [("prod", False)]
    # None is current: a command without options says there is no hub to talk to...
    assert "E3008" in run_cli("machine", "list", env=env).stderr
    # ...and --profile picks one.
    assert run_cli("machine", "list", "--profile", "prod", env=env).returncode == 0


def test_profile_is_picked_anywhere_on_the_line_and_by_variable(sqlite_hub: Hub) -> None:
    env = clean_env(XDG_CONFIG_HOME=config_home())
    _init_profile(sqlite_hub, env, "--profile-name", "local")
    _init_profile(sqlite_hub, env, "--profile-name", "other")
    run_cli("profile", "remove", "other", env=env)  # none is current: only a pick works
    assert "E3008" in run_cli("machine", "list", env=env).stderr

    for args in (["--profile", "local", "machine", "list", "--json"],
                 ["machine", "list", "--json", "--profile", "local"],
                 ["machine", "--profile=local", "list", "--json"]):
        done = run_cli(*args, env=env)
        assert done.returncode == 0, (args, done.stderr)
        assert json.loads(done.stdout) == []
    by_variable = run_cli("machine", "list", "--json", env={**env, "OUTPOST_PROFILE": "local"})
    assert by_variable.returncode == 0, by_variable.stderr

    mistyped = run_cli("machine", "list", "--profile", "lcoal", env=env)
    assert mistyped.returncode == 2
    assert "No profile named 'lcoal'. Did you mean 'local'?" in mistyped.stderr
    assert "E8002" in mistyped.stderr and "Pick one of: local" in mistyped.stderr
    by_bad_variable = run_cli("machine", "list", env={**env, "OUTPOST_PROFILE": "nope"})
    assert by_bad_variable.returncode == 2 and "E8002" in by_bad_variable.stderr
    assert "Did you mean" not in by_bad_variable.stderr


def test_flags_and_variables_come_before_the_profile(sqlite_hub: Hub) -> None:
    env = clean_env(XDG_CONFIG_HOME=config_home())
    _init_profile(sqlite_hub, env)
    # --token (or OUTPOST_TOKEN) wins over the profile's token.
    wrong = run_cli("machine", "list", "--token", "not-the-token", env=env)
    assert wrong.returncode == 1 and "E3001" in wrong.stderr
    wrong = run_cli("machine", "list", env={**env, "OUTPOST_TOKEN": "not-the-token"})
    assert "E3001" in wrong.stderr
    # Another hub: the profile's token is not sent there (no token: nothing to talk with).
    other = run_cli("machine", "list", "--hub", "https://localhost:1", env=env)
    assert other.returncode == 2 and "E3008" in other.stderr
    # The profile's own hub given as --hub: the profile still supplies token and CA.
    same = run_cli("machine", "list", "--hub", sqlite_hub.url, env=env)
    assert same.returncode == 0, same.stderr
    # --data-dir wins over the profile: a directory that is not a hub says so.
    elsewhere = run_cli("machine", "list", "--data-dir", str(sqlite_hub.data_dir / "nope"),
                        env=env)
    assert elsewhere.returncode == 2 and "E3005" in elsewhere.stderr, elsewhere.stderr


def test_a_mistyped_ca_fingerprint_is_malformed_not_a_proxy(sqlite_hub: Hub) -> None:
    base = ["machine", "list", "--hub", sqlite_hub.url, "--token", sqlite_hub.admin_token]
    colons = run_cli(*base, "--ca-fingerprint", "AB:CD:EF")
    assert "The CA fingerprint 'AB:CD:EF' is malformed: it has 6 hexadecimal digits where a " \
        "SHA-256 has 64." in colons.stderr, colons.stderr  # as typed, not as an emoji code
    for bad in ("xyz", sqlite_hub.fingerprint[:-2], sqlite_hub.fingerprint + "00"):
        done = run_cli(*base, "--ca-fingerprint", bad)
        assert done.returncode == 2, done.stderr
        assert "E8001" in done.stderr and "malformed" in done.stderr, done.stderr
        assert "proxy" not in done.stderr.lower()
    fp = sqlite_hub.fingerprint
    for good in (f"sha256={fp}", f"SHA256:{fp.upper()}",
                 ":".join(fp[i:i + 2] for i in range(0, 64, 2)).upper()):
        done = run_cli(*base, "--ca-fingerprint", good, "--json")
        assert done.returncode == 0, (good, done.stderr)
    # A well-formed fingerprint of another CA is still the mismatch it was.
    other = run_cli(*base, "--ca-fingerprint", "ab" * 32)
    assert other.returncode == 1 and "E1006" in other.stderr, other.stderr


def test_agent_register_refuses_a_malformed_fingerprint(tmp_path: Path) -> None:
    done = run_cli("agent", "register", "--hub", "https://localhost:1", "--account-id", "a",
                   "--account-key", "A" * 43 + "=", "--group", "g", "--ca-fingerprint",
                   "12:34:zz", "--state-dir", str(tmp_path / "agent"))
    assert done.returncode == 2, done.stderr
    assert "E8001" in done.stderr and "'z'" in done.stderr
    assert "proxy" not in done.stderr.lower() and "E2004" not in done.stderr


def test_profile_add_for_a_hub_elsewhere(sqlite_hub: Hub) -> None:
    env = clean_env(XDG_CONFIG_HOME=config_home())
    base = ["profile", "add", "remote", "--hub", sqlite_hub.url, "--token-stdin"]
    wrong = run_cli(*base, "--ca-fingerprint", f"sha256={sqlite_hub.fingerprint}",
                    input="not-the-token\n", env=env)
    assert wrong.returncode == 1 and "E3001" in wrong.stderr, wrong.stderr
    malformed = run_cli(*base, "--ca-fingerprint", "xyz", input=sqlite_hub.admin_token,
                        env=env)
    assert malformed.returncode == 2 and "E8001" in malformed.stderr
    assert json.loads(run_cli("profile", "list", "--json", env=env).stdout) == []

    added = run_cli(*base, "--ca-fingerprint", f"SHA256:{sqlite_hub.fingerprint.upper()}",
                    input=sqlite_hub.admin_token + "\n", env=env)
    assert added.returncode == 0, added.stderr
    assert sqlite_hub.admin_token not in added.stdout + added.stderr
    assert "Profile 'remote' saved and current" in added.stdout
    listing = run_cli("machine", "list", "--json", env=env)
    assert listing.returncode == 0 and json.loads(listing.stdout) == []
