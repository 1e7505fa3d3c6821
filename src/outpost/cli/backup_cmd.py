"""``outpost backup ...``: the shipped backup extension's goal for a group or a machine, its
operations on one machine (``now``, ``restore``, ``forget``), and the hub's catalog of the
snapshots they took (``list``, ``show``).

``backup enable`` sets the goal of the extension ``backup`` (docs/backup.md, "The backup
extension") with its handlers running as root, which is what reading a machine's files
needs, and the restic repository's password as a protected setting: generated and printed
once, or read from ``--password-file``. A goal that already has a password keeps it (a new
one would not open the repository the machine already has), unless a file is given.

The operations are the extension's (``POST .../extensions/backup/operations/OP``), followed
to their end with ``--wait``; a snapshot is named by its id, a unique start of it, or
``latest``, resolved by the hub's catalog (docs/backup.md, "The backup commands").
"""

from __future__ import annotations

import secrets
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from outpost.protocol import durations
from outpost.protocol.errors import OutpostError

from .extension_cmd import ENDED, Group, MachineOpt, _goal_path, _q, _target
from .options import CaFingerprint, DataDir, Hub, Json, Token, api
from .output import ago, cell, err, out, print_json, say, table

NAME = "backup"


class Transport(str, Enum):
    """How restic reaches the hub (the backup extension's setting ``transport``)."""

    auto = "auto"
    direct = "direct"
    bridge = "bridge"
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


def _has_password(client: Any, kind: str, target: str,
                  names: tuple[str, ...] = (NAME, "recovery")) -> bool:
    """Whether the goal of the backup (or recovery) extension for the target holds a
    repository password already: the two share the machine's repository, and the hub gives
    a goal without one the other's."""
    for name in names:
        try:
            shown = client.get(f"/v1/extensions/{_q(name)}")
        except OutpostError as exc:
            if exc.reason == "ext_not_found":
                continue
            raise
        if any(g["target_kind"] == kind and g["target"] == target and g["protected"]
               for g in shown.get("goals", [])):
            return True
    return False


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
    transport: Annotated[Optional[Transport], typer.Option(
        "--transport", case_sensitive=False, help="How restic reaches the hub: auto (the "
        "default: directly with restic 0.17 and later, else through outpost-restic-bridge), "
        "direct, or bridge (docs/backup.md, \"Why two ways, and which one is used\").")] = None,
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
    if transport is not None:
        settings["transport"] = transport.value
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


# --- operations and the catalog -------------------------------------------------------------
MachineArg = Annotated[str, typer.Argument(metavar="MACHINE", help="The machine (its name or "
                                           "id).")]
Wait = Annotated[bool, typer.Option("--wait", help="Follow the operation to its end: exit 0 "
                                    "when it succeeded, 1 when it failed.")]
Timeout = Annotated[Optional[str], typer.Option(
    "--timeout", metavar="DURATION", help="With --wait: stop following after this long "
    "(E9113; the operation goes on). Default: until it ends.")]
KEEP = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


def _size(value: int | None) -> str:
    if value is None:
        return ""
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if amount < 1024 or unit == "TiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return str(value)


def _when(moment: float | None) -> str:
    return "" if moment is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(moment))


def _waited(row: dict[str, Any]) -> str:
    if not row.get("waited_seconds"):
        return ""
    reason = f" ({row['wait_reason']})" if row.get("wait_reason") else ""
    return f"{row['waited_seconds']:g} s{reason}"


def _run(client: Any, machine: str, operation: str, params: dict[str, Any], wait: bool,
         timeout: str | None, json: bool) -> dict[str, Any]:
    """Ask for ``operation`` of the backup extension on ``machine``; with ``wait`` follow it
    to its end."""
    op: dict[str, Any] = client.post(f"/v1/machines/{_q(machine)}/extensions/{NAME}/"
                                     f"operations/{operation}", {"params": params})
    return _follow(client, op, wait, timeout, json)


def _follow(client: Any, op: dict[str, Any], wait: bool, timeout: str | None,
            json: bool) -> dict[str, Any]:
    """With ``wait``, the operation at its end, each change of its state (why it waits)
    said on stderr meanwhile; E9113 past ``timeout``."""
    limit = durations.parse(timeout, "--timeout", positive=True) if timeout else None
    if not wait:
        return op
    started, shown, operation = time.monotonic(), "", op["operation"]
    while op["status"] not in ENDED:
        line = f"{op['status']}: {op['message']}" if op["message"] else op["status"]
        if line != shown and not json:
            err.print(f"{operation} {op['id'][:8]}: {line}", markup=False, highlight=False)
            shown = line
        if limit is not None and time.monotonic() - started >= limit:
            raise OutpostError("backup_wait_timeout", f"The {operation} operation {op['id']} "
                               f"did not end within {limit:g} s; it is {op['status']}"
                               + (f" ({op['message']})" if op["message"] else "") + ".",
                               operation=operation, op_id=op["id"], seconds=limit)
        time.sleep(1.0)
        op = client.get_riding_out(f"/v1/extension-operations/{_q(op['id'])}")
    return op


def _failed(op: dict[str, Any]) -> None:
    """An operation that did not succeed: its code and message on stderr, exit 1."""
    if op["status"] == "Succeeded":
        return
    err.print(f"error: the {op['operation']} operation {op['id']} on {op['machine']} failed"
              f" ({op['code'] or 'no code'}): {op['message']}", markup=False, highlight=False)
    err.print(f"See its output with 'outpost extension operation {op['id']}'.", markup=False,
              highlight=False)
    raise typer.Exit(1)


def _asked(op: dict[str, Any]) -> None:
    say(f"Asked {op['operation']} of backup on {op['machine']}: operation {op['id']} is "
        f"{op['status']}; follow it with 'outpost extension operation {op['id']}'.")


def _resolve(client: Any, machine: str, snapshot: str) -> dict[str, Any]:
    """The catalog's snapshot SNAPSHOT names (E9110, E9111), not forgotten (E9112)."""
    row: dict[str, Any] = client.get(f"/v1/machines/{_q(machine)}/backups/{_q(snapshot)}")
    if row["forgotten_at"] is not None:
        raise OutpostError("backup_snapshot_forgotten", f"Snapshot {row['short_id']} of "
                           f"machine {row['machine']} was forgotten (operation "
                           f"{row['forgotten_by']}).", snapshot=row["short_id"],
                           machine=row["machine"])
    return row


def _snapshot_lines(row: dict[str, Any]) -> None:
    lines = [
        ("snapshot", row["short_id"]),
        ("id", row["snapshot_id"] or ""),
        ("machine", row["machine"]),
        ("taken", _when(row["taken_at"] or row["created_at"])),
        ("paths", ", ".join(row["paths"])),
        ("files", row["files"]),
        ("size", f"{_size(row['total_bytes'])} ({row['total_bytes']} bytes)"
         if row["total_bytes"] is not None else ""),
        ("added", f"{_size(row['bytes_added'])} ({row['bytes_added']} bytes)"
         if row["bytes_added"] is not None else ""),
        ("duration", f"{row['duration_seconds']:g} s" if row["duration_seconds"] is not None
         else ""),
        ("consistency", row["consistency"] or ""),
        ("waited", _waited(row) or "no"),
        ("operation", row["op_id"] or ""),
        ("forgotten", f"{_when(row['forgotten_at'])} (operation {row['forgotten_by']})"
         if row["forgotten_at"] else ""),
    ]
    for label, value in lines:
        if value != "" or label in ("waited",):
            say(f"{label + ':':<13} {cell(value)}")


@app.command("now")
def backup_now(machine: MachineArg, wait: Wait = False, timeout: Timeout = None,
               hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
               data_dir: DataDir = None, json: Json = False) -> None:
    """Take a snapshot of MACHINE's backup paths now (the extension's snapshot operation).

    With --wait, follow it (saying why it waits, when the machine's load holds it back) and
    print the snapshot: id, files, size, duration. Exit 1 when it fails, with its code."""
    client = api(hub, token, ca_fingerprint, data_dir)
    op = _run(client, machine, "snapshot", {}, wait, timeout, json)
    if not wait:
        print_json(op) if json else _asked(op)
        return
    if op["status"] != "Succeeded":
        if json:
            print_json({"operation": op, "snapshot": None})
        _failed(op)
    short = (op["result"] or {}).get("snapshot")
    row = client.get(f"/v1/machines/{_q(machine)}/backups/{_q(short)}") if short else None
    if json:
        print_json({"operation": op, "snapshot": row})
        return
    if row is None:
        say(f"The snapshot operation {op['id']} succeeded: {op['message']}")
        return
    say(f"Snapshot {row['short_id']} of {row['machine']}: {row['files']} files, "
        f"{_size(row['total_bytes'])} ({_size(row['bytes_added'])} new), in "
        f"{row['duration_seconds']:g} s, {row['consistency']}-consistent"
        + (f"; waited {_waited(row)}" if _waited(row) else "") + ".")
    if op["status"] == "Succeeded" and op["message"] and "(" in op["message"]:
        say(op["message"])  # the pre-snapshot step's note


@app.command("list")
def backup_list(
    machine: Annotated[Optional[str], typer.Argument(
        metavar="MACHINE", help="Only this machine's snapshots (default: every machine of "
        "the account).")] = None,
    forgotten: Annotated[bool, typer.Option(
        "--forgotten", help="Also the snapshots a forget removed.")] = False,
    kind: Annotated[str, typer.Option(
        "--kind", metavar="backup|recovery|all", help="backup (the default): the backup "
        "extension's snapshots; recovery: the recovery points of protected machines; all: "
        "both.")] = "backup",
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """The snapshots the hub's catalog holds, newest first: id, machine, time, files, size,
    duration and how long the machine's load held them back ('show' and --json say more)."""
    if kind not in ("backup", "recovery", "all"):
        raise typer.BadParameter(f"give backup, recovery or all (not {kind})",
                                 param_hint="'--kind'")
    client = api(hub, token, ca_fingerprint, data_dir)
    query = "?" + "&".join(["kind=" + kind] + (["forgotten=true"] if forgotten else []))
    rows = client.get((f"/v1/machines/{_q(machine)}/backups" if machine
                       else "/v1/backups") + query)
    if json:
        print_json(rows)
        return
    if not rows:
        out.print("No snapshots" + (f" of {machine}" if machine else "") + "; take one with "
                  "'outpost backup now MACHINE --wait'.", markup=False)
        return
    # Fits 80 columns: the bytes added, consistency and wait reason are in 'show'.
    table(["SNAPSHOT", "MACHINE", "TAKEN", "FILES", "SIZE", "TOOK", "WAITED"]
          + (["KIND"] if kind == "all" else []) + (["FORGOTTEN"] if forgotten else []),
          [[r["short_id"], r["machine"], ago(r["taken_at"] or r["created_at"]), r["files"],
            _size(r["total_bytes"]),
            f"{r['duration_seconds']:.1f} s" if r["duration_seconds"] is not None else "",
            f"{r['waited_seconds']:.0f} s" if r["waited_seconds"] else ""]
           + ([r.get("kind", "backup")] if kind == "all" else [])
           + ([ago(r["forgotten_at"]) if r["forgotten_at"] else ""] if forgotten else [])
           for r in rows])


@app.command("show")
def backup_show(
    machine: MachineArg,
    snapshot: Annotated[str, typer.Argument(metavar="SNAPSHOT", help="Its id, a unique "
                                            "start of it (4+ characters), or 'latest'.")],
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """One snapshot of MACHINE: ids, time, paths, files, size, duration, consistency, the
    load it waited for, and whether a forget removed it."""
    row = api(hub, token, ca_fingerprint, data_dir).get(
        f"/v1/machines/{_q(machine)}/backups/{_q(snapshot)}")
    if json:
        print_json(row)
        return
    _snapshot_lines(row)


@app.command("restore")
def backup_restore(
    machine: MachineArg,
    snapshot: Annotated[str, typer.Argument(metavar="SNAPSHOT", help="Its id, a unique "
                                            "start of it, or 'latest' (the default).")]
    = "latest",
    target: Annotated[Optional[str], typer.Option(
        "--target", metavar="PATH", help="Restore under this absolute directory (the files "
        "keep their full paths below it). Default: / (the files' own places).")] = None,
    include: Annotated[Optional[list[str]], typer.Option(
        "--include", metavar="PAT", help="Only what this restic pattern matches; "
        "repeatable.")] = None,
    to: Annotated[Optional[str], typer.Option(
        "--to", metavar="MACHINE2", help="Restore on another machine of the account; it "
        "reads MACHINE's repository through a read-only grant for this one operation.")]
    = None,
    wait: Wait = False, timeout: Timeout = None,
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """Put a snapshot of MACHINE back, as root (owners and modes as they were): on MACHINE,
    or with --to on another machine of the account (which needs the backup extension set
    too), in the files' own places or under --target."""
    if target is not None and not target.startswith("/"):
        raise typer.BadParameter(f"give an absolute path (not {target})",
                                 param_hint="'--target'")
    client = api(hub, token, ca_fingerprint, data_dir)
    body: dict[str, Any] = {"to": to, "target": target, "include": include or []}
    op = _follow(client, client.post(f"/v1/machines/{_q(machine)}/backups/{_q(snapshot)}/"
                                     "restore", body), wait, timeout, json)
    if json:
        print_json(op)
    elif not wait:
        _asked(op)
    if not wait:
        return
    _failed(op)
    if not json:
        result = op["result"] or {}
        elsewhere = f" on {op['machine']}" if op["params"].get("source_machine") else ""
        say(f"Restored snapshot {str(op['params']['snapshot'])[:8]} of {machine}{elsewhere} "
            f"into {result.get('target') or '/'} in {result.get('duration_seconds', 0):g} s.")


@app.command("forget")
def backup_forget(
    machine: MachineArg,
    snapshot: Annotated[Optional[str], typer.Argument(
        metavar="SNAPSHOT", help="The one snapshot to forget: its id or a unique start of "
        "it. Or give a keep policy instead.")] = None,
    keep_last: Annotated[Optional[int], typer.Option(
        "--keep-last", min=1, metavar="N", help="Keep the newest N snapshots.")] = None,
    keep_hourly: Annotated[Optional[int], typer.Option(
        "--keep-hourly", min=1, metavar="N", help="Keep the last snapshot of each of the "
        "last N hours that have one.")] = None,
    keep_daily: Annotated[Optional[int], typer.Option(
        "--keep-daily", min=1, metavar="N", help="... of N days.")] = None,
    keep_weekly: Annotated[Optional[int], typer.Option(
        "--keep-weekly", min=1, metavar="N", help="... of N weeks.")] = None,
    keep_monthly: Annotated[Optional[int], typer.Option(
        "--keep-monthly", min=1, metavar="N", help="... of N months.")] = None,
    keep_yearly: Annotated[Optional[int], typer.Option(
        "--keep-yearly", min=1, metavar="N", help="... of N years.")] = None,
    wait: Wait = False, timeout: Timeout = None,
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """Remove one snapshot of MACHINE, or every snapshot outside a keep policy, from its
    repository on the hub and prune the data no snapshot uses any more. The catalog marks
    them forgotten when the operation succeeds."""
    keep = dict(zip(KEEP, (keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly,
                           keep_yearly), strict=True))
    policy = {f"keep_{k}": n for k, n in keep.items() if n is not None}
    if (snapshot is None) == (not policy):
        problem = ("give SNAPSHOT or a keep policy, not both" if policy else
                   "give SNAPSHOT or a keep policy (--keep-last N, --keep-daily N, ...)")
        raise OutpostError("backup_forget_args", f"Say which snapshots to forget: {problem}.",
                           problem=problem)
    client = api(hub, token, ca_fingerprint, data_dir)
    params: dict[str, Any] = dict(policy)
    if snapshot is not None:
        params["snapshot"] = _resolve(client, machine, snapshot)["id"]
    op = _run(client, machine, "forget", params, wait, timeout, json)
    if json:
        print_json(op)
    elif not wait:
        _asked(op)
    if not wait:
        return
    _failed(op)
    if not json:
        removed = (op["result"] or {}).get("removed") or []
        say(f"Forgot {len(removed)} snapshot{'s' if len(removed) != 1 else ''} of "
            f"{op['machine']}" + (f": {', '.join(r[:8] for r in removed)}" if removed else "")
            + "; the repository was pruned.")
