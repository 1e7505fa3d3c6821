"""``outpost account ...`` and ``outpost machine ...``: the operator's view of the fleet."""

from __future__ import annotations

import time
from typing import Annotated, Any, Optional
from urllib.parse import quote

import typer

from outpost.protocol import durations
from outpost.protocol.errors import OutpostError

from .options import CaFingerprint, DataDir, Hub, Json, Token, api
from .output import ago, cell, machine_status, machine_table, out, print_json, say, table

accounts = typer.Typer(no_args_is_help=True, help="Accounts and their registration keys.")
machines = typer.Typer(no_args_is_help=True, help="The machines of the fleet.")
PING_MAX = 120.0  # the hub's bound on a ping's wait


@accounts.command("create")
def account_create(name: str, hub: Hub = None, token: Token = None,
                   ca_fingerprint: CaFingerprint = None, data_dir: DataDir = None,
                   json: Json = False) -> None:
    """Create an account (admin token). Prints its keys and API token once."""
    made = api(hub, token, ca_fingerprint, data_dir).post("/v1/accounts", {"name": name})
    if json:
        print_json(made)
        return
    out.print(f"Account '{made['name']}' created.")
    for key in ("id", "primary_key", "secondary_key", "token"):
        out.print(f"  {key + ':':15} {made[key]}")


@accounts.command("list")
def account_list(hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
                 data_dir: DataDir = None, json: Json = False) -> None:
    """List the accounts this token may see."""
    rows = api(hub, token, ca_fingerprint, data_dir).get("/v1/accounts")
    if json:
        print_json(rows)
        return
    table(["ID", "NAME", "CREATED"], [[r["id"], r["name"],
                                       time.strftime("%Y-%m-%d %H:%M",
                                                     time.gmtime(r["created_at"]))]
                                      for r in rows])


@accounts.command("keys")
def account_keys(
    account_id: str,
    regenerate: Annotated[Optional[str], typer.Option(
        help="Replace the 'primary' or 'secondary' key; the other stays valid.")] = None,
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """Show an account's two registration keys, or regenerate one of them."""
    client = api(hub, token, ca_fingerprint, data_dir)
    path = f"/v1/accounts/{quote(account_id, safe='')}/keys"
    if regenerate is not None:
        if regenerate not in ("primary", "secondary"):
            raise OutpostError("invalid_request", f"Unknown key '{regenerate}'.",
                               fix="Use --regenerate primary or --regenerate secondary.")
        keys = client.post(f"{path}/{regenerate}/regenerate")
    else:
        keys = client.get(path)
    if json:
        print_json(keys)
        return
    out.print(f"Account {keys['id']} ({keys['name']})")
    out.print(f"  primary:   {keys['primary_key']}")
    out.print(f"  secondary: {keys['secondary_key']}")


@machines.command("list")
def machine_list(hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
                 data_dir: DataDir = None, json: Json = False) -> None:
    """Name, group, labels, agent version, status and last heartbeat of every machine."""
    rows = api(hub, token, ca_fingerprint, data_dir).get("/v1/machines")
    if json:
        print_json(rows)
        return
    machine_table(rows)


@machines.command("show")
def machine_show(name: str, hub: Hub = None, token: Token = None,
                 ca_fingerprint: CaFingerprint = None, data_dir: DataDir = None,
                 json: Json = False) -> None:
    """Everything the hub knows of one machine."""
    row = api(hub, token, ca_fingerprint, data_dir).get(f"/v1/machines/{quote(name, safe='')}")
    if json:
        print_json(row)
        return
    for key, value in row.items():
        if key == "status":
            value = machine_status(row)
        elif key.endswith("_at") and isinstance(value, (int, float)):
            stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))
            value = f"{stamp} ({ago(value)})"
        elif key == "heartbeat_interval":
            value = f"{value:g} s"
        elif key == "facts" and isinstance(value, dict):
            value = ", ".join(f"{k}={cell(v)}" for k, v in sorted(value.items()))
        elif key == "labels" and isinstance(value, dict):
            value = ",".join(f"{k}={v}" for k, v in sorted(value.items())) or "-"
        elif key == "deployment" and isinstance(value, dict):
            value = _deployment_line(value)
        elif value is None:
            value = "-"
        say(f"{key + ':':20} {cell(value)}")


def _deployment_line(d: dict[str, Any]) -> str:
    """What the machine runs, or why nothing (docs/modules.md, ED-11)."""
    parts = []
    if d.get("name"):
        parts.append(f"{d['name']} version {d.get('version')}")
        if d.get("reported_version") is not None:
            parts.append(f"reported {d.get('reported_deployment')} version "
                         f"{d['reported_version']} {ago(d.get('reported_at'))}")
        states = d.get("modules") or {}
        if states:
            parts.append(", ".join(f"{n} {s}" for s, n in sorted(states.items())))
    reason = d.get("reason")
    if reason:
        parts.append(f"{reason.get('message')} ({reason.get('code')})")
    return "; ".join(parts) or "-"


@machines.command("heartbeats")
def machine_heartbeats(hub: Hub = None, token: Token = None,
                       ca_fingerprint: CaFingerprint = None, data_dir: DataDir = None,
                       json: Json = False) -> None:
    """The last heartbeat the hub received from each machine (HW-9)."""
    rows = api(hub, token, ca_fingerprint, data_dir).get("/v1/heartbeats")
    if json:
        print_json(rows)
        return
    table(["NAME", "STATUS", "LAST HEARTBEAT", "LOAD", "MEM %", "DISK FREE"], [
        [r["name"], machine_status(r), ago(r["last_heartbeat_at"]),
         _fixed((r["heartbeat"] or {}).get("load1")),
         (r["heartbeat"] or {}).get("memory_percent", ""),
         _size((r["heartbeat"] or {}).get("disk_free_bytes"))] for r in rows])


def _fixed(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def _size(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return ""


@machines.command("remove")
def machine_remove(name: str, hub: Hub = None, token: Token = None,
                   ca_fingerprint: CaFingerprint = None, data_dir: DataDir = None,
                   json: Json = False) -> None:
    """Remove a machine from the hub; its agent is refused from then on."""
    done = api(hub, token, ca_fingerprint, data_dir).delete(f"/v1/machines/{quote(name, safe='')}")
    if json:
        print_json(done)
        return
    out.print(f"Machine '{done['name']}' removed.")


@machines.command("ping")
def machine_ping(name: str,
                 timeout: Annotated[str, typer.Option(
                     help="How long to wait: 10, 10s, 1m (at most 2m).")] = "10s",
                 hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
                 data_dir: DataDir = None, json: Json = False) -> None:
    """Send a work item to a machine and time its agent's answer."""
    seconds = durations.parse(timeout, "--timeout", positive=True, maximum=PING_MAX)
    done = api(hub, token, ca_fingerprint, data_dir).post(
        f"/v1/machines/{quote(name, safe='')}/ping", params={"timeout": seconds},
        timeout=seconds + 10)
    if json:
        print_json(done)
        return
    out.print(f"{done['machine']} answered in {done['round_trip_ms']:.1f} ms")


groups = typer.Typer(no_args_is_help=True, help="Groups of machines and their settings.")


@groups.command("list")
def group_list(hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
               data_dir: DataDir = None, json: Json = False) -> None:
    """The account's groups: how many machines each has, and its run-as user."""
    rows = api(hub, token, ca_fingerprint, data_dir).get("/v1/groups")
    if json:
        print_json(rows)
        return
    if not rows:
        out.print("No groups yet: a group appears when a machine registers into it.")
        return
    table(["GROUP", "MACHINES", "RUN AS", "LIMITS"],
          [[r["name"], r["machines"], r["run_as"] or "(the agent's job users)",
            _limits_text(r)] for r in rows])


def _limits_text(row: dict[str, Any]) -> str:
    parts = [f"memory {row['memory_mb']} MiB" if row.get("memory_mb") else "",
             f"{row['cpus']:g} CPU" if row.get("cpus") else "",
             f"{row['max_processes']} processes" if row.get("max_processes") else ""]
    return ", ".join(p for p in parts if p) or "(the agent's defaults)"


@groups.command("set")
def group_set(
    name: str,
    run_as: Annotated[Optional[str], typer.Option(
        help="Run the group's runbooks as this user, 'root' included (the agent must run "
             "as root).")] = None,
    no_run_as: Annotated[bool, typer.Option(
        "--no-run-as", help="Run them as the agent's job users again (one unprivileged "
                            "user per job slot; the agent's own user when it is not "
                            "root).")] = False,
    memory_mb: Annotated[Optional[int], typer.Option(
        min=0, help="Each job's memory limit in MiB (0: the agent's default, 512).")] = None,
    cpus: Annotated[Optional[float], typer.Option(
        min=0, help="Each job's CPU limit in CPUs (0: the agent's default, 1).")] = None,
    processes: Annotated[Optional[int], typer.Option(
        min=0, help="Each job's process limit (0: the agent's default, 256).")] = None,
    hub: Hub = None, token: Token = None, ca_fingerprint: CaFingerprint = None,
    data_dir: DataDir = None, json: Json = False,
) -> None:
    """Change a group's settings; jobs claimed from now on use them."""
    if run_as is not None and no_run_as:
        raise typer.BadParameter("give --run-as USER or --no-run-as, not both")
    changes: dict[str, Any] = {}
    if run_as is not None or no_run_as:
        changes["run_as"] = run_as
    for key, value in (("memory_mb", memory_mb), ("cpus", cpus),
                       ("max_processes", processes)):
        if value is not None:
            changes[key] = value
    if not changes:
        raise typer.BadParameter("give --run-as USER, --no-run-as, --memory-mb, --cpus or "
                                 "--processes")
    done = api(hub, token, ca_fingerprint, data_dir).put(
        f"/v1/groups/{quote(name, safe='')}", changes)
    if json:
        print_json(done)
        return
    out.print(f"Group '{done['name']}' runs its runbooks as "
              f"{done['run_as'] or 'the agent' + chr(39) + 's job users'}; limits: "
              f"{_limits_text(done)}.", markup=False)


# The line that installs the agent on a new machine (cli/install_cmd.py).
from . import install_cmd  # noqa: E402

machines.command("install-line")(install_cmd.install_line)
