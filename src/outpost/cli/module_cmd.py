"""``outpost module ...``: module packages, the programs a deployment's modules run
(docs/modules.md)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer

from outpost.protocol.errors import OutpostError

from .options import CaFingerprint, DataDir, Hub, Json, Token, api
from .output import out, print_json, say, table

app = typer.Typer(no_args_is_help=True, help="Module packages: publish them, list them.")
GZIP = "application/gzip"
MANIFEST = "outpost-module.json"


def pack(directory: Path) -> bytes:
    """A directory with outpost-module.json at its root, packed as the archive the hub and
    the agent read: members sorted, times fixed (the same files give the same SHA-256);
    the program the manifest runs, files under bin/ and files executable here get mode
    755."""
    import json

    from outpost.extensions.archive import build

    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise OutpostError("ext_package_invalid", f"The module package is not valid: "
                           f"{directory / MANIFEST} cannot be read ({exc}).",
                           problem=f"{MANIFEST} cannot be read") from None
    run = (manifest.get("run") or {}).get("run") if isinstance(manifest, dict) else None
    executables = {p.relative_to(directory).as_posix() for p in directory.rglob("*")
                   if p.is_file() and os.access(p, os.X_OK)}
    return build(directory, lambda rel: rel == run or rel in executables
                 or rel.startswith("bin/"))


@app.command("publish")
def module_publish(
    path: Annotated[Path, typer.Argument(
        metavar="FILE|DIR", help="The package: a .tar.gz with outpost-module.json at its "
        "root, or a directory to pack into one.")],
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """Publish a module package. It is checked here as the hub and the agent check it (E9000
    names the problem); a published version never changes (E9151)."""
    if path.is_dir():
        data = pack(path)
    else:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise OutpostError("invalid_request", f"Cannot read {path}: {exc.strerror}.",
                               fix="Give the package's .tar.gz file or its directory."
                               ) from None
    from outpost.protocol import extpackage

    extpackage.read(data, kind="module")
    client = api(hub, token, ca_fingerprint, data_dir)
    response = client.call("POST", "/v1/modules", content=data, content_type=GZIP,
                           timeout=300)
    if json:
        print_json(response)
        return
    say(f"Published module package {response['name']} {response['version']} "
        f"({response['size']} bytes, SHA-256 {response['sha256']}).")


@app.command("list")
def module_list(hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
                data_dir: DataDir = None, json: Json = False) -> None:
    """Every published module package version of this account, newest first."""
    rows = api(hub, token, ca_fingerprint, data_dir).get("/v1/modules")
    if json:
        print_json(rows)
        return
    if not rows:
        out.print("No module packages are published in this account; publish one with "
                  "'outpost module publish FILE|DIR'.", markup=False)
        return
    table(["NAME", "VERSION", "SIZE", "SHA-256", "PUBLISHED", "DESCRIPTION"],
          [[r["name"], r["version"], r["size"], r["sha256"][:12],
            time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["published_at"])),
            r["description"]] for r in rows])
