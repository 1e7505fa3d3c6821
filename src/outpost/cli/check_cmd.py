"""``outpost check``, ``outpost check-list`` and ``outpost hub check``: run the diagnosis
checks and render their results (thin: the checks live in agent/checks.py and hub/checks.py).
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from outpost import __version__
from outpost.protocol import checks as engine
from outpost.protocol.errors import CATALOG

from .options import ClockSkew, Json, StateDirOpt, state_dir
from .output import cell, out, print_json, safe, table


class OutputFormat(str, enum.Enum):
    text = "text"
    json = "json"


OutputOpt = Annotated[OutputFormat, typer.Option(
    "--output", "-o", help="text (a mark per check, counts at the end) or json (one object "
    "with every check's id, result, details, fix and code); --json is the same as "
    "--output json.")]
VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", "-v", help="Also show what each passing check found, the data behind "
    "every result, and the catalog's causes for each problem.")]
StrictOpt = Annotated[bool, typer.Option(
    "--warnings-as-errors", help="Exit 1 on a warning too (for monitoring and CI).")]
ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", help="Agent config file in YAML (default: STATE_DIR/agent.yaml if present).")]

MARKS = {engine.OK: "[green][ OK ][/]", engine.WARNING: "[yellow][WARN][/]",
         engine.ERROR: "[bold red][FAIL][/]", engine.SKIPPED: "[dim][SKIP][/]"}


def _causes(item: Any, res: engine.Result, verbose: bool) -> list[str]:
    """The catalog's causes of a problem: all with --verbose, else the one that fits (a
    transport failure's kind picks its own line)."""
    if item is None:
        return []
    causes: list[str] = list(item.causes)
    if verbose:
        return causes
    kind = res.data.get("kind")
    fitting = [c for c in causes if kind and c.startswith(f"{kind}:")]
    return fitting[:1] or causes[:1]


class _Printer:
    """Prints each result as soon as its check ends (network checks take a moment)."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose

    def __call__(self, res: engine.Result) -> None:
        out.print(f"{MARKS[res.result]} {res.id:<15} {res.title}")
        if res.result == engine.OK and not self.verbose:
            out.print(f"       {safe(res.details)}", markup=False, style="dim")
            return
        out.print(f"       {safe(res.details)}", markup=False)
        if res.result in (engine.WARNING, engine.ERROR):
            item = CATALOG.get(res.code or "")
            for cause in _causes(item, res, self.verbose):
                out.print(f"       cause: {cause}", markup=False)
            if res.fix:
                out.print(f"       fix:   {res.fix}", markup=False)
            if res.code:
                name = f" ({item.name})" if item else ""
                out.print(f"       code:  {res.code}{name}; more: outpost explain {res.code}",
                          markup=False)
        if self.verbose and res.data:
            for key, value in res.data.items():
                out.print(f"       {key}: {cell(value)}", markup=False, style="dim")


def _finish(results: list[engine.Result], output: OutputFormat, strict: bool,
            header: dict[str, Any]) -> None:
    counts = engine.counts(results)
    code = engine.exit_status(results, strict)
    if output is OutputFormat.json:
        print_json({**header, "version": __version__, "exit_code": code, "counts": counts,
                    "checks": [r.to_json() for r in results]})
    else:
        words = {engine.OK: "ok", engine.WARNING: "warning", engine.ERROR: "error",
                 engine.SKIPPED: "skipped"}
        parts = [f"{n} {words[k]}{'s' if n != 1 and k in (engine.WARNING, engine.ERROR) else ''}"
                 for k, n in counts.items()]
        out.print("")
        out.print(", ".join(parts) + (" (warnings count as errors)" if strict else ""))
    raise typer.Exit(code)


def check(
    state_dir_: StateDirOpt = None,
    config: ConfigOpt = None,
    output: OutputOpt = OutputFormat.text,
    json: Json = False,
    verbose: VerboseOpt = False,
    warnings_as_errors: StrictOpt = False,
    clock_skew: ClockSkew = 0.0,
) -> None:
    """Diagnose this machine's agent: config, name, process, registration, DNS, TCP
    through the proxy, TLS pin, clock, signature, version, cache, heartbeat, hardware,
    pressure, disk, ports, sandbox and each extension's state. Exit 0 with only oks and
    warnings, 1 on any error.

    A failing check prints its cause, fix and error code. A check whose prerequisite
    failed is skipped and names it. 'outpost check-list' lists the checks.
    """
    from outpost.agent import checks as agent_checks

    from .agent_cmd import _config_path

    state = state_dir(state_dir_)
    config_path = _config_path(state, config)
    from outpost.agent.transport import Clock

    ctx = agent_checks.AgentContext(state, config_path, Clock(clock_skew))
    output = OutputFormat.json if json else output
    text = output is OutputFormat.text
    if text:
        out.print(f"Checking the Outpost agent in {state.root} (outpost {__version__})")
    results = agent_checks.run(ctx, _Printer(verbose) if text else None)
    _finish(results, output, warnings_as_errors,
            {"state_dir": str(state.root), "config_path": str(config_path or "") or None})


def check_list(
    json: Json = False,
    hub: Annotated[bool, typer.Option(
        "--hub", help="List the hub's checks ('outpost hub check') instead of the "
        "agent's.")] = False,
) -> None:
    """List every check of 'outpost check' (or, with --hub, of 'outpost hub check'): its
    id, title and what it looks at, in the order they run."""
    if hub:
        from .hub_cmd import _need_hub_extra

        _need_hub_extra()
        from outpost.hub.checks import checks as registry
    else:
        from outpost.agent.checks import checks as registry  # type: ignore[assignment]
    listing = registry.listing()
    if json:
        print_json(listing)
        return
    table(["ID", "TITLE", "LOOKS AT", "NEEDS"],
          [[c["id"], c["title"], c["looks_at"], ", ".join(c["needs"])] for c in listing])


def hub_check(
    data_dir: Annotated[Path, typer.Option("--data-dir", help="The hub's data directory.")],
    database_url: Annotated[Optional[str], typer.Option(
        help="Check this database instead of the one in the hub's config "
        "(as given to 'hub run --database-url').")] = None,
    tls_cert: Annotated[Optional[Path], typer.Option(
        help="Check this certificate instead of the data directory's server.pem "
        "(as given to 'hub run --tls-cert').")] = None,
    output: OutputOpt = OutputFormat.text,
    json: Json = False,
    verbose: VerboseOpt = False,
    warnings_as_errors: StrictOpt = False,
    clock_skew: ClockSkew = 0.0,
) -> None:
    """Diagnose a hub from its machine: config, database reachable, migrations current,
    TLS certificate valid (warning under 30 days to expiry), clock against the
    database's, free disk. Exit 0 with only oks and warnings, 1 on any error."""
    from .hub_cmd import _need_hub_extra

    _need_hub_extra()
    from outpost.hub import checks as hub_checks

    ctx = hub_checks.HubContext(data_dir, database_url, tls_cert, clock_skew)
    output = OutputFormat.json if json else output
    text = output is OutputFormat.text
    if text:
        out.print(f"Checking the Outpost hub in {data_dir} (outpost {__version__})")
    results = hub_checks.run(ctx, _Printer(verbose) if text else None)
    _finish(results, output, warnings_as_errors,
            {"data_dir": str(data_dir), "database": ctx.database_shown})
