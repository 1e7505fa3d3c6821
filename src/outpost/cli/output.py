"""Rendering for the CLI: tables, JSON, and errors with their code, cause and fix."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from outpost.protocol.errors import OutpostError, describe

from .signals import ReaderGone


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # Rich (and click, for a BrokenPipeError) would exit 1, "failed"; a reader that
        # went away is SIGPIPE's case, which main() ends as SIGPIPE would (see signals).
        self.quiet = True
        raise ReaderGone


# No emoji codes: a fingerprint such as 'AB:CD:...' would print as 'AB\U0001f4bf...'.
out = _Console(highlight=False, soft_wrap=True, emoji=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)

# Exit codes: 0 done, 1 the operation failed, 2 bad input or config, 3 agent not running.
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
_USAGE_REASONS = {"config_invalid", "config_tab", "invalid_hostname", "account_key_invalid",
                  "invalid_request", "hub_cli_unconfigured", "hub_not_initialised",
                  "runbook_type_unknown", "param_spec_invalid", "param_invalid",
                  "param_missing", "runbook_too_large", "certificate_invalid",
                  "certificate_password", "asset_too_large", "cron_invalid",
                  "timezone_unknown", "expiry_invalid", "webhook_param_missing",
                  "log_level_invalid", "duration_invalid", "param_duplicate", "value_empty",
                  "job_id_ambiguous",
                  "tls_files_unreadable", "tls_key_mismatch", "tls_hostname_not_covered",
                  "tls_chain_incomplete",
                  "fingerprint_malformed", "profile_unknown", "profiles_file_invalid",
                  "profile_token_missing", "profile_name_invalid"}


def exit_code(exc: OutpostError) -> int:
    if exc.reason == "agent_not_running":
        return EXIT_NOT_RUNNING
    return EXIT_USAGE if exc.reason in _USAGE_REASONS else EXIT_FAILED


def print_json(data: Any) -> None:
    try:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        sys.stdout.flush()
    except BrokenPipeError as exc:
        raise ReaderGone from exc


def render_error(exc: OutpostError) -> None:
    lines = describe(exc)
    err.print(f"[bold red]error:[/] {exc.message}", markup=True)
    for line in lines[1:]:
        err.print(line, markup=False)


def ago(moment: float | None) -> str:
    if moment is None:
        return "never"
    seconds = max(0.0, time.time() - moment)
    if seconds < 90:
        return f"{seconds:.0f}s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f}h ago"
    return f"{seconds / 86400:.0f}d ago"


def table(columns: list[str], rows: list[list[Any]], title: str | None = None) -> None:
    t = Table(title=title, show_edge=False, header_style="bold", pad_edge=False)
    for col in columns:
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(*["" if v is None else str(v) for v in row])
    out.print(t)


STATUS_STYLE = {"Healthy": "green", "Pending": "yellow", "Unresponsive": "yellow",
                "Disconnected": "red"}


def machine_rows(machines: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for m in machines:
        labels = ",".join(f"{k}={v}" for k, v in sorted((m.get("labels") or {}).items()))
        status = m["status"]
        if m.get("not_taking_work"):
            status += f" (not taking work: {m['not_taking_work']})"
        rows.append([m["name"], m["group"], labels, m["agent_version"], status,
                     ago(m.get("last_heartbeat_at"))])
    return rows


def machine_table(machines: list[dict[str, Any]]) -> None:
    if not machines:
        out.print("No machines are registered in this account.")
        return
    table(["NAME", "GROUP", "LABELS", "VERSION", "STATUS", "LAST HEARTBEAT"],
          machine_rows(machines))
