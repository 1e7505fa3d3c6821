"""Options shared by several commands; the environment is read here and only here.

Where a command finds its hub and its agent, first that gives it: explicit flags, then their
variables (OUTPOST_HUB, OUTPOST_TOKEN, OUTPOST_CA_FINGERPRINT, OUTPOST_STATE_DIR), then
--data-dir, then the selected profile (``--profile``, else OUTPOST_PROFILE, else the current
one; see ``profiles``), then the built-in default (the agent's state dir only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from outpost.agent.state import StateDir, default_state_dir

from . import profiles
from .client import Api, resolve

Hub = Annotated[Optional[str], typer.Option("--hub", envvar="OUTPOST_HUB",
                                            help="Hub URL, e.g. https://hub.example:8443.")]
Token = Annotated[Optional[str], typer.Option("--token", envvar="OUTPOST_TOKEN",
                                              help="API token of the account.")]
CaFingerprint = Annotated[Optional[str], typer.Option(
    "--ca-fingerprint", envvar="OUTPOST_CA_FINGERPRINT",
    help="SHA-256 fingerprint of the hub's CA, as 'outpost hub init' printed it.")]
DataDir = Annotated[Optional[Path], typer.Option(
    "--data-dir", help="The hub's data directory; on the hub's machine it replaces "
    "--hub/--token/--ca-fingerprint. Without any of them, the profile is used "
    "('outpost profile list').")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
StateDirOpt = Annotated[Optional[Path], typer.Option(
    "--state-dir", envvar="OUTPOST_STATE_DIR",
    help="The agent's state directory (default: the profile's, as 'outpost up' made it; "
         "else /var/lib/outpost as root, ~/.local/state/outpost otherwise).")]
# A test hook: skews the agent's clock by this many seconds, never the system's.
ClockSkew = Annotated[float, typer.Option("--clock-skew", envvar="OUTPOST_TEST_CLOCK_SKEW",
                                          hidden=True)]


def api(hub: str | None, token: str | None, ca_fingerprint: str | None,
        data_dir: Path | None) -> Api:
    profile = None
    if data_dir is None and not (hub and token and ca_fingerprint):
        profile = profiles.active()
    return Api(resolve(hub, token, ca_fingerprint, data_dir, profile))


def profile_state_dir() -> Path | None:
    """The selected profile's agent state dir, if it names one."""
    profile = profiles.active()
    return profile.state_dir if profile is not None else None


def state_dir(path: Path | None) -> StateDir:
    return StateDir(path or profile_state_dir() or default_state_dir())
