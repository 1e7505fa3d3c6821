"""``outpost backup ...``: the shipped backup extension's goal for a group or a machine.

``backup enable`` sets the goal of the extension ``backup`` (docs/backup.md, "The backup
extension") with its handlers running as root, which is what reading a machine's files
needs, and the restic repository's password as a protected setting: generated and printed
once, or read from ``--password-file``. A goal that already has a password keeps it (a new
one would not open the repository the machine already has), unless a file is given.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from outpost.protocol.errors import OutpostError

from .extension_cmd import Group, MachineOpt, _goal_path, _q, _target
from .options import CaFingerprint, DataDir, Hub, Json, Token, api
from .output import print_json, say

NAME = "backup"
MIN_PASSWORD = 8

app = typer.Typer(no_args_is_help=True, help="Backups of machines' files with the shipped "
                  "backup extension (restic, into each machine's repository on the hub).")


def _password(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise OutpostError("backup_settings_invalid", f"The backup settings are not usable: "
                           f"the password file {path} cannot be read ({exc.strerror}).",
                           problem=f"the password file {path} cannot be read") from None
    if len(text) < MIN_PASSWORD:
        raise OutpostError("backup_settings_invalid", "The backup settings are not usable: "
                           f"the password in {path} is shorter than {MIN_PASSWORD} characters.",
                           problem="the password is too short")
    return text


def _has_password(client: Any, kind: str, target: str) -> bool:
    shown = client.get(f"/v1/extensions/{_q(NAME)}")
    return any(g["target_kind"] == kind and g["target"] == target and g["protected"]
               for g in shown.get("goals", []))


@app.command("enable")
def backup_enable(
    paths: Annotated[list[str], typer.Option(
        "--paths", "--path", metavar="P", help="A path to back up (absolute); repeat for "
        "more: --paths /etc --paths /srv.")],
    group: Group = None, machine: MachineOpt = None,
    exclude: Annotated[Optional[list[str]], typer.Option(
        "--exclude", metavar="X", help="A restic exclude pattern; repeat for more.")] = None,
    password_file: Annotated[Optional[Path], typer.Option(
        "--password-file", metavar="FILE", help="The repository password to use (at least "
        f"{MIN_PASSWORD} characters). Default: the one the goal has, else a new one, "
        "printed once.")] = None,
    pre_snapshot: Annotated[Optional[str], typer.Option(
        "--pre-snapshot", metavar="CMD", help="A command run (sh -c) before each snapshot "
        "to make the application's files consistent (a database flush).")] = None,
    pre_snapshot_timeout: Annotated[Optional[float], typer.Option(
        "--pre-snapshot-timeout", metavar="SECONDS", min=0.1, help="How long the "
        "pre-snapshot command may run (default 300); past it, it is ended and the snapshot "
        "is crash-consistent.")] = None,
    require_application: Annotated[bool, typer.Option(
        "--require-application-consistency", help="Fail the snapshot, rather than take a "
        "crash-consistent one, when the pre-snapshot command fails or overruns.")] = False,
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """Back up PATHS of a group's or a machine's machines with the backup extension.

    Its handlers run as root (--run-as root): reading every file of the paths needs it, and
    the operator asks for it by running this command. The repository's password is a
    protected setting, readable only by each target machine; the hub never sees it in the
    clear. Keep it: without it the backups cannot be read.
    """
    kind, target = _target(group, machine)
    relative = [p for p in paths if not p.startswith("/")]
    if relative:
        raise typer.BadParameter(f"give absolute paths (not {', '.join(relative)})",
                                 param_hint="'--paths'")
    client = api(hub, token, ca_fingerprint, data_dir)
    settings: dict[str, Any] = {"paths": paths}
    if exclude:
        settings["exclude"] = exclude
    if pre_snapshot:
        settings["pre_snapshot"] = pre_snapshot
    if pre_snapshot_timeout is not None:
        settings["pre_snapshot_timeout"] = pre_snapshot_timeout
    settings["consistency"] = "application" if require_application else "crash"
    body: dict[str, Any] = {"settings": settings, "run_as": "root", "enabled": True}
    generated = None
    if password_file is not None:
        body["protected_settings"] = {"repository_password": _password(password_file)}
    elif not _has_password(client, kind, target):
        generated = secrets.token_urlsafe(32)
        body["protected_settings"] = {"repository_password": generated}
    saved = client.put(_goal_path(NAME, kind, target), body)
    if json:
        print_json({**saved, **({"repository_password": generated} if generated else {})})
        return
    say(f"Backups enabled for {saved['target_kind']} '{saved['target']}': "
        f"{', '.join(paths)} (extension {NAME} {saved['resolved_version']}, run as root, "
        f"seq {saved['seq']}).")
    if generated:
        say("The repository password is shown this once. Keep it somewhere safe: without it "
            "no backup of these machines can be read or restored.")
        say(f"  {generated}")
    elif password_file is None:
        say("The repository password set before is kept.")


@app.command("disable")
def backup_disable(group: Group = None, machine: MachineOpt = None, hub: Hub = None,
                   token: Token = None, ca_fingerprint: CaFingerprint = None,
                   data_dir: DataDir = None, json: Json = False) -> None:
    """Stop backing up a group's or a machine's machines: the extension stays installed,
    disabled, with its settings and password ('backup enable' again resumes). The
    snapshots stay on the hub; 'outpost extension remove backup' uninstalls it."""
    kind, target = _target(group, machine)
    saved = api(hub, token, ca_fingerprint, data_dir).put(_goal_path(NAME, kind, target),
                                                          {"enabled": False})
    if json:
        print_json(saved)
        return
    say(f"Backups disabled for {saved['target_kind']} '{saved['target']}'; the snapshots "
        "stay on the hub.")
