"""The distribution is ``outpost-fleet``: ``pip install outpost`` installs someone else's
package, so no line of the docs, the sources or the error catalog may tell a user to run it.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from outpost.hub import install
from outpost.protocol import errors

ROOT = Path(__file__).resolve().parents[2]
NAME = "outpost-fleet"
# What a user reads or runs: docs, sources, scripts, packaging, CI, the project file.
PATTERNS = ("README.md", "docs/*.md", "src/**/*.py", "src/**/*.sh", "scripts/*",
            "packaging/**/*", ".ci/*", "pyproject.toml", "bench/**/*.py", "bench/**/*.md")


def _files() -> list[Path]:
    found = {p for pattern in PATTERNS for p in ROOT.glob(pattern) if p.is_file()}
    return sorted(found)


def wrong_installs(text: str) -> list[str]:
    """Each ``pip install`` that names the package ``outpost`` (bare, with a version or
    extras), and each ``outpost[extra]`` anywhere."""
    found = [m.group(0) for m in re.finditer(r"(?<![\w.-])outpost\[[\w,]*\]", text)]
    for match in re.finditer(r"pip3? install([^\n&;|)`,]*)", text):
        for token in match.group(1).split():
            token = token.strip("'\"")
            if re.fullmatch(r"outpost(\[[\w,]*\])?([=<>!~]=?.*)?", token):
                found.append(match.group(0).strip())
    return found


def test_the_checker_finds_the_wrong_lines() -> None:
    for wrong in ("pip install outpost", "pip install --upgrade outpost')",
                  "pip install 'outpost[hub]'", "pip install outpost==0.1.0", "`outpost[dev]`"):
        assert wrong_installs(wrong), wrong
    for right in ("pip install outpost-fleet", "pip install 'outpost-fleet[hub]'",
                  "pip install -e '.[hub]' && .venv/bin/outpost up",
                  "pip install outpost-fleet; outpost agent run"):
        assert not wrong_installs(right), right


def test_no_line_tells_users_to_install_the_other_package() -> None:
    files = _files()
    assert ROOT / "README.md" in files and ROOT / "src/outpost/protocol/errors.py" in files
    wrong = {str(p.relative_to(ROOT)): hits for p in files
             if (hits := wrong_installs(p.read_text(errors="replace")))}
    assert not wrong, f"install lines naming the package 'outpost': {wrong}"


def test_the_error_catalog_names_the_right_package() -> None:
    texts = [" ".join((e.message, *e.causes, *e.fixes)) for e in errors.CATALOG.values()]
    assert not [t for t in texts if wrong_installs(t)]
    assert "pip install --upgrade outpost-fleet" in " ".join(errors.entry("E1007").fixes)


def test_the_distribution_is_outpost_fleet_with_the_outpost_command() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == NAME
    # outpost-restic-bridge: the program restic starts for the hub's backup store.
    assert project["scripts"] == {"outpost": "outpost.cli.main:main",
                                  "outpost-restic-bridge": "outpost.backup.bridge:main"}
    dist = metadata.distribution(NAME)
    assert dist.metadata["Name"] == NAME
    assert install.DIST_NAME == NAME
    assert sorted(ep.name for ep in dist.entry_points if ep.group == "console_scripts") == [
        "outpost", "outpost-restic-bridge"]
    assert any(f"{NAME}[hub]" in r for r in metadata.requires(NAME) or [])
