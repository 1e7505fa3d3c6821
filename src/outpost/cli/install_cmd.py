"""``outpost machine install-line``: the one line that installs the agent on a new machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional
from urllib.parse import quote

import typer

from outpost.hub import install
from outpost.protocol.errors import OutpostError

from .client import _fingerprint
from .options import CaFingerprint, DataDir, Hub, Json, Token, api
from .output import out, print_json


def install_line(
    group: Annotated[str, typer.Option(help="The group the machine joins.")],
    name: Annotated[Optional[str], typer.Option(
        help="The machine's name (default: its host name).")] = None,
    account: Annotated[Optional[str], typer.Option(
        help="The account the machine joins (default: the token's account).")] = None,
    key: Annotated[str, typer.Option(
        help="Which of the account's keys the line carries: primary or secondary.")]
    = "primary",
    wheelhouse: Annotated[Optional[Path], typer.Option(
        help="A directory on the machine holding the agent's dependencies as wheels "
        "(for a machine without access to the package index).")] = None,
    no_service: Annotated[bool, typer.Option(
        "--no-service", help="Set up no systemd unit on the machine.")] = False,
    start: Annotated[bool, typer.Option(
        "--start", help="Without a systemd unit, start the agent in the background.")]
    = False,
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """Print the line that installs the agent on a new machine, registers it in GROUP and
    starts its service. The line pins the hub's CA by its fingerprint before it downloads
    anything; it carries the account key in OUTPOST_ACCOUNT_KEY (treat it as a secret)."""
    if key not in ("primary", "secondary"):
        raise OutpostError("invalid_request", f"Unknown key '{key}'.",
                           fix="Use --key primary or --key secondary.")
    client = api(hub, token, ca_fingerprint, data_dir)
    account_id = account or client.get("/v1/whoami")["account_id"]
    keys = client.get(f"/v1/accounts/{quote(account_id, safe='')}/keys")
    extra: list[str] = []
    if wheelhouse is not None:
        extra += ["--wheelhouse", str(wheelhouse)]
    if no_service:
        extra.append("--no-service")
    if start:
        extra.append("--start")
    fingerprint = _fingerprint(client.target.ca_pem)
    line = install.install_line(client.target.url, fingerprint, account_id, group,
                                account_key=keys[f"{key}_key"], name=name, extra=extra)
    if json:
        print_json({"line": line, "hub": client.target.url, "ca_fingerprint": fingerprint,
                    "account_id": account_id, "group": group})
        return
    out.print("Run this on the new machine (as root for a system service; it needs "
              "python3 3.11+ and curl):")
    out.print(line, markup=False, highlight=False, soft_wrap=True)
