"""``outpost hub ...``: create and run a hub."""

from __future__ import annotations

import enum
import re
import shlex
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from outpost.protocol import durations
from outpost.protocol.errors import OutpostError

from . import signals
from .options import Json
from .output import err, out, print_json
from .profiles import Profile, Profiles

app = typer.Typer(no_args_is_help=True, help="Create and run the hub (the control plane).")

DataDirReq = Annotated[Path, typer.Option("--data-dir", help="The hub's data directory.")]


def _need_hub_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import sqlalchemy  # noqa: F401
    except ImportError as exc:
        raise OutpostError(
            "invalid_request", "The hub's dependencies are not installed.",
            fix="Install them with: pip install 'outpost-fleet[hub]'") from exc


def register_line(url: str, account_id: str, key: str, fingerprint: str,
                  group: str = "default") -> str:
    return ("outpost agent register " + " ".join(shlex.quote(p) for p in (
        "--hub", url, "--account-id", account_id, "--account-key", key, "--group", group,
        "--ca-fingerprint", fingerprint)))


def _save_profile(name: str | None, result: Any, data_dir: Path) -> Profile:
    """The CLI profile of this hub, current from now on (see ``profiles``)."""
    from urllib.parse import urlsplit

    if name is None:
        host = urlsplit(result.url).hostname or ""
        name = "default" if host == "localhost" or not re.fullmatch(
            r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}", host) or re.fullmatch(r"[\d.]+", host) else host
    return Profiles.load().put(Profile(name=name, hub_urls=[result.url],
                                       ca_fingerprint=result.ca_fingerprint,
                                       data_dir=data_dir.resolve()), token=result.admin_token)


@app.command()
def init(
    data_dir: DataDirReq,
    hostname: Annotated[Optional[list[str]], typer.Option(
        "--hostname", help="A name agents use to reach the hub; repeat for several. "
        "Goes into the TLS certificate beside localhost and 127.0.0.1.")] = None,
    bind: Annotated[str, typer.Option(help="HOST:PORT the hub will listen on.")]
    = "127.0.0.1:8443",
    database_url: Annotated[str, typer.Option(
        help="Database URL (default: SQLite in the data directory).")] = "",
    tls_cert: Annotated[Optional[Path], typer.Option(
        help="Serve this PEM certificate chain instead of making a CA: the server's "
        "certificate first, then its issuers, ending with the root CA that agents pin.")]
    = None,
    tls_key: Annotated[Optional[Path], typer.Option(
        help="The PEM private key of --tls-cert (without a passphrase).")] = None,
    profile_name: Annotated[Optional[str], typer.Option(
        "--profile-name", help="The CLI profile to write and make current (default: the "
        "hub's host name as in its URL, or 'default' for localhost or an IP address).")]
    = None,
    json: Json = False,
) -> None:
    """Create the hub's config, database, CA and TLS certificate, first account and admin
    token, and a CLI profile for this hub (current from now on). On an initialised directory
    nothing changes but the profile."""
    _need_hub_extra()
    from outpost.hub import config as hub_config
    from outpost.hub import db

    if (tls_cert is None) != (tls_key is None):
        raise OutpostError("invalid_request", "--tls-cert and --tls-key go together.",
                           fix="Pass both, or neither to have the hub make its own CA.")
    result = hub_config.init(data_dir, hostname or [], bind=bind, database_url=database_url,
                             tls_cert=tls_cert, tls_key=tls_key)
    if result.created:
        cfg = hub_config.load_config(hub_config.HubPaths(data_dir))
        db.migrate_sync(cfg.database_url)
    profile = _save_profile(profile_name, result, data_dir)
    if json:
        print_json({**result.to_json(), "profile": profile.name})
        if not result.created:
            err.print(f"{data_dir} is already initialised; nothing was changed.")
        return
    if result.created:
        out.print(f"Hub initialised in {data_dir}.")
    else:
        out.print(f"{data_dir} is already initialised; nothing was changed.")
    out.print(f"  URL:            {result.url}")
    out.print(f"  CA fingerprint: {result.ca_fingerprint}")
    if tls_cert is not None and result.created:
        out.print(f"  TLS:            {tls_cert} (the fingerprint is its chain's root CA, "
                  "which agents pin)")
    out.print(f"  Account id:     {result.account_id}")
    out.print(f"  Admin token:    {result.admin_token}  (kept in {data_dir / 'admin.token'})")
    out.print(f"  Profile:        '{profile.name}', now current (the CLI talks to this hub "
              "without options)")
    out.print(f"\nStart the hub:\n  outpost hub run --data-dir {shlex.quote(str(data_dir))}")
    _print_install_line(result.url, result.ca_fingerprint, result.account_id,
                        result.primary_key)


def _print_install_line(url: str, fingerprint: str, account_id: str, key: str) -> None:
    from outpost.hub.install import install_line

    out.print("\nInstall the agent on a machine and register it in group 'default' (run this "
              "there, as root for a system service; it needs python3 3.11+ and curl):")
    out.print("  " + install_line(url, fingerprint, account_id, "default", account_key=key),
              markup=False, highlight=False, soft_wrap=True)
    out.print("Other groups: outpost machine install-line --group GROUP. Where the agent is "
              "installed already (pip install outpost-fleet), register with:")
    out.print("  " + register_line(url, account_id, key, fingerprint), markup=False,
              highlight=False, soft_wrap=True)


class EventLoop(str, enum.Enum):
    uvloop = "uvloop"
    asyncio = "asyncio"


@app.command()
def run(
    data_dir: DataDirReq,
    bind: Annotated[Optional[str], typer.Option(help="HOST:PORT to listen on.")] = None,
    database_url: Annotated[Optional[str], typer.Option(
        help="postgresql://user@host/db or sqlite:///path; migrations run at start.")] = None,
    tls_cert: Annotated[Optional[Path], typer.Option(help="PEM certificate chain.")] = None,
    tls_key: Annotated[Optional[Path], typer.Option(help="PEM private key.")] = None,
    min_agent_version: Annotated[Optional[str], typer.Option(
        help="Refuse agents older than this version.")] = None,
    heartbeat_interval: Annotated[Optional[str], typer.Option(
        help="Heartbeat interval assumed for newly registered machines: 30, 30s, 1m.")]
    = None,
    event_loop: Annotated[EventLoop, typer.Option(
        envvar="OUTPOST_HUB_EVENT_LOOP", help="The event loop to serve on: asyncio's own "
        "(the default: the least memory a connection) or uvloop (asyncio's where uvloop is "
        "not installed; docs/hub.md).")] = EventLoop.asyncio,
) -> None:
    """Serve the hub over HTTPS until interrupted."""
    _need_hub_extra()
    from outpost.hub.server import RunOptions
    from outpost.hub.server import run as serve

    if (tls_cert is None) != (tls_key is None):
        raise OutpostError("invalid_request", "--tls-cert and --tls-key go together.",
                           fix="Pass both, or neither to use the generated certificate.")
    # uvicorn sets SIGINT and SIGTERM handlers of its own once it serves.
    signals.daemon()
    serve(RunOptions(data_dir=data_dir, bind=bind, database_url=database_url,
                     tls_cert=tls_cert, tls_key=tls_key, min_agent_version=min_agent_version,
                     event_loop=event_loop.value,
                     heartbeat_interval=None if heartbeat_interval is None else
                     durations.parse(heartbeat_interval, "--heartbeat-interval",
                                     positive=True, maximum=3600)))
