"""``outpost profile ...``: the hub connections the CLI remembers (see ``profiles``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import Json
from .output import out, print_json
from .profiles import Profile, Profiles

app = typer.Typer(no_args_is_help=True, help=(
    "The hubs this CLI talks to, by name. 'outpost up' and 'outpost hub init' write a "
    "profile and make it current, so later commands need no --hub/--token/--data-dir. Pick "
    "one for a command with --profile NAME (anywhere on the command line) or "
    "OUTPOST_PROFILE. Kept in $XDG_CONFIG_HOME/outpost/profiles.yaml (~/.config/outpost); "
    "tokens in 0600 files beside it, never in that file."))

Name = Annotated[str, typer.Argument(help="The profile's name, as 'outpost profile list' "
                                     "shows it.")]


@app.command("list")
def list_(json: Json = False) -> None:
    """List the profiles; the current one is marked '*'."""
    store = Profiles.load()
    rows = [p.to_json(p.name == store.current) for p in store.profiles.values()]
    if json:
        print_json(rows)
        return
    if not rows:
        out.print("No profiles yet. 'outpost up' (a hub and an agent here) or 'outpost hub "
                  f"init' writes one. Profiles are kept in {store.path}.", markup=False)
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("CURRENT", "NAME", "HUB", "AGENT STATE DIR"):
        table.add_column(column, overflow="fold")
    for p in store.profiles.values():
        table.add_row("*" if p.name == store.current else "", p.name, p.url,
                      str(p.state_dir) if p.state_dir else "-")
    out.print(table)
    if store.current is None:
        out.print("No profile is current: pick one with 'outpost profile use NAME'.")


def _show(p: Profile, current: bool) -> None:
    out.print(f"Profile:         {p.name}{'  (current)' if current else ''}", markup=False)
    out.print(f"Hub URL:         {', '.join(p.hub_urls)}", markup=False)
    out.print(f"CA fingerprint:  {p.ca_fingerprint}", markup=False)
    where = str(p.token_file) if p.token_file else "(none)"
    out.print(f"Token:           kept in {where} "
              f"({'present' if p.has_token() else 'missing'})", markup=False)
    out.print(f"Hub data dir:    {p.data_dir or '-'}", markup=False)
    out.print(f"Agent state dir: {p.state_dir or '-'}", markup=False)


@app.command()
def show(name: Annotated[Optional[str], typer.Argument(
        help="The profile to show (default: the selected one: --profile, OUTPOST_PROFILE or "
             "the current one).")] = None,
         json: Json = False) -> None:
    """Show a profile: hub, CA fingerprint, where its token is kept (never the token)."""
    store = Profiles.load()
    name = name or store.selected_name()
    if name is None:
        from outpost.protocol.errors import OutpostError

        from .client import UNCONFIGURED_FIX

        raise OutpostError("hub_cli_unconfigured", "No profile is current.",
                           fix=UNCONFIGURED_FIX)
    profile = store.get(name)
    if json:
        print_json(profile.to_json(name == store.current))
        return
    _show(profile, name == store.current)


@app.command()
def add(
    name: Name,
    hub: Annotated[str, typer.Option("--hub", help="The hub's URL, e.g. "
                                     "https://hub.example:8443.")],
    ca_fingerprint: Annotated[str, typer.Option(
        "--ca-fingerprint", help="SHA-256 fingerprint of the hub's CA, as 'outpost hub init' "
        "printed it: 64 hex digits, with or without colons or a sha256= prefix.")],
    token_stdin: Annotated[bool, typer.Option(
        "--token-stdin", help="Read the API token from standard input (else a hidden prompt "
        "asks for it), so that it appears in no command line.")] = False,
    state_dir_: Annotated[Optional[Path], typer.Option(
        "--state-dir", help="The state directory of this machine's agent, for 'outpost "
        "agent status', 'agent logs' and 'check' with this profile.")] = None,
    check: Annotated[bool, typer.Option(
        "--check/--no-check", help="Try the hub with the pinned CA and the token before "
        "saving.")] = True,
    use_it: Annotated[bool, typer.Option("--use/--no-use", help="Make it the current "
                                         "profile.")] = True,
    json: Json = False,
) -> None:
    """Add (or replace) a profile for a hub elsewhere; the token goes to a 0600 file."""
    from outpost.protocol import fingerprint

    from .client import Api, resolve

    profile = Profile(name=name, hub_urls=[hub.rstrip("/")],
                      ca_fingerprint=fingerprint.parse(ca_fingerprint),
                      state_dir=state_dir_.resolve() if state_dir_ else None)
    if token_stdin or (sys.stdin is not None and not sys.stdin.isatty()):
        token = sys.stdin.readline().strip()
    else:
        token = str(typer.prompt("API token", hide_input=True)).strip()
    if not token:
        raise typer.BadParameter("The token is empty.", param_hint="token")
    if check:
        Api(resolve(profile.url, token, profile.ca_fingerprint, None)).get("/v1/machines")
    store = Profiles.load()
    store.put(profile, token=token, make_current=use_it)
    if json:
        print_json(profile.to_json(store.current == profile.name))
        return
    out.print(f"Profile '{profile.name}' saved{' and current' if use_it else ''}: "
              f"{profile.url}, token kept in {profile.token_file}.", markup=False)


@app.command()
def use(name: Name, json: Json = False) -> None:
    """Make a profile the current one: later commands use it unless told otherwise."""
    store = Profiles.load()
    profile = store.get(name)
    store.current = profile.name
    store.save()
    if json:
        print_json(profile.to_json(True))
        return
    out.print(f"Profile '{profile.name}' is current: commands talk to {profile.url}.",
              markup=False)


@app.command()
def remove(name: Name, json: Json = False) -> None:
    """Remove a profile and its token file (the hub itself is not touched)."""
    store = Profiles.load()
    profile, was_current = store.remove(name)
    if json:
        print_json({"removed": profile.name, "was_current": was_current,
                    "current": store.current})
        return
    out.print(f"Removed profile '{profile.name}' and its token file.", markup=False)
    if was_current:
        others = ", ".join(sorted(store.profiles))
        out.print("It was the current profile; no profile is current now. "
                  + (f"Pick one with 'outpost profile use NAME' ({others})." if others
                     else "'outpost up' or 'outpost hub init' writes a new one."),
                  markup=False)
