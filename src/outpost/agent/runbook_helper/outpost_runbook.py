"""Outpost runbook helper: structured records, and assets read with the job's identity.

In a Python runbook (the helper directory is on ``PYTHONPATH``)::

    import outpost_runbook as outpost

    outpost.progress(40, "copying files")          # Progress: "40% copying files"
    outpost.warning("disk almost full")
    token = outpost.get_variable("api-token")
    user, password = outpost.get_credential("db")
    cert = outpost.get_certificate("web-tls")      # or its SHA-1 thumbprint
    cert["certificate"], cert["private_key"]       # PEM text

As a command (what ``outpost.sh`` calls)::

    python3 outpost_runbook.py variable NAME
    python3 outpost_runbook.py credential NAME user|secret
    python3 outpost_runbook.py certificate NAME_OR_THUMBPRINT [--key | --json]
    python3 outpost_runbook.py identity
    python3 outpost_runbook.py progress PERCENT TEXT...

The helper calls the hub with the job's own token, read from a file next to this module: it
is valid only while this job runs, and no certificate or key of the machine is needed. A
failed call raises ``OutpostError`` (as a command: the hub's message on stderr, exit 1).

Only the standard library is used, and Python 3.7 is enough: the runbook's python3 may be
the machine's own, without Outpost installed.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["OutpostError", "warning", "verbose", "debug", "progress", "get_variable",
           "get_credential", "get_certificate", "identity", "request"]

TOKEN_FILE = "job.token"
CA_FILE = "ca.pem"
CONFIG_FILE = "helper.json"
TIMEOUT = 30.0
ATTEMPTS = 3


class OutpostError(Exception):
    """The hub refused a call or could not be reached; ``code`` is its catalog code."""

    def __init__(self, message: str, code: str = "", fix: str = "", status: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.fix = fix
        self.status = status


# --- records --------------------------------------------------------------------------------

def _record(prefix: str, text: object) -> None:
    # Every line gets the prefix, or the lines after the first would land in Output.
    for line in str(text).splitlines() or [""]:
        sys.stdout.write(f"{prefix}: {line}\n")
    sys.stdout.flush()


def warning(text: object) -> None:
    """A record in the job's Warning stream."""
    _record("WARNING", text)


def verbose(text: object) -> None:
    """A record in the Verbose stream (kept when the runbook is published --log-verbose)."""
    _record("VERBOSE", text)


def debug(text: object) -> None:
    """A record in the Debug stream."""
    _record("DEBUG", text)


def progress(percent: float, text: str = "") -> None:
    """A record in the Progress stream, ``PERCENT% TEXT`` (kept with --log-progress)."""
    if isinstance(percent, bool) or not isinstance(percent, (int, float)) \
            or not 0 <= percent <= 100:
        raise ValueError(f"progress needs a percentage from 0 to 100, not {percent!r}")
    _record("PROGRESS", f"{percent:g}% {text}".rstrip())


# --- calling the hub with the job's identity ------------------------------------------------

def _helper_dir() -> Path:
    return Path(os.environ.get("OUTPOST_HELPER_DIR") or Path(__file__).resolve().parent)


def _hub_url(folder: Path) -> str:
    url = os.environ.get("OUTPOST_HUB_URL", "")
    if not url:
        try:
            url = str(json.loads((folder / CONFIG_FILE).read_text())["hub_url"])
        except (OSError, ValueError, KeyError) as exc:
            raise OutpostError(f"The helper cannot tell the hub's address: {exc}") from exc
    return url.rstrip("/")


def _refusal(exc: urllib.error.HTTPError) -> OutpostError:
    try:
        body = json.loads(exc.read() or b"{}")
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    return OutpostError(str(body.get("message") or f"The hub answered HTTP {exc.code}."),
                        str(body.get("code") or ""), str(body.get("fix") or ""), exc.code)


def request(method: str, path: str, body: Any = None) -> Any:
    """Call the hub's API as this job; returns the decoded JSON answer."""
    folder = _helper_dir()
    try:
        token = (folder / TOKEN_FILE).read_text().strip()
    except OSError as exc:
        raise OutpostError(f"The job token is not available ({exc}); the helper works only "
                           "inside a running Outpost job.") from exc
    context = ssl.create_default_context(cafile=str(folder / CA_FILE))
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        _hub_url(folder) + path, data=data, method=method,
        headers={"Authorization": f"Bearer {token}", "Accept": "application/json",
                 "Content-Type": "application/json", "User-Agent": "outpost-runbook-helper"})
    for attempt in range(ATTEMPTS):
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT, context=context) as answer:
                return json.loads(answer.read() or b"null")
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt == ATTEMPTS - 1:
                raise _refusal(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            if attempt == ATTEMPTS - 1:
                raise OutpostError(f"The hub could not be reached: {exc}") from None
        time.sleep(0.5 * 2 ** attempt)
    raise AssertionError("unreachable")


def _asset(kind: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = request(
        "GET", f"/v1/job/assets/{kind}/{urllib.parse.quote(name, safe='')}")
    return found


def get_variable(name: str) -> str:
    """The value of a variable asset of the job's account."""
    return str(_asset("variables", name)["value"])


def get_credential(name: str) -> tuple[str, str]:
    """(user name, secret) of a credential asset."""
    found = _asset("credentials", name)
    return str(found["username"]), str(found["secret"])


def get_certificate(name_or_thumbprint: str) -> dict[str, Any]:
    """A certificate asset by name or SHA-1 thumbprint: ``certificate`` (PEM, leaf first),
    ``private_key`` (PEM or None), ``thumbprint``, ``subject``, ``not_after``."""
    return _asset("certificates", name_or_thumbprint)


def identity() -> dict[str, Any]:
    """The job this helper speaks for: job id, account, runbook, machine."""
    found: dict[str, Any] = request("GET", "/v1/job/identity")
    return found


# --- the command ----------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="outpost_runbook.py",
                                     description="Outpost runbook helper.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("variable", help="print a variable's value").add_argument("name")
    cred = sub.add_parser("credential", help="print a credential's user name or secret")
    cred.add_argument("name")
    cred.add_argument("field", choices=("user", "secret"))
    cert = sub.add_parser("certificate", help="print a certificate (PEM)")
    cert.add_argument("name", metavar="NAME_OR_THUMBPRINT")
    what = cert.add_mutually_exclusive_group()
    what.add_argument("--key", action="store_true", help="print its private key instead")
    what.add_argument("--json", action="store_true", help="print everything as JSON")
    sub.add_parser("identity", help="print the job identity (JSON)")
    for name in ("warning", "verbose", "debug"):
        sub.add_parser(name, help=f"write a {name} record").add_argument("text", nargs="*")
    prog = sub.add_parser("progress", help="write a progress record")
    prog.add_argument("percent", type=float)
    prog.add_argument("text", nargs="*")
    return parser


def _run(args: argparse.Namespace) -> None:
    if args.command == "variable":
        sys.stdout.write(get_variable(args.name) + "\n")
    elif args.command == "credential":
        user, secret = get_credential(args.name)
        sys.stdout.write((user if args.field == "user" else secret) + "\n")
    elif args.command == "certificate":
        cert = get_certificate(args.name)
        if args.json:
            sys.stdout.write(json.dumps(cert, indent=2) + "\n")
        elif args.key:
            if not cert.get("private_key"):
                raise OutpostError(f"Certificate '{cert['name']}' ({cert['thumbprint']}) was "
                                   "imported without a private key.")
            sys.stdout.write(str(cert["private_key"]))
        else:
            sys.stdout.write(str(cert["certificate"]))
    elif args.command == "identity":
        sys.stdout.write(json.dumps(identity(), indent=2) + "\n")
    elif args.command == "progress":
        progress(args.percent, " ".join(args.text))
    else:
        _record(args.command.upper(), " ".join(args.text))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except OutpostError as exc:
        # The message alone on its line, as the hub wrote it; the code and fix after it.
        sys.stderr.write(exc.message + "\n")
        if exc.code:
            sys.stderr.write(f"  ({exc.code}) {exc.fix}\n")
        return 1
    except ValueError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
else:
    # Records from the helper flush at once; line buffering keeps the runbook's own prints
    # in order with them when stdout is a pipe.
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(line_buffering=True)
