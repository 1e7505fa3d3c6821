"""``outpost deployment ...``: deployments of modules aimed at groups and machines, and
their rollout (docs/modules.md)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Optional
from urllib.parse import quote

import typer

from outpost.protocol.errors import OutpostError

from .options import CaFingerprint, DataDir, Hub, Json, Token, api
from .output import ago, out, print_json, say, table

app = typer.Typer(no_args_is_help=True, help="Deployments: which modules groups and machines "
                  "run, and how far each machine is.")

Name = Annotated[str, typer.Argument(metavar="NAME", help="The deployment's name.")]


def _q(text: str) -> str:
    return quote(text, safe="")


@app.command("create")
def deployment_create(
    name: Name,
    file: Annotated[Path, typer.Argument(metavar="FILE", help="The manifest, YAML or JSON "
                                         "('outpost deployment schema' prints its schema).")],
    group: Annotated[Optional[str], typer.Option("--group", metavar="G",
                                                 help="Aim it at every machine of group G.")
                     ] = None,
    machine: Annotated[Optional[str], typer.Option("--machine", metavar="M",
                                                   help="Aim it at machine M (name or id).")
                       ] = None,
    priority: Annotated[int, typer.Option("--priority", metavar="N", min=0, help=(
        "Among the deployments that target a machine, the highest priority runs there."))
                        ] = 0,
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """Create a deployment, or replace the one of that name (its version grows by one).
    A manifest with errors is refused naming each field, line and column (E9150)."""
    if (group is None) == (machine is None):
        raise typer.BadParameter("Give exactly one of --group G and --machine M.",
                                 param_hint="'--group' / '--machine'")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise OutpostError("invalid_request", f"Cannot read {file}: "
                           f"{getattr(exc, 'strerror', None) or 'it is not UTF-8 text'}.",
                           fix="Give the path of the manifest's YAML or JSON file.") from None
    body: dict[str, Any] = {"name": name, "manifest": text, "priority": priority}
    body["group" if group is not None else "machine"] = group if group is not None else machine
    saved = api(hub, token, ca_fingerprint, data_dir).post("/v1/deployments", body)
    if json:
        print_json(saved)
        return
    verb = "Created" if saved["created"] else "Replaced"
    say(f"{verb} deployment {saved['name']} version {saved['version']} for "
        f"{saved['target_kind']} {saved['target']} (priority {saved['priority']}).")
    for module, spec in sorted(saved["manifest"].get("modules", {}).items()):
        ref = spec.get("package")
        if ref:
            say(f"  {module}: package {ref['name']} {ref['version']} ({ref['sha256'][:12]})")


@app.command("list")
def deployment_list(hub: Hub = None, token: Token = None,
                    ca_fingerprint: CaFingerprint = None, data_dir: DataDir = None,
                    json: Json = False) -> None:
    """The deployments of this account."""
    rows = api(hub, token, ca_fingerprint, data_dir).get("/v1/deployments")
    if json:
        print_json(rows)
        return
    if not rows:
        out.print("No deployments in this account; create one with 'outpost deployment "
                  "create NAME FILE --group G'.", markup=False)
        return
    table(["NAME", "TARGET", "PRIORITY", "VERSION", "MODULES", "MACHINES", "RUNNING IT"],
          [[r["name"], f"{r['target_kind']} {r['target']}", r["priority"], r["version"],
            r["modules"], r["machines"], r["applied"]] for r in rows])


@app.command("show")
def deployment_show(name: Name, hub: Hub = None, token: Token = None,
                    ca_fingerprint: CaFingerprint = None, data_dir: DataDir = None,
                    json: Json = False) -> None:
    """One deployment: its manifest, and per targeted machine whether it runs this one."""
    shown = api(hub, token, ca_fingerprint, data_dir).get(f"/v1/deployments/{_q(name)}")
    if json:
        print_json(shown)
        return
    say(f"deployment {shown['name']} version {shown['version']}: {shown['target_kind']} "
        f"{shown['target']}, priority {shown['priority']}, updated "
        f"{ago(shown['updated_at'])}")
    for module, spec in sorted(shown["manifest"].get("modules", {}).items()):
        ref = spec.get("package")
        what = (f"package {ref['name']} {ref['version']} ({ref['sha256'][:12]})" if ref
                else "command " + " ".join(spec.get("command") or []))
        say(f"  module {module}: {what}, {spec.get('status', 'running')}")
    for route, spec in sorted(shown["manifest"].get("routes", {}).items()):
        say(f"  route {route}: {spec['route']}")
    if not shown["machines"]:
        say("No machine is targeted yet.")
        return
    table(["MACHINE", "GROUP", "RUNS"],
          [[m["machine"], m["group"], "this deployment" if m["applied"] else
            f"{m['winner']} (priority {m['winner_priority']})"] for m in shown["machines"]])


def _exit_text(code: int) -> str:
    """``exit 137 (SIGKILL)``: an exit code past 128 is the signal that ended it."""
    if code > 128:
        import signal

        try:
            return f"exit {code} ({signal.Signals(code - 128).name})"
        except ValueError:
            pass
    return f"exit {code}"


def _module_cell(x: dict[str, Any]) -> str:
    """One module of a rollout: its state, exit, restarts and, when it is not as wanted,
    the reason (with its code)."""
    text = f"{x['name']}={x['state']}"
    if x.get("exit_code") is not None:
        text += f" ({_exit_text(x['exit_code'])})"
    if x.get("restart_count"):
        text += f" restarts={x['restart_count']}"
    if x.get("reason") and x.get("state") in ("failed", "backoff", "unhealthy", "starting"):
        text += f": {x['reason']}" + (f" ({x['code']})" if x.get("code") else "")
    return text


def _rollout_table(rollout: dict[str, Any]) -> None:
    rows = []
    for m in rollout["machines"]:
        modules = ", ".join(_module_cell(x) for x in m["modules"]) or "-"
        rows.append([m["machine"], m["status"], m["desired_version"] or "-",
                     m["reported_version"] if m["reported_version"] is not None else "-",
                     modules, m["error"] or ""])
    table(["MACHINE", "STATUS", "DESIRED", "REPORTED", "MODULES", "ERROR"], rows,
          title=f"deployment {rollout['name']} version {rollout['version']}")


@app.command("rollout")
def deployment_rollout(
    name: Name,
    wait: Annotated[Optional[float], typer.Option("--wait", metavar="SECONDS", min=0, help=(
        "Wait until every machine running it reports this version with every module "
        "as wanted (E9157 after SECONDS)."))] = None,
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """Per targeted machine: the version wanted against the one reported, and each
    module's state, exit code and restarts."""
    client = api(hub, token, ca_fingerprint, data_dir)
    path = f"/v1/deployments/{_q(name)}/rollout"
    rollout = client.get(path)
    if wait is not None:
        deadline = time.monotonic() + wait
        while not rollout["complete"]:
            if time.monotonic() >= deadline:
                if json:
                    print_json(rollout)
                else:
                    _rollout_table(rollout)
                raise OutpostError(
                    "deployment_rollout_timeout", f"The deployment {name} did not reach "
                    f"every targeted machine in {wait:g} s.", name=name, seconds=wait)
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
            rollout = client.get_riding_out(path)
    if json:
        print_json(rollout)
        return
    if not rollout["machines"]:
        say(f"No machine is targeted by deployment {rollout['name']}.")
        return
    _rollout_table(rollout)


@app.command("delete")
def deployment_delete(name: Name, hub: Hub = None, token: Token = None,
                      ca_fingerprint: CaFingerprint = None, data_dir: DataDir = None,
                      json: Json = False) -> None:
    """Delete a deployment: its machines run the next one that targets them, or none."""
    done = api(hub, token, ca_fingerprint, data_dir).delete(f"/v1/deployments/{_q(name)}")
    if json:
        print_json(done)
        return
    say(f"Deleted deployment {done['name']}.")


@app.command("schema")
def deployment_schema(hub: Hub = None, token: Token = None,
                      ca_fingerprint: CaFingerprint = None, data_dir: DataDir = None,
                      json: Json = False) -> None:
    """The JSON Schema of a deployment manifest, as the hub checks it (JSON either way)."""
    print_json(api(hub, token, ca_fingerprint, data_dir).get("/v1/deployments/schema"))
