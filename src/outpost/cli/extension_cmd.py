"""``outpost extension ...``: extension packages and what groups and machines should have.

A protected settings file is read and sent as it is: its values never appear on the command
line, in this command's output or in its errors (a file that is not JSON or YAML is refused
naming the line, not quoting it).
"""

from __future__ import annotations

import json as jsonlib
import time
from pathlib import Path
from typing import Annotated, Any, Optional
from urllib.parse import quote

import typer
import yaml

from outpost.protocol.errors import OutpostError

from .options import CaFingerprint, DataDir, Hub, Json, Token, api
from .output import ago, cell, out, print_json, say, table

app = typer.Typer(no_args_is_help=True, help="Extensions: publish packages, say which groups "
                  "and machines should have them, and see each machine's state.")

Name = Annotated[str, typer.Argument(metavar="NAME", help="The extension's name.")]
Group = Annotated[Optional[str], typer.Option(
    "--group", metavar="G", help="The goal of every machine of group G.")]
MachineOpt = Annotated[Optional[str], typer.Option(
    "--machine", metavar="M", help="The goal of machine M (its name or id); it overrides "
    "its group's goal for this extension.")]
GZIP = "application/gzip"


def _q(text: str) -> str:
    return quote(text, safe="")


def _target(group: str | None, machine: str | None) -> tuple[str, str]:
    if (group is None) == (machine is None):
        raise typer.BadParameter("Give exactly one of --group G and --machine M.",
                                 param_hint="'--group' / '--machine'")
    return ("group", group) if group is not None else ("machine", str(machine))


def _goal_path(name: str, kind: str, target: str) -> str:
    return f"/v1/extensions/{_q(name)}/targets/{kind}/{_q(target)}"


def _when(moment: float | None) -> str:
    return "" if moment is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(moment))


def read_settings(path: Path, protected: bool) -> dict[str, Any]:
    """A settings file: one JSON object or YAML mapping. For a protected file, an error
    names the line but never quotes the text."""
    def refuse(problem: str) -> OutpostError:
        return OutpostError("ext_settings_file_invalid", f"The settings file {path} is not "
                            f"usable: {problem}.", path=str(path))

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise refuse(getattr(exc, "strerror", None) or "it is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        detail = "" if protected else f": {getattr(exc, 'problem', None) or exc}"
        raise refuse(f"it is neither JSON nor YAML{where}{detail}") from None
    if not isinstance(data, dict):
        raise refuse(f"it holds {type(data).__name__ if data is not None else 'nothing'}, "
                     "not an object of names and values")
    # YAML reads dates and times as such: sent as the text they were written as.
    loaded: dict[str, Any] = jsonlib.loads(jsonlib.dumps(data, default=str))
    return loaded


@app.command("publish")
def extension_publish(
    file: Annotated[Path, typer.Argument(
        metavar="FILE", help="The package: a .tar.gz with outpost-extension.json at its "
        "root.")],
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """Publish an extension package. It is checked here as the hub and the agent check it
    (E9000 names the field or the file); a published version never changes (E9003)."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise OutpostError("invalid_request", f"Cannot read {file}: {exc.strerror}.",
                           fix="Give the path of the package's .tar.gz file.") from None
    from outpost.protocol import extpackage  # pydantic: only where a package is read

    package = extpackage.read(data)
    client = api(hub, token, ca_fingerprint, data_dir)
    known = {v["version"]: v["sha256"] for v in _versions(client, package.manifest.name)}
    info = client.call("POST", "/v1/extensions", content=data, content_type=GZIP,
                       timeout=300)
    if json:
        print_json(info)
        return
    if known.get(info["version"]) == info["sha256"]:
        say(f"Extension {info['name']} {info['version']} was already published with the "
            "same content; nothing changed.")
        return
    say(f"Published extension {info['name']} {info['version']} ({info['size']} bytes, "
        f"SHA-256 {info['sha256']}).")


def _versions(client: Any, name: str) -> list[dict[str, Any]]:
    try:
        shown = client.get(f"/v1/extensions/{_q(name)}")
    except OutpostError as exc:
        if exc.reason == "ext_not_found":
            return []
        raise
    found: list[dict[str, Any]] = shown["versions"]
    return found


@app.command("list")
def extension_list(hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
                   data_dir: DataDir = None, json: Json = False) -> None:
    """The extensions published in this account, with their versions."""
    rows = api(hub, token, ca_fingerprint, data_dir).get("/v1/extensions")
    if json:
        print_json(rows)
        return
    if not rows:
        out.print("No extensions are published in this account; publish one with "
                  "'outpost extension publish FILE'.", markup=False)
        return
    table(["NAME", "NEWEST", "VERSIONS", "PUBLISHED", "DESCRIPTION"],
          [[r["name"], r["newest"], ", ".join(r["versions"]), _when(r["published_at"]),
            r["description"]] for r in rows])


@app.command("versions")
def extension_versions(name: Name, hub: Hub = None, token: Token = None,
                       ca_fingerprint: CaFingerprint = None, data_dir: DataDir = None,
                       json: Json = False) -> None:
    """The published versions of extension NAME: digest, size, minimum agent version and
    operations."""
    shown = api(hub, token, ca_fingerprint, data_dir).get(f"/v1/extensions/{_q(name)}")
    if json:
        print_json(shown["versions"])
        return
    table(["VERSION", "SHA-256", "SIZE", "MIN AGENT", "OPERATIONS", "PUBLISHED"],
          [[v["version"], v["sha256"][:16], v["size"], v["min_agent_version"],
            ", ".join(v["operations"]), _when(v["published_at"])]
           for v in shown["versions"]])


@app.command("set")
def extension_set(
    name: Name, group: Group = None, machine: MachineOpt = None,
    version: Annotated[Optional[str], typer.Option(
        "--version", metavar="V", help="A published version; 'latest' follows the newest "
        "one as versions are published (the default for a new goal).")] = None,
    settings: Annotated[Optional[Path], typer.Option(
        "--settings", metavar="FILE", help="Public settings: a JSON or YAML object, "
        "checked against the manifest's settings_schema.")] = None,
    protected_settings: Annotated[Optional[Path], typer.Option(
        "--protected-settings", metavar="FILE", help="Protected settings (passwords, "
        "keys): a JSON or YAML object, sealed at rest and readable only by each target "
        "machine; never shown again.")] = None,
    enabled: Annotated[Optional[bool], typer.Option(
        "--enabled/--disabled", help="Whether the extension runs (its enable handler) or "
        "stays installed but disabled. Default: as it was; enabled for a new goal.")] = None,
    run_as: Annotated[Optional[str], typer.Option(
        "--run-as", metavar="USER", help="The user its handlers run as (default: the "
        "agent's extension user).")] = None,
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """Say that a group or a machine should have extension NAME. What is not given keeps
    its value; each change reaches the machines at their next heartbeat."""
    kind, target = _target(group, machine)
    body: dict[str, Any] = {}
    if version is not None:
        body["version"] = None if version.lower() in ("latest", "newest") else version
    if settings is not None:
        body["settings"] = read_settings(settings, protected=False)
    if protected_settings is not None:
        body["protected_settings"] = read_settings(protected_settings, protected=True)
    if enabled is not None:
        body["enabled"] = enabled
    if run_as is not None:
        body["run_as"] = run_as
    saved = api(hub, token, ca_fingerprint, data_dir).put(_goal_path(name, kind, target),
                                                          body)
    if json:
        print_json(saved)
        return
    wanted = saved["version"] or f"the newest ({saved['resolved_version']})"
    say(f"Extension {saved['name']} {'set' if saved['created'] else 'changed'} for "
        f"{saved['target_kind']} '{saved['target']}': version {wanted}, "
        f"{'enabled' if saved['enabled'] else 'disabled'}, seq {saved['seq']}"
        f"{', protected settings set' if saved['protected'] else ''}.")


@app.command("remove")
def extension_remove(name: Name, group: Group = None, machine: MachineOpt = None,
                     hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
                     data_dir: DataDir = None, json: Json = False) -> None:
    """Remove the goal of a group or machine: its machines uninstall the extension (a
    machine whose group still has a goal follows that one)."""
    kind, target = _target(group, machine)
    done = api(hub, token, ca_fingerprint, data_dir).delete(_goal_path(name, kind, target))
    if json:
        print_json(done)
        return
    say(f"Extension {done['name']} removed from {done['target_kind']} '{done['target']}'.")


def _state(row: dict[str, Any]) -> str:
    if row["state"] is None:
        return "(not reported)"
    step = f" at {row['step']}" if row["step"] and row["state"] != "Ready" else ""
    return f"{row['state']}{step}"


@app.command("show")
def extension_show(
    name: Name,
    machine: Annotated[Optional[str], typer.Option(
        "--machine", metavar="M", help="Only machine M (its name or id), in detail.")] = None,
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """Extension NAME: its goals, and each machine's wanted version and reported state
    (with the step that failed and why)."""
    client = api(hub, token, ca_fingerprint, data_dir)
    if machine is not None:
        rows = [r for r in client.get(f"/v1/machines/{_q(machine)}/extensions")
                if r["name"] == name]
        if not rows:
            raise OutpostError("ext_goal_not_found", f"Extension {name} has no goal for "
                               f"machine '{machine}', and its agent reported none.",
                               name=name, kind="machine", target=machine)
        if json:
            print_json(rows[0])
            return
        _detail(rows[0])
        return
    shown = client.get(f"/v1/extensions/{_q(name)}")
    rows = client.get(f"/v1/extensions/{_q(name)}/machines")
    if json:
        print_json({**shown, "machines": rows})
        return
    say(f"Extension {shown['name']}: newest {shown['newest']}; versions "
        f"{', '.join(v['version'] for v in shown['versions'])}.")
    if shown["goals"]:
        table(["TARGET", "VERSION", "ENABLED", "RUN AS", "SETTINGS", "PROTECTED", "SEQ"],
              [[f"{g['target_kind']} {g['target']}",
                g["version"] or f"newest ({g['resolved_version']})",
                "yes" if g["enabled"] else "no", g["run_as"] or "", g["settings"] or "",
                "set" if g["protected"] else "", g["seq"]] for g in shown["goals"]])
    else:
        out.print("No group or machine should have it ('outpost extension set').",
                  markup=False)
    if rows:
        table(["MACHINE", "GOAL", "WANTED", "STATE", "VERSION", "CHANGED", "MESSAGE"],
              [[r["machine"], r["goal"] or "none", r["desired_version"] or "", _state(r),
                r["version"] or "", ago(r["changed_at"]) if r["changed_at"] else "",
                r["message"]] for r in rows])


def _detail(row: dict[str, Any]) -> None:
    lines = [
        ("machine", f"{row['machine']} (group {row['group']})"),
        ("goal", row["goal"] or "none: the agent uninstalls it"),
        ("wanted", row["desired_version"] or ""),
        ("enabled", "" if row["enabled"] is None else ("yes" if row["enabled"] else "no")),
        ("state", _state(row)),
        ("version", row["version"] or ""),
        ("step", row["step"] or ""),
        ("message", row["message"]),
        ("code", row["code"]),
        ("changed", f"{_when(row['changed_at'])} ({ago(row['changed_at'])})"
         if row["changed_at"] else ""),
        ("seq", f"{row['reported_seq']} reported, {row['seq']} wanted"
         if row["seq"] is not None else row["reported_seq"]),
        ("failed", ", ".join(row["failed_versions"])),
        ("last ready", row["last_ready_version"] or ""),
        ("retries", row["retry"]),
    ]
    for label, value in lines:
        say(f"{label + ':':<12} {cell(value)}")
    if row["failed_versions"]:
        say(f"A failed version is not tried again on this machine until 'outpost extension "
            f"retry {row['name']} --machine {row['machine']}'.")


@app.command("retry")
def extension_retry(
    name: Name,
    machine: Annotated[str, typer.Option(
        "--machine", metavar="M", help="The machine (its name or id) that should try again.")],
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """Let machine M try again the versions of NAME that failed there (an agent does not
    retry a failed version on its own)."""
    done = api(hub, token, ca_fingerprint, data_dir).post(
        f"/v1/machines/{_q(machine)}/extensions/{_q(name)}/retry")
    if json:
        print_json(done)
        return
    say(f"Machine '{done['machine']}' will try extension {done['name']} again at its next "
        f"heartbeat (retry {done['retry']}).")


# --- operations -------------------------------------------------------------------------------
ENDED = ("Succeeded", "Failed")


def _params(pairs: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"'{pair}' is not KEY=VALUE (as --param path=/srv).",
                                     param_hint="'--param'")
        params[key] = value
    return params


def _op_lines(op: dict[str, Any]) -> None:
    attempt = f"{op['attempt']} of {op['max_attempts']}"
    if op["status"] == "Queued" and op["next_try_at"]:
        attempt += f" (next try at {_when(op['next_try_at'])})"
    lines = [
        ("operation", f"{op['operation']} of {op['extension']} {op['version'] or ''}".rstrip()),
        ("id", op["id"]),
        ("machine", op["machine"]),
        ("status", op["status"]),
        ("code", op["code"] or ""),
        ("message", op["message"]),
        ("attempt", attempt),
        ("params", op["params"] or ""),
        ("asked", f"{_when(op['created_at'])} ({ago(op['created_at'])})"),
        ("started", _when(op["started_at"])),
        ("ended", _when(op["ended_at"])),
        ("result", op["result"] or ""),
    ]
    for label, value in lines:
        say(f"{label + ':':<10} {cell(value)}")
    if op["output"]:
        say("output (last lines):")
        out.print(op["output"], markup=False, highlight=False)


@app.command("run")
def extension_run(
    name: Name,
    operation: Annotated[str, typer.Argument(metavar="OPERATION", help="One of the "
                                             "operations the extension's manifest declares "
                                             "('outpost extension versions NAME').")],
    machine: Annotated[str, typer.Option("--machine", metavar="M",
                                         help="The machine (its name or id) to run it on.")],
    param: Annotated[Optional[list[str]], typer.Option(
        "--param", metavar="K=V", help="A parameter of the operation (repeatable); "
        "public, never a secret.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the operation to its end: "
                                       "exit 0 when it succeeded, 1 when it failed.")] = False,
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """Run OPERATION of extension NAME on machine M. It is refused at once when the
    machine's agent is unresponsive or stopped, too old for the extension, or a previous
    operation of NAME there runs past its expected time."""
    client = api(hub, token, ca_fingerprint, data_dir)
    op = client.post(f"/v1/machines/{_q(machine)}/extensions/{_q(name)}/operations/"
                     f"{_q(operation)}", {"params": _params(param or [])})
    if wait:
        shown = ""
        while op["status"] not in ENDED:
            line = f"{op['status']}: {op['message']}" if op["message"] else op["status"]
            if line != shown and not json:
                say(line)
                shown = line
            time.sleep(1.0)
            op = client.get(f"/v1/extension-operations/{_q(op['id'])}")
    if json:
        print_json(op)
    else:
        _op_lines(op)
    if wait and op["status"] != "Succeeded":
        raise typer.Exit(1)


@app.command("operations")
def extension_operations(
    machine: Annotated[Optional[str], typer.Option("--machine", metavar="M",
                                                   help="Only machine M's.")] = None,
    name: Annotated[Optional[str], typer.Option("--name", metavar="N",
                                                help="Only extension N's.")] = None,
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """Extension operations, newest first (at most 200)."""
    query = "&".join(f"{k}={_q(v)}" for k, v in (("machine", machine), ("extension", name))
                     if v is not None)
    rows = api(hub, token, ca_fingerprint, data_dir).get(
        "/v1/extension-operations" + (f"?{query}" if query else ""))
    if json:
        print_json(rows)
        return
    if not rows:
        out.print("No extension operations.", markup=False)
        return
    table(["ID", "MACHINE", "EXTENSION", "OPERATION", "STATUS", "ATTEMPT", "ASKED", "MESSAGE"],
          [[r["id"], r["machine"], r["extension"], r["operation"], r["status"],
            f"{r['attempt']}/{r['max_attempts']}", ago(r["created_at"]),
            (f"{r['code']}: " if r["code"] else "") + r["message"]] for r in rows])


@app.command("operation")
def extension_operation(
    op_id: Annotated[str, typer.Argument(metavar="ID", help="The operation's id.")],
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """One extension operation: status, attempts, output tail and result."""
    op = api(hub, token, ca_fingerprint, data_dir).get(f"/v1/extension-operations/{_q(op_id)}")
    if json:
        print_json(op)
        return
    _op_lines(op)


@app.command("uninstall")
def extension_uninstall(
    name: Name,
    machine: Annotated[str, typer.Option("--machine", metavar="M", help="The machine (its "
                                         "name or id) to uninstall it from.")],
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """Uninstall NAME from machine M whatever its state there (its goal stays for other
    machines). The next operation asked of NAME on M installs it again first."""
    done = api(hub, token, ca_fingerprint, data_dir).post(
        f"/v1/machines/{_q(machine)}/extensions/{_q(name)}/uninstall")
    if json:
        print_json(done)
        return
    say(f"Machine '{done['machine']}' uninstalls extension {done['name']} now (its agent is "
        "told at once); the next operation asked of it there installs it again.")
