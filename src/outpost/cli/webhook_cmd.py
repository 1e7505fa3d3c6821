"""``outpost webhook ...``: secret addresses whose POST starts a runbook job."""

from __future__ import annotations

import time
from typing import Annotated, Any, Optional
from urllib.parse import quote, urlsplit

import typer

from outpost.protocol.params import split_assignments

from .job_cmd import short_ids
from .options import CaFingerprint, DataDir, Hub, Json, Token, api
from .output import ago, err, out, print_json, say, table

app = typer.Typer(no_args_is_help=True, help="Webhooks: a secret URL whose POST starts a "
                  "runbook job with the request body as its parameter 'body'.")


def _expires(w: dict[str, Any]) -> str:
    if w["expires_at"] is None:
        return "never"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(w["expires_at"]))
    return f"{stamp} (expired)" if w["expired"] else stamp


@app.command()
def create(
    name: str,
    runbook: Annotated[str, typer.Option(help="The runbook to start; it must declare the "
                                         "parameter 'body' (string or json).")],
    group: Annotated[str, typer.Option(help="The group whose machines may run it.")],
    expires: Annotated[Optional[str], typer.Option(
        help="ISO 8601 date or date and time after which the URL answers 404 "
             "(2030-01-31, 2030-01-31T18:00+01:00; UTC without a zone).")] = None,
    param: Annotated[Optional[list[str]], typer.Option(
        help="NAME=VALUE given to every job; repeatable.")] = None,
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """Make a webhook and print its secret URL. The URL is shown this once: keep it.

    Standard output has the URL alone; standard error says how callers trust the hub's CA
    (which signs its certificate) and a curl line that calls the URL."""
    body: dict[str, Any] = {"name": name, "runbook": runbook, "group": group,
                            "params": split_assignments(param or []), "expires": expires}
    client = api(hub, token, ca_fingerprint, data_dir)
    target = client.target
    made = client.post("/v1/webhooks", body)
    if json:
        print_json(made)
        return
    out.print(made["url"], markup=False, highlight=False)
    err.print(f"Created webhook {made['name']}: a POST to the URL above starts "
              f"{made['runbook_name']} on group {made['group_name']} with the request body "
              f"as 'body'; expires {_expires(made)}. The URL is its only key and is not "
              "shown again.", markup=False)
    err.print(caller_help(made["url"], _fingerprint(target.ca_pem)), markup=False,
              highlight=False)


def _fingerprint(pem: str) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    digest = x509.load_pem_x509_certificate(pem.encode()).fingerprint(hashes.SHA256())
    return ":".join(f"{b:02X}" for b in digest)


def caller_help(url: str, fingerprint: str) -> str:
    """How a caller reaches the URL: the hub's certificate is signed by the hub's own CA,
    which no system trusts, so a caller must be given that CA (the secret URL itself is left
    out: it is printed once, on stdout)."""
    parts = urlsplit(url)
    origin = f"{parts.scheme}://{parts.netloc}"
    return (
        "Callers must trust the hub's CA (it signs the hub's certificate; no public CA "
        "does). Give them the hub's ca.pem, or let them fetch it and check its fingerprint:\n"
        f"  curl -sk {origin}/v1/ca -o outpost-ca.pem\n"
        "  openssl x509 -in outpost-ca.pem -noout -fingerprint -sha256\n"
        f"  # must print: sha256 Fingerprint={fingerprint}\n"
        "Then call the webhook (URL is the address above; the body reaches the runbook as "
        "'body'):\n"
        "  curl --fail --cacert outpost-ca.pem -X POST -H 'Content-Type: application/json' "
        "--data '{\"ref\": \"main\"}' \"$URL\"")


@app.command("list")
def list_(hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
          data_dir: DataDir = None, json: Json = False) -> None:
    """Every webhook of the account (never their secret URLs)."""
    rows = api(hub, token, ca_fingerprint, data_dir).get("/v1/webhooks")
    if json:
        print_json(rows)
        return
    if not rows:
        out.print("No webhooks in this account.")
        return
    short = short_ids([w["last_job_id"] for w in rows if w["last_job_id"]])
    table(["NAME", "RUNBOOK", "GROUP", "EXPIRES", "LAST USED", "LAST JOB"], [
        [w["name"], w["runbook_name"], w["group_name"], _expires(w), ago(w["last_used_at"]),
         short.get(w["last_job_id"]) or "-"] for w in rows])


@app.command()
def remove(name: str, hub: Hub = None, token: Token = None,
           ca_fingerprint: CaFingerprint = None, data_dir: DataDir = None,
           json: Json = False) -> None:
    """Remove a webhook; its URL answers 404 from now on."""
    done = api(hub, token, ca_fingerprint, data_dir).delete(
        f"/v1/webhooks/{quote(name, safe='')}")
    if json:
        print_json(done)
        return
    say(f"Removed webhook {name}.")
