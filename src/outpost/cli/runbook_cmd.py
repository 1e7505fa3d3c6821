"""``outpost runbook ...``: publish versioned runbooks and read them back."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional
from urllib.parse import quote

import typer

from outpost.protocol.errors import OutpostError

from .options import CaFingerprint, DataDir, Hub, Json, Token, api
from .output import out, print_json, say, table, value_text

app = typer.Typer(no_args_is_help=True, help="Runbooks: versioned scripts with typed parameters.")

Version = Annotated[Optional[int], typer.Option(help="A version (default: the latest).",
                                                min=1)]


def _params(specs: list[dict[str, object]]) -> str:
    parts = []
    for p in specs:
        text = f"{p['name']}:{p['type']}"
        if not p["required"]:
            text += f"={value_text(p['default'])}"  # JSON: false, {"a": 1}
        parts.append(text)
    return " ".join(parts) or "-"


@app.command()
def publish(
    name: str,
    file: Annotated[Path, typer.Argument(help="The script to publish.")],
    type_: Annotated[Optional[str], typer.Option(
        "--type", help="bash, sh, python or pwsh (default: from the extension or shebang).")]
    = None,
    description: Annotated[str, typer.Option(help="What the runbook does.")] = "",
    param: Annotated[Optional[list[str]], typer.Option(
        help="NAME:TYPE[=DEFAULT]; TYPE string, int, bool or json; no default means "
             "required. Repeatable.")] = None,
    log_verbose: Annotated[bool, typer.Option(
        help="Keep the Verbose stream of its jobs (HW-8).")] = False,
    log_progress: Annotated[bool, typer.Option(
        help="Keep the Progress stream of its jobs (HW-8).")] = False,
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """Store FILE as a new version of runbook NAME; the same content, type, description,
    parameters and switches as the latest version store nothing and say so."""
    try:
        content = file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise OutpostError("invalid_request", f"Cannot read {file}: {exc}",
                           fix="Give the path of a readable UTF-8 text file.") from exc
    stored = api(hub, token, ca_fingerprint, data_dir).post("/v1/runbooks", {
        "name": name, "content": content, "type": type_, "filename": file.name,
        "description": description, "params": param or [], "log_verbose": log_verbose,
        "log_progress": log_progress})
    if json:
        print_json({k: v for k, v in stored.items() if k != "content"})
        return
    if stored.get("unchanged"):
        say(f"Unchanged: {stored['name']} version {stored['version']} already has this "
            "content, type, description, parameters and switches; no new version was "
            "stored.")
        return
    say(f"Published {stored['name']} version {stored['version']} ({stored['type']}, "
        f"parameters: {_params(stored['params'])}).")


@app.command("list")
def list_(hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
          data_dir: DataDir = None, json: Json = False) -> None:
    """The latest version of every runbook."""
    rows = api(hub, token, ca_fingerprint, data_dir).get("/v1/runbooks")
    if json:
        print_json(rows)
        return
    if not rows:
        out.print("No runbooks are published in this account.")
        return
    table(["NAME", "VERSION", "TYPE", "PARAMETERS", "PUBLISHED", "DESCRIPTION"], [
        [r["name"], f"{r['version']} of {r['versions']}", r["type"], _params(r["params"]),
         time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["created_at"])), r["description"]]
        for r in rows])


def _fetch(name: str, version: int | None, hub: str | None, token: str | None,
           ca_fingerprint: str | None, data_dir: Path | None) -> dict[str, object]:
    params = {"version": version} if version is not None else None
    found: dict[str, object] = api(hub, token, ca_fingerprint, data_dir).get(
        f"/v1/runbooks/{quote(name, safe='')}", params=params)
    return found


@app.command()
def show(name: str, version: Version = None, hub: Hub = None, token: Token = None,
         ca_fingerprint: CaFingerprint = None, data_dir: DataDir = None,
         json: Json = False) -> None:
    """A runbook's version, type, parameters, switches and content."""
    rb = _fetch(name, version, hub, token, ca_fingerprint, data_dir)
    if json:
        print_json(rb)
        return
    say(f"{rb['name']} version {rb['version']} ({rb['type']})")
    if rb["description"]:
        say(f"  {rb['description']}")
    say(f"  parameters:   {_params(rb['params'])}")  # type: ignore[arg-type]
    say(f"  log verbose:  {value_text(rb['log_verbose'])}   "
        f"log progress: {value_text(rb['log_progress'])}")
    say(f"  sha256:       {rb['sha256']}\n")
    say(str(rb["content"]))  # 'runbook get' writes it as it is


@app.command()
def get(name: str,
        output: Annotated[Path, typer.Option("-o", "--output", help="Where to write it.")],
        version: Version = None, hub: Hub = None, token: Token = None,
        ca_fingerprint: CaFingerprint = None, data_dir: DataDir = None) -> None:
    """Write a runbook's content to a file."""
    rb = _fetch(name, version, hub, token, ca_fingerprint, data_dir)
    output.write_text(str(rb["content"]))
    out.print(f"Wrote {rb['name']} version {rb['version']} to {output}.")


@app.command()
def remove(name: str, hub: Hub = None, token: Token = None,
           ca_fingerprint: CaFingerprint = None, data_dir: DataDir = None,
           json: Json = False) -> None:
    """Remove every version of runbook NAME. Refused while a schedule, a webhook or an
    unfinished job uses it (they are named); jobs it ran keep their history and output."""
    done = api(hub, token, ca_fingerprint, data_dir).delete(f"/v1/runbooks/{quote(name, safe='')}")
    if json:
        print_json(done)
        return
    out.print(f"Removed runbook {done['name']} ({done['versions']} version"
              f"{'' if done['versions'] == 1 else 's'}).", markup=False)

