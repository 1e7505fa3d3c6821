"""Options shared by several commands; the environment is read here and only here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from outpost.agent.state import StateDir, default_state_dir

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
    "--hub/--token/--ca-fingerprint.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
StateDirOpt = Annotated[Optional[Path], typer.Option(
    "--state-dir", envvar="OUTPOST_STATE_DIR",
    help="The agent's state directory (default: /var/lib/outpost as root, "
         "~/.local/state/outpost otherwise).")]
# A test hook: skews the agent's clock by this many seconds, never the system's.
ClockSkew = Annotated[float, typer.Option("--clock-skew", envvar="OUTPOST_TEST_CLOCK_SKEW",
                                          hidden=True)]


def api(hub: str | None, token: str | None, ca_fingerprint: str | None,
        data_dir: Path | None) -> Api:
    return Api(resolve(hub, token, ca_fingerprint, data_dir))


def state_dir(path: Path | None) -> StateDir:
    return StateDir(path or default_state_dir())
