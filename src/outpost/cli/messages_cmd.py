"""``outpost messages ...``: upstream messages that machines' modules sent to the hub, and
direct calls of a module's method."""

from __future__ import annotations

import base64
import json as jsonlib
import sys
import time
from typing import Annotated, Any, Optional
from urllib.parse import quote

import typer

from .options import CaFingerprint, DataDir, Hub, Json, Token, api
from .output import cell, out, print_json, safe, value_text
from .signals import ReaderGone, daemon

app = typer.Typer(no_args_is_help=True, help="Upstream messages from machines' modules, "
                  "and direct calls of a module's method (docs/messages.md).")

FOLLOW_WAIT = 25  # seconds each long-poll of --follow is held by the hub


def body_text(encoded: str) -> str:
    """A body as text when it is printable UTF-8, else its base64 (tagged ``base64:``)."""
    raw = base64.b64decode(encoded)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return f"base64:{encoded}"
    if any(ord(c) < 0x20 and c not in "\t" for c in text) or "\x7f" in text:
        return f"base64:{encoded}"
    return text


def line(message: dict[str, Any]) -> str:
    """One message on one line: time, machine, module/output, properties, body; escaped."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(message["received_at"]))
    props = value_text(message["properties"]) if message["properties"] else "-"
    return " ".join([stamp, cell(message["machine"]),
                     safe(f"{message['module']}/{message['output']}", one_line=True),
                     props, safe(body_text(message["body"]), one_line=True)])


def _show(messages: list[dict[str, Any]], json: bool) -> None:
    for message in messages:
        if json:
            sys.stdout.write(jsonlib.dumps(message) + "\n")
        else:
            sys.stdout.write(line(message) + "\n")
    try:
        sys.stdout.flush()
    except BrokenPipeError as exc:
        raise ReaderGone from exc


@app.command()
def tail(
    machine: Annotated[Optional[str], typer.Option(help="Only this machine's messages.")]
    = None,
    module: Annotated[Optional[str], typer.Option(help="Only this module's messages.")]
    = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing messages "
                                         "as they arrive (Ctrl-C stops).")] = False,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many of the newest to "
                                       "print first.")] = 20,
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None,
    json: Annotated[bool, typer.Option("--json", help="JSON as the API gives it (the body "
                                       "in base64): a list, or with -f one object a "
                                       "line.")] = False,
) -> None:
    """Print the newest upstream messages, oldest first: time, machine, module/output,
    properties, body (text when it is printable UTF-8, else base64:...)."""
    client = api(hub, token, ca_fingerprint, data_dir)
    params: dict[str, Any] = {"limit": limit}
    if machine is not None:
        params["machine"] = machine
    if module is not None:
        params["module"] = module
    page = client.get("/v1/messages", params=params)
    if json and not follow:
        print_json(list(reversed(page["messages"])))
        return
    if not follow and not page["messages"]:
        out.print("No upstream messages" + (" match." if machine or module else " yet."))
        return
    _show(list(reversed(page["messages"])), json)
    if not follow:
        return
    daemon()
    cursor = page["cursor"]
    try:
        while True:
            page = client.get_riding_out("/v1/messages", params={
                **params, "after": cursor, "limit": 1000, "wait": FOLLOW_WAIT},
                timeout=FOLLOW_WAIT + 30)
            _show(page["messages"], json)
            cursor = page["cursor"]
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


@app.command()
def call(
    machine: str, module: str, method: str,
    payload: Annotated[Optional[str], typer.Option(help="The call's payload, JSON.")] = None,
    timeout: Annotated[float, typer.Option(min=0.001, max=300, help="Seconds the module "
                                           "has to reply.")] = 30.0,
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """Call a module's method on a machine and print its reply (status and payload)."""
    try:
        body = jsonlib.loads(payload) if payload is not None else None
    except ValueError as exc:
        raise typer.BadParameter(f"--payload is not JSON: {exc}") from None
    client = api(hub, token, ca_fingerprint, data_dir)
    path = (f"/v1/machines/{quote(machine, safe='')}/modules/{quote(module, safe='')}"
            f"/methods/{quote(method, safe='')}")
    answer = client.post(path, {"payload": body, "timeout_seconds": timeout},
                         timeout=timeout + 30)
    if json:
        print_json(answer)
        return
    out.print(f"status {answer['status']}", markup=False, highlight=False)
    if answer.get("payload") is not None:
        out.print(safe(jsonlib.dumps(answer["payload"], indent=2, ensure_ascii=False)),
                  markup=False, highlight=False)
