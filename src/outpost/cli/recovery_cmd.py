"""Disaster recovery from the command line (docs/recovery.md): ``outpost protect``,
``outpost protection list|show|actions|action``, ``outpost failover``, ``outpost failback``
and ``outpost unprotect``.

Each command forwards to the hub's routes (``/v1/machines/M/protection``,
``/v1/protections``, ``/v1/machines/M/failover``, ``.../failback``,
``/v1/recovery-actions``) and renders the answer; ``--wait`` follows an action (or, for
``protect``, the first recovery point) and says each change on stderr.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Optional

import typer

from outpost.protocol import durations
from outpost.protocol.errors import OutpostError

from .extension_cmd import _q
from .options import CaFingerprint, DataDir, Hub, Json, Token, api
from .output import ago, cell, err, print_json, say, table

ENDED = ("Succeeded", "Failed")

protection = typer.Typer(no_args_is_help=True, help="The protected machines: health, "
                         "recovery points, and the failover/failback actions.")

MachineArg = Annotated[str, typer.Argument(metavar="MACHINE", help="The protected machine "
                                           "(its name or id).")]
Wait = Annotated[bool, typer.Option("--wait", help="Follow it to its end, each change on "
                                    "stderr: exit 0 when it succeeded, 1 when it failed.")]
Timeout = Annotated[Optional[str], typer.Option(
    "--timeout", metavar="DURATION", help="With --wait: stop following after this long "
    "(E9130; the action goes on). Default: until it ends.")]


def _size(value: int | None) -> str:
    amount = float(value or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if amount < 1024 or unit == "TiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return str(value)


def _seconds(value: float) -> str:
    return durations.describe(value)


def _follow(client: Any, action: dict[str, Any], timeout: str | None,
            json: bool) -> dict[str, Any]:
    """The action at its end; each change of its status, step or message on stderr."""
    limit = durations.parse(timeout, "--timeout", positive=True) if timeout else None
    started, shown = time.monotonic(), ""
    while action["status"] not in ENDED:
        line = f"{action['status']} ({action['step']}): {action['message']}"
        if line != shown and not json:
            err.print(f"{action['kind']} {action['id'][:8]}: {line}", markup=False,
                      highlight=False)
            shown = line
        if limit is not None and time.monotonic() - started >= limit:
            raise OutpostError("recovery_wait_timeout", f"The recovery action {action['id']} "
                               f"did not end within {limit:g} s; it is {action['status']} "
                               f"({action['message']}).", action=action["id"], seconds=limit)
        time.sleep(1.0)
        action = client.get_riding_out(f"/v1/recovery-actions/{_q(action['id'])}")
    return action


def _ended(action: dict[str, Any], json: bool) -> None:
    """An action at its end: printed; a failure on stderr with its code, exit 1."""
    if json:
        print_json(action)
    elif action["status"] == "Succeeded":
        _action_lines(action)
    if action["status"] != "Succeeded":
        err.print(f"error: the {action['kind']} {action['id']} of {action['machine']} failed "
                  f"at step {action['step']} ({action['code'] or 'no code'}): "
                  f"{action['message']}", markup=False, highlight=False)
        err.print(f"See 'outpost protection action {action['id']}'.", markup=False,
                  highlight=False)
        raise typer.Exit(1)


def _action_lines(a: dict[str, Any]) -> None:
    for label, value in (
            ("action", a["id"]), ("kind", a["kind"]), ("machine", a["machine"]),
            ("target", a["target"]), ("point", a["point"] or ""),
            ("restored to", a["target_dir"] or ""), ("status", a["status"]),
            ("step", a["step"]), ("code", a["code"] or ""), ("message", a["message"]),
            ("operation", a["op_id"] or ""), ("job", a["job_id"] or ""),
            ("attempts", a["attempts"]), ("asked by", a["requested_by"] or ""),
            ("asked", ago(a["created_at"])),
            ("ended", ago(a["ended_at"]) if a["ended_at"] else "")):
        if value != "":
            say(f"{label + ':':<13} {cell(value)}")
    if a["output"]:
        say("output:")
        for line in a["output"]:
            say(f"  {line}")


def _protection_lines(p: dict[str, Any]) -> None:
    for label, value in (
            ("machine", p["machine"]), ("health", p["health"]), ("message", p["message"]),
            ("state", p["state"]), ("paths", ", ".join(p["paths"])),
            ("exclude", ", ".join(p["exclude"])),
            ("rpo", _seconds(p["rpo_seconds"])),
            ("interval", _seconds(p["interval_seconds"])),
            ("app every", p["app_consistent_every"] or ""),
            ("pre-script", p["pre_script_runbook"] or ""),
            ("post-failover", p["post_failover_runbook"] or ""),
            ("target group", p["target_group"] or ""),
            ("retention", p["retention"] or "keep all"),
            ("failed over", p["active_machine"] or ""),
            ("last point", f"{p['last_point'][:8]} ({ago(p['last_point_at'])})"
             if p["last_point"] else "none"),
            ("points", f"{p['points']} ({_size(p['points_bytes_added'])} added)"),
            ("extension", " ".join(x for x in (p["extension_state"] or "not reported",
                                               f"at step {p['extension_step']}"
                                               if p["extension_step"] else "") if x)),
            ("ext message", p["extension_message"] or ""),
            ("reason", p["reason"] or "")):
        if value != "":
            say(f"{label + ':':<14} {cell(value)}")


def protect(
    machine: MachineArg,
    paths: Annotated[list[str], typer.Option(
        "--paths", "--path", metavar="P", help="An absolute path each recovery point holds; "
        "repeat for more: --paths /etc --paths /srv.")],
    exclude: Annotated[Optional[list[str]], typer.Option(
        "--exclude", metavar="X", help="A restic exclude pattern; repeatable.")] = None,
    rpo: Annotated[str, typer.Option(
        "--rpo", metavar="DURATION", help="Recovery point objective: the newest point may be "
        "at most this old (5m, 30s, 1h). Points are taken every half of it (at least 5 s).")]
    = "5m",
    interval: Annotated[Optional[str], typer.Option(
        "--interval", metavar="DURATION", help="Take a point this often instead (at least "
        "5 s).")] = None,
    target_group: Annotated[Optional[str], typer.Option(
        "--target-group", metavar="G", help="The group whose machines points may be "
        "recovered onto: the extension is set there too, role target.")] = None,
    pre_script: Annotated[Optional[str], typer.Option(
        "--pre-script", metavar="RUNBOOK", help="A runbook whose script runs before an "
        "application-consistent point (flush a database).")] = None,
    app_consistent_every: Annotated[int, typer.Option(
        "--app-consistent-every", metavar="N", min=0, help="Every Nth point is "
        "application-consistent (the pre-script first); 0: never.")] = 0,
    post_failover_runbook: Annotated[Optional[str], typer.Option(
        "--post-failover-runbook", metavar="RUNBOOK", help="A runbook run as a job on the "
        "target after a failover's restore (its declared parameters recovery_action, "
        "recovery_kind, source_machine, target_machine, recovery_point and target_dir are "
        "filled in).")] = None,
    retention: Annotated[Optional[str], typer.Option(
        "--retention", metavar="DURATION", help="Keep points this long (24h, 7d); older ones "
        "are pruned now and then. Default: keep all.")] = None,
    repair: Annotated[bool, typer.Option(
        "--repair", help="Reinstall the recovery extension on MACHINE (a broken or stuck "
        "one): it is uninstalled there and the next point installs it again. The points "
        "stay.")] = False,
    wait: Annotated[bool, typer.Option(
        "--wait", help="Wait for the first recovery point (each change on stderr).")]
    = False,
    timeout: Timeout = None,
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """Protect MACHINE: the recovery extension on it takes recovery points of PATHS at the
    RPO's pace into its repository on the hub (the one backups use), so that it can be
    failed over to a machine of the target group.

    Running it again changes the protection (paths, RPO, runbooks). A new repository
    password is printed once when the machine has none yet (its backup goal's is reused).
    """
    durations.parse(rpo, "--rpo", positive=True)
    relative = [p for p in paths if not p.startswith("/")]
    if relative:
        raise typer.BadParameter(f"give absolute paths (not {', '.join(relative)})",
                                 param_hint="'--paths'")
    client = api(hub, token, ca_fingerprint, data_dir)
    body: dict[str, Any] = {
        "paths": paths, "exclude": exclude or [], "rpo": rpo, "interval": interval,
        "app_consistent_every": app_consistent_every, "pre_script": pre_script,
        "post_failover_runbook": post_failover_runbook, "target_group": target_group,
        "retention": retention, "repair": repair}
    shown = client.post(f"/v1/machines/{_q(machine)}/protection", body)
    if wait:
        shown = _first_point(client, shown, timeout, json)
    if json:
        print_json(shown)
        return
    say(f"Machine {shown['machine']} is protected: {', '.join(shown['paths'])}, RPO "
        f"{_seconds(shown['rpo_seconds'])}, a point every "
        f"{_seconds(shown['interval_seconds'])}"
        + (f", target group {shown['target_group']}" if shown["target_group"] else "")
        + (f" (extension recovery {shown['extension_version']})"
           if shown.get("extension_version") else "") + ".")
    if shown.get("repaired"):
        say("The recovery extension is being reinstalled on it; the points stay.")
    if shown.get("repository_password"):
        say("The repository password is shown this once. Keep it somewhere safe: without it "
            "no point of this machine can be read.")
        say(f"  {shown['repository_password']}")
    say(f"health: {shown['health']}: {shown['message']}")


def _first_point(client: Any, shown: dict[str, Any], timeout: str | None,
                 json: bool) -> dict[str, Any]:
    limit = durations.parse(timeout, "--timeout", positive=True) if timeout else None
    started, last, since = time.monotonic(), "", shown["last_point_at"] or 0.0
    asked = time.time()
    while True:
        now = client.get(f"/v1/machines/{_q(shown['machine'])}/protection")
        if now["last_point_at"] and now["last_point_at"] > since and \
                now["last_point_at"] >= asked - 1:
            return {**now, "repository_password": shown.get("repository_password"),
                    "extension_version": shown.get("extension_version"),
                    "repaired": shown.get("repaired")}
        line = f"{now['health']}: {now['message']}" + (
            f" (point {now['point_op_status']})" if now["point_op_status"] else "")
        if line != last and not json:
            err.print(f"protect {now['machine']}: {line}", markup=False, highlight=False)
            last = line
        if limit is not None and time.monotonic() - started >= limit:
            raise OutpostError("recovery_wait_timeout", f"The first recovery point of "
                               f"{now['machine']} did not come within {limit:g} s: "
                               f"{now['message']}.", action="protect", seconds=limit)
        time.sleep(1.0)


@protection.command("list")
def protection_list(hub: Hub = None, token: Token = None,
                    ca_fingerprint: CaFingerprint = None, data_dir: DataDir = None,
                    json: Json = False) -> None:
    """Every protected machine: health, the newest point's age against the RPO, points
    kept ('show' says more)."""
    rows = api(hub, token, ca_fingerprint, data_dir).get("/v1/protections")
    if json:
        print_json(rows)
        return
    if not rows:
        say("No protected machines; protect one with 'outpost protect MACHINE --paths P'.")
        return
    table(["MACHINE", "HEALTH", "RPO", "LAST POINT", "POINTS", "MESSAGE"],
          [[r["machine"], r["health"], _seconds(r["rpo_seconds"]),
            ago(r["last_point_at"]) if r["last_point_at"] else "none", r["points"],
            r["message"]] for r in rows])


@protection.command("show")
def protection_show(machine: MachineArg, hub: Hub = None, token: Token = None,
                    ca_fingerprint: CaFingerprint = None, data_dir: DataDir = None,
                    json: Json = False) -> None:
    """One machine's protection: health and why, settings, points, the extension's state."""
    row = api(hub, token, ca_fingerprint, data_dir).get(
        f"/v1/machines/{_q(machine)}/protection")
    if json:
        print_json(row)
        return
    _protection_lines(row)


@protection.command("actions")
def protection_actions(
    machine: Annotated[Optional[str], typer.Argument(
        metavar="MACHINE", help="Only this machine's actions.")] = None,
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """The newest 200 failovers, test failovers and failbacks."""
    path = "/v1/recovery-actions" + (f"?machine={_q(machine)}" if machine else "")
    rows = api(hub, token, ca_fingerprint, data_dir).get(path)
    if json:
        print_json(rows)
        return
    if not rows:
        say("No recovery actions" + (f" of {machine}" if machine else "") + ".")
        return
    table(["ACTION", "KIND", "MACHINE", "TARGET", "STATUS", "STEP", "ASKED"],
          [[r["id"][:8], r["kind"], r["machine"], r["target"], r["status"], r["step"],
            ago(r["created_at"])] for r in rows])


@protection.command("action")
def protection_action(
    action_id: Annotated[str, typer.Argument(metavar="ID", help="The action's id.")],
    wait: Wait = False, timeout: Timeout = None,
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """One recovery action: status, step, the operation or job it waits on, its output."""
    client = api(hub, token, ca_fingerprint, data_dir)
    row = client.get(f"/v1/recovery-actions/{_q(action_id)}")
    if wait:
        _ended(_follow(client, row, timeout, json), json)
        return
    if json:
        print_json(row)
        return
    _action_lines(row)


def failover(
    machine: MachineArg,
    to: Annotated[str, typer.Option("--to", metavar="TARGET", help="The machine to recover "
                                    "onto (of the target group).")],
    point: Annotated[str, typer.Option("--point", metavar="latest|ID", help="The point: "
                                       "latest (the default), or an id or a unique start "
                                       "of one ('outpost backup list MACHINE --kind "
                                       "recovery').")] = "latest",
    test: Annotated[bool, typer.Option("--test", help="A drill: restore into a scratch "
                                       "directory on TARGET and leave MACHINE's protection "
                                       "running.")] = False,
    target_dir: Annotated[Optional[str], typer.Option(
        "--target-dir", metavar="DIR", help="Restore under this absolute directory on "
        "TARGET (default: / for a failover, /var/tmp/outpost-recovery/ACTION for "
        "--test).")] = None,
    wait: Wait = False, timeout: Timeout = None,
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """Fail MACHINE over to TARGET: restore its recovery point there, then run the
    post-failover runbook there. A real failover stops MACHINE's points until 'outpost
    failback'. A TARGET whose agent is silent is refused at once (151099)."""
    client = api(hub, token, ca_fingerprint, data_dir)
    action = client.post(f"/v1/machines/{_q(machine)}/failover",
                         {"to": to, "point": point, "test": test, "target_dir": target_dir})
    _asked_or_follow(client, action, wait, timeout, json)


def failback(
    machine: MachineArg,
    target_dir: Annotated[Optional[str], typer.Option(
        "--target-dir", metavar="DIR", help="Restore under this absolute directory on "
        "MACHINE (default: /, the files' own places).")] = None,
    wait: Wait = False, timeout: Timeout = None,
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """Bring a failed-over MACHINE back: a point of its paths is taken on the machine it
    failed over to, recovered on MACHINE, and its protection resumes."""
    client = api(hub, token, ca_fingerprint, data_dir)
    action = client.post(f"/v1/machines/{_q(machine)}/failback", {"target_dir": target_dir})
    _asked_or_follow(client, action, wait, timeout, json)


def _asked_or_follow(client: Any, action: dict[str, Any], wait: bool, timeout: str | None,
                     json: bool) -> None:
    if wait:
        _ended(_follow(client, action, timeout, json), json)
        return
    if json:
        print_json(action)
        return
    say(f"Asked {action['kind']} of {action['machine']} to {action['target']}: action "
        f"{action['id']} is {action['status']} ({action['message']}); follow it with "
        f"'outpost protection action {action['id']} --wait'.")


def unprotect(
    machine: MachineArg,
    delete_points: Annotated[bool, typer.Option(
        "--delete-points", help="Forget every recovery point of MACHINE too. Default: the "
        "points stay in its repository.")] = False,
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """Stop protecting MACHINE: its points stop and the recovery extension is uninstalled
    from it."""
    client = api(hub, token, ca_fingerprint, data_dir)
    gone = client.delete(f"/v1/machines/{_q(machine)}/protection"
                         + ("?delete_points=true" if delete_points else ""))
    if json:
        print_json(gone)
        return
    if delete_points:
        say(f"Machine {gone['machine']} is no longer protected; {gone['points_forgotten']} "
            "points were forgotten (their data is freed by the repository's next prune).")
    else:
        say(f"Machine {gone['machine']} is no longer protected; its points stay.")
