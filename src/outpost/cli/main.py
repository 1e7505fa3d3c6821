"""The ``outpost`` command: one entry point for operators and machines.

Exit codes: 0 done; 1 the operation failed; 2 bad input or configuration; 3 the agent is not
running (``agent status``); 130 interrupted; 141 the reader of its output went away (as
SIGPIPE's default action would end it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

try:  # typer >= 0.16 carries its own copy of click and no longer installs click itself
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer, built on click
    from click import ClickException  # type: ignore[assignment]

from outpost import __version__
from outpost.protocol import errors

from . import agent_cmd, fleet_cmd, hub_cmd, job_cmd, runbook_cmd
from . import asset_cmd
from . import check_cmd, profile_cmd, profiles, schedule_cmd, signals, webhook_cmd
from . import backup_cmd, extension_cmd, messages_cmd, recovery_cmd, token_cmd
from . import deployment_cmd, module_cmd
from .output import EXIT_FAILED, EXIT_USAGE, exit_code, out, print_json, render_error

app = typer.Typer(
    no_args_is_help=True,
    # Rich tracebacks show local variables, which may hold keys and tokens.
    pretty_exceptions_enable=False,
    help="Outpost: run work on machines you cannot reach directly.",
)
app.add_typer(hub_cmd.app, name="hub")
app.add_typer(agent_cmd.app, name="agent")
app.add_typer(fleet_cmd.accounts, name="account")
app.add_typer(fleet_cmd.machines, name="machine")
app.add_typer(fleet_cmd.groups, name="group")
app.add_typer(runbook_cmd.app, name="runbook")
app.add_typer(job_cmd.app, name="job")
app.add_typer(asset_cmd.app, name="asset")
app.add_typer(schedule_cmd.app, name="schedule")
app.add_typer(webhook_cmd.app, name="webhook")
app.add_typer(profile_cmd.app, name="profile")
app.add_typer(token_cmd.app, name="token")
app.add_typer(extension_cmd.app, name="extension")
app.add_typer(module_cmd.app, name="module")
app.add_typer(deployment_cmd.app, name="deployment")
app.add_typer(backup_cmd.app, name="backup")
app.add_typer(messages_cmd.app, name="messages")
app.add_typer(recovery_cmd.protection, name="protection")
app.command("protect")(recovery_cmd.protect)
app.command("unprotect")(recovery_cmd.unprotect)
app.command("failover")(recovery_cmd.failover)
app.command("failback")(recovery_cmd.failback)
app.command("check")(check_cmd.check)
app.command("check-list")(check_cmd.check_list)
hub_cmd.app.command("check")(check_cmd.hub_check)


def _version(value: bool) -> None:
    if value:
        out.print(f"outpost {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    profile: Annotated[Optional[str], typer.Option(
        "--profile", envvar="OUTPOST_PROFILE", metavar="NAME",
        help="The profile to use (see 'outpost profile list'); may also come anywhere "
             "after the command, as in 'outpost job list --profile prod'. Default: the "
             "current profile. Explicit flags, the OUTPOST_HUB/OUTPOST_TOKEN/"
             "OUTPOST_CA_FINGERPRINT/OUTPOST_STATE_DIR variables and --data-dir come "
             "before any profile.")] = None,
) -> None:
    """Outpost: run work on machines you cannot reach directly.

    After 'outpost up' (or 'outpost hub init'), commands talk to that hub and agent through
    its profile, with no further options."""
    if profile and profiles.chosen() is None:  # a --profile later on the line wins
        profiles.choose(profile)


def take_profile(argv: list[str]) -> tuple[list[str], str | None]:
    """``argv`` without ``--profile NAME``/``--profile=NAME`` (before ``--``), and the
    last NAME given: the option is global, so it may come after the command, as kubectl's
    ``--context`` does, with no command declaring it."""
    rest: list[str] = []
    name = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        if arg == "--profile" and i + 1 < len(argv):
            name = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--profile="):
            name = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return rest, name


@app.command()
def explain(text: Annotated[list[str], typer.Argument(
        help="An error code (E1003), a name (clock_skew) or a piece of an error message, "
        "in any case; quote it or not.")],
        json: Annotated[bool, typer.Option("--json", help="Print the matching entries as "
                                           "JSON.")] = False) -> None:
    """Print the message, causes and fixes for an error code or a pasted error text.

    Examples: 'outpost explain E1003', 'outpost explain attempted three times',
    'outpost explain "port is already allocated"'."""
    query = " ".join(text)
    found = errors.find(query)
    if json:
        print_json([{"code": e.code, "name": e.name, "message": e.message,
                     "causes": list(e.causes), "fixes": list(e.fixes),
                     "http_status": e.http_status, "scenario": e.scenario,
                     "aliases": list(e.aliases)} for e in found])
        if not found:
            raise typer.Exit(1)
        return
    if not found:
        out.print(f"No catalog entry matches '{query}'. Try the code alone (for example "
                  "E1003) or a shorter piece of the message.")
        raise typer.Exit(1)
    for entry in found:
        out.print(f"[bold]{entry.code}[/bold] {entry.name}"
                  + (f"  (scenario {entry.scenario})" if entry.scenario else ""))
        out.print(f"  message: {entry.message}", markup=False)
        out.print("  causes:")
        for cause in entry.causes:
            out.print(f"    - {cause}", markup=False)
        out.print("  fixes:")
        for fix in entry.fixes:
            out.print(f"    - {fix}", markup=False)
        out.print("")


@app.command()
def up(
    data_dir: Annotated[Path, typer.Option(help="Where the hub and the agent keep state.")]
    = Path(".outpost"),
    bind: Annotated[str, typer.Option(help="HOST:PORT for the hub.")] = "127.0.0.1:8443",
    profile_name: Annotated[str, typer.Option(
        "--profile-name", help="The profile that 'up' writes and makes current, so later "
        "commands find this hub and agent with no options.")] = "local",
) -> None:
    """Start a hub and a local agent (group 'local') and show the fleet; Ctrl-C stops both.
    Running it again reuses what is there; while it still runs, a second 'up' on the same
    directory only makes its profile current and says so (E8005)."""
    from .up import up as run_up

    signals.daemon()
    raise typer.Exit(run_up(data_dir, bind, profile_name=profile_name))


def main() -> None:
    # Printing commands keep SIGPIPE's default; daemons and followers call signals.daemon().
    signals.printing()
    argv, profile = take_profile(sys.argv[1:])
    profiles.choose(profile)
    try:
        result = app(args=argv, prog_name="outpost", standalone_mode=False)
    except errors.OutpostError as exc:
        render_error(exc)
        sys.exit(exit_code(exc))
    except typer.Abort:
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except signals.ReaderGone:  # a follower (SIGPIPE ignored) whose reader went away
        sys.exit(signals.reader_gone())
    except ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE if exc.exit_code == 2 else exc.exit_code)
    except Exception as exc:  # a bug: say so plainly, keep the traceback for who asks
        if os.environ.get("OUTPOST_DEBUG"):
            raise
        render_error(errors.OutpostError(
            "internal_error", f"outpost failed unexpectedly: {type(exc).__name__}: {exc}",
            fix="Run the command again with OUTPOST_DEBUG=1 to see where, and report it."))
        sys.exit(EXIT_FAILED)
    sys.exit(result if isinstance(result, int) else 0)
