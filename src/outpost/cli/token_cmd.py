"""``outpost token ...``: the operator API's tokens of the caller's account."""

from __future__ import annotations

import time
from typing import Annotated
from urllib.parse import quote

import typer

from .options import CaFingerprint, DataDir, Hub, Json, Token, api
from .output import print_json, say, table

app = typer.Typer(no_args_is_help=True, help="API tokens of this account: create, list, "
                  "revoke.")


@app.command("create")
def token_create(
    name: str,
    admin: Annotated[bool, typer.Option(
        "--admin", help="An admin token (only an admin token may create one).")] = False,
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """Create an API token in this account, printed this once.

    The hub keeps only the token's SHA-256: a lost token cannot be shown again (revoke it and
    create another)."""
    made = api(hub, token, ca_fingerprint, data_dir).post(
        "/v1/tokens", {"name": name, "admin": admin})
    if json:
        print_json(made)
        return
    say(f"Token '{made['name']}' created{' (admin)' if made['admin'] else ''}, id "
        f"{made['id']}. It is shown this once:")
    say(f"  {made['token']}")


@app.command("list")
def token_list(hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
               data_dir: DataDir = None, json: Json = False) -> None:
    """The tokens of this account (never the tokens themselves)."""
    rows = api(hub, token, ca_fingerprint, data_dir).get("/v1/tokens")
    if json:
        print_json(rows)
        return
    table(["ID", "NAME", "ADMIN", "CREATED"],
          [[r["id"], r["name"], "yes" if r["admin"] else "",
            time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["created_at"]))] for r in rows])


@app.command("revoke")
def token_revoke(id_or_name: Annotated[str, typer.Argument(
                     metavar="ID_OR_NAME", help="The token's id or name ('token list').")],
                 hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
                 data_dir: DataDir = None, json: Json = False) -> None:
    """Revoke a token: every hub replica refuses it within a second.

    The last admin token, and the account's last token, are not revoked (E8101, E8102):
    create the next one first."""
    done = api(hub, token, ca_fingerprint, data_dir).delete(
        f"/v1/tokens/{quote(id_or_name, safe='')}")
    if json:
        print_json(done)
        return
    say(f"Token '{done['name']}' ({done['id']}) revoked.")
