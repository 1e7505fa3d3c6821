"""``outpost asset ...``: variables, credentials and certificates for runbooks (HW-2).

Secrets never need to be on the command line (where ``ps`` and shell history would show
them): a variable's value and a credential's secret come from standard input or a hidden
prompt, a certificate's password from standard input.
"""

from __future__ import annotations

import base64
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional
from urllib.parse import quote

import typer

from outpost.protocol.errors import OutpostError

from .options import CaFingerprint, DataDir, Hub, Json, Token, api
from .output import out, print_json, table

app = typer.Typer(no_args_is_help=True,
                  help="Assets: variables, credentials and certificates for runbooks.")
variable = typer.Typer(no_args_is_help=True, help="Variables (plain or --secret).")
credential = typer.Typer(no_args_is_help=True, help="Credentials: a user name and a secret.")
certificate = typer.Typer(no_args_is_help=True, help="Certificates, from PEM or PFX files.")
app.add_typer(variable, name="variable")
app.add_typer(credential, name="credential")
app.add_typer(certificate, name="certificate")

Description = Annotated[str, typer.Option(help="What the asset is for.")]
Kind = Annotated[str, typer.Argument(help="variable, credential or certificate.")]
_KINDS = ("variable", "credential", "certificate")


def _kind(text: str) -> str:
    kind = text.lower().removesuffix("s")
    if kind not in _KINDS:
        raise OutpostError("invalid_request", f"Unknown asset kind '{text}'.",
                           fix="Use variable, credential or certificate.")
    return kind


def _path(kind: str, name: str) -> str:
    return f"/v1/assets/{kind}s/{quote(name, safe='')}"


def _read_secret(what: str, confirm: bool) -> str:
    """A secret from standard input (one trailing newline dropped) or a hidden prompt."""
    if sys.stdin is not None and not sys.stdin.isatty():
        text = sys.stdin.read()
        return text[:-1] if text.endswith("\n") else text
    value: str = typer.prompt(what, hide_input=True, confirmation_prompt=confirm)
    return value


def _when(moment: float | None) -> str:
    return "" if moment is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(moment))


def _expiry(moment: float | None) -> str:
    if moment is None:
        return ""
    return _when(moment) + (" (expired)" if moment < time.time() else "")


def _stored(kind: str, stored: dict[str, Any], json: bool, extra: str = "") -> None:
    if json:
        print_json(stored)
        return
    done = "replaced" if stored.get("replaced") else "created"
    out.print(f"{kind.capitalize()} '{stored['name']}' {done}{extra}.", markup=False)


@variable.command("set")
def variable_set(
    name: str,
    value: Annotated[Optional[str], typer.Argument(
        help="The value; omit it or give '-' to read it from standard input (or a hidden "
             "prompt), so that it appears in no command line.")] = None,
    secret: Annotated[bool, typer.Option(
        help="Never show the value in list or show (it is sealed at rest either way).")]
    = False,
    description: Description = "",
    allow_empty: Annotated[bool, typer.Option(
        "--allow-empty", help="Store an empty value read from standard input or the prompt "
        "(refused otherwise, as it is most often a mistake).")] = False,
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """Create or replace variable NAME. An empty value read from standard input is refused
    unless --allow-empty; an empty VALUE argument ('') is stored as given."""
    if value is None or value == "-":
        value = _read_secret("Value", confirm=secret)
        if value == "" and not allow_empty:
            raise OutpostError("value_empty",
                               f"The value of variable '{name}' read from standard input is "
                               "empty; nothing was stored.",
                               fix="Check what feeds standard input; to store an empty value "
                                   "on purpose, pass --allow-empty.", variable=name)
    stored = api(hub, token, ca_fingerprint, data_dir).call(
        "PUT", _path("variable", name),
        json={"value": value, "secret": secret, "description": description})
    _stored("variable", stored, json, " (secret)" if secret else "")


@credential.command("set")
def credential_set(
    name: str,
    username: Annotated[str, typer.Option("--username", "-u", help="The user name.")],
    description: Description = "",
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """Create or replace credential NAME (secret from standard input or a prompt)."""
    secret = _read_secret("Secret", confirm=True)
    stored = api(hub, token, ca_fingerprint, data_dir).call(
        "PUT", _path("credential", name),
        json={"username": username, "secret": secret, "description": description})
    _stored("credential", stored, json, f" for user {username}")


@certificate.command("import")
def certificate_import(
    name: str,
    file: Annotated[Path, typer.Argument(
        help="A PEM file (certificate, optional chain and private key) or a PFX/PKCS#12 "
             "file.")],
    password_stdin: Annotated[bool, typer.Option(
        "--password-stdin", help="Read the file's password from standard input.")] = False,
    description: Description = "",
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """Import FILE as certificate NAME and show its thumbprint."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise OutpostError("invalid_request", f"Cannot read {file}: {exc.strerror or exc}",
                           fix="Give the path of a readable PEM or PFX file.") from exc
    password = sys.stdin.readline().rstrip("\r\n") if password_stdin else None
    stored = api(hub, token, ca_fingerprint, data_dir).call(
        "PUT", _path("certificate", name),
        json={"data": base64.b64encode(data).decode(), "password": password,
              "description": description})
    if json:
        print_json(stored)
        return
    done = "replaced" if stored.get("replaced") else "imported"
    key = "with" if stored["has_private_key"] else "without"
    out.print(f"Certificate '{stored['name']}' {done} ({key} a private key).", markup=False)
    out.print(f"  thumbprint: {stored['thumbprint']}", markup=False)
    out.print(f"  subject:    {stored['subject']}", markup=False)
    out.print(f"  expires:    {_expiry(stored['not_after'])}", markup=False)


def _list(kind: str | None, hub: str | None, token: str | None,
          ca_fingerprint: str | None, data_dir: Path | None, json: bool) -> None:
    rows = api(hub, token, ca_fingerprint, data_dir).get("/v1/assets")
    if kind is not None:
        rows = [r for r in rows if r["kind"] == kind]
    if json:
        print_json(rows)
        return
    if not rows:
        out.print(f"No {kind or 'asset'}s are stored in this account.")
        return
    table(["KIND", "NAME", "SECRET", "THUMBPRINT", "EXPIRES", "DESCRIPTION"], [
        [r["kind"], r["name"], "yes" if r["secret"] else "no", r["thumbprint"],
         _expiry(r["not_after"]), r["description"]] for r in rows])


@app.command("list")
def list_(hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
          data_dir: DataDir = None, json: Json = False) -> None:
    """Every asset of the account, without values."""
    _list(None, hub, token, ca_fingerprint, data_dir, json)


@variable.command("list")
def variable_list(hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
                  data_dir: DataDir = None, json: Json = False) -> None:
    """The account's variables, without values."""
    _list("variable", hub, token, ca_fingerprint, data_dir, json)


@credential.command("list")
def credential_list(hub: Hub = None, token: Token = None,
                    ca_fingerprint: CaFingerprint = None, data_dir: DataDir = None,
                    json: Json = False) -> None:
    """The account's credentials, without secrets."""
    _list("credential", hub, token, ca_fingerprint, data_dir, json)


@certificate.command("list")
def certificate_list(hub: Hub = None, token: Token = None,
                     ca_fingerprint: CaFingerprint = None, data_dir: DataDir = None,
                     json: Json = False) -> None:
    """The account's certificates: thumbprints and expiry, never a key."""
    _list("certificate", hub, token, ca_fingerprint, data_dir, json)


@app.command()
def show(kind: Kind, name: str, hub: Hub = None, token: Token = None,
         ca_fingerprint: CaFingerprint = None, data_dir: DataDir = None,
         json: Json = False) -> None:
    """One asset's details; never a secret value."""
    kind = _kind(kind)
    found = api(hub, token, ca_fingerprint, data_dir).get(_path(kind, name))
    if json:
        print_json(found)
        return
    lines = [f"{kind} {found['name']}"]
    if found["description"]:
        lines.append(f"  {found['description']}")
    if kind == "variable":
        lines.append("  value:      " + ("(secret)" if found["secret"] else found["value"]))
    elif kind == "credential":
        lines += [f"  user name:  {found['username']}", "  secret:     (secret)"]
    else:
        lines += [f"  thumbprint: {found['thumbprint']}", f"  subject:    {found['subject']}",
                  f"  expires:    {_expiry(found['not_after'])}",
                  f"  private key: {'yes' if found['has_private_key'] else 'no'}"]
    lines.append(f"  updated:    {_when(found['updated_at'])}")
    for line in lines:
        out.print(line, markup=False)


@app.command()
def remove(kind: Kind, name: str, hub: Hub = None, token: Token = None,
           ca_fingerprint: CaFingerprint = None, data_dir: DataDir = None,
           json: Json = False) -> None:
    """Remove an asset; a running job that asks for it afterwards is told it is missing."""
    kind = _kind(kind)
    done = api(hub, token, ca_fingerprint, data_dir).delete(_path(kind, name))
    if json:
        print_json(done)
        return
    out.print(f"Removed {kind} '{done['name']}'.", markup=False)
