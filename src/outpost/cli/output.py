"""Rendering for the CLI: tables, JSON, and errors with their code, cause and fix.

Text that a runbook, an agent or a caller controls (output records, names, error messages,
parameter values) is printed through ``safe``: control characters are shown escaped
(``\\x1b[31m``, ``\\x00``), so it cannot move the cursor, recolour or clear the operator's
screen. Always in the text view, whether or not stdout is a terminal: a pipe into ``less -R``
or a log later ``cat`` to a terminal replays the same sequences. ``--json`` keeps the text as
it is (JSON escapes it).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

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
                  "job_id_ambiguous", "fanout_options_invalid", "fanout_limit_invalid",
                  "fanout_group_empty", "schedule_kind_invalid", "schedule_target_invalid",
                  "tls_files_unreadable", "tls_key_mismatch", "tls_hostname_not_covered",
                  "tls_chain_incomplete",
                  "fingerprint_malformed", "profile_unknown", "profiles_file_invalid",
                  "profile_token_missing", "profile_name_invalid",
                  "ext_package_invalid", "ext_package_too_large", "ext_settings_invalid",
                  "ext_settings_file_invalid", "backup_forget_args"}


# C0 controls but tab and newline, DEL, C1 controls (0x9b is a one-byte CSI on some
# terminals), and the bidirectional overrides and isolates that reorder what follows them.
_UNSAFE = [*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F, *range(0x80, 0xA0),
           *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_ESCAPES = {code: (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
            for code in _UNSAFE}
_ESCAPES[0x0D] = "\\r"
_ESCAPES_ONE_LINE = {**_ESCAPES, 0x0A: "\\n"}


def safe(text: str, one_line: bool = False) -> str:
    """``text`` with its control characters escaped, for the text view (``one_line``: the
    newline too, for a table cell or a value on a labelled line)."""
    return text.translate(_ESCAPES_ONE_LINE if one_line else _ESCAPES)


def value_text(value: Any) -> str:
    """A value as JSON (``true``, ``{"a": 1}``, ``"x"``), as the API carries it, never in
    Python's syntax; safe for the terminal."""
    return safe(json.dumps(value, ensure_ascii=False, default=str), one_line=True)


def cell(value: Any) -> str:
    """A table cell or a labelled value: text as it is, other values as JSON; safe."""
    if value is None:
        return ""
    if isinstance(value, str):
        return safe(value, one_line=True)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value_text(value)


def say(text: str) -> None:
    """One line of the text view holding names or messages from elsewhere: escaped."""
    out.print(safe(text), markup=False, highlight=False)


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
    # The message may quote a hub's, a runbook's or a caller's text: shown escaped.
    lines = describe(exc)
    err.print("[bold red]error:[/] ", markup=True, end="")
    err.print(safe(exc.message), markup=False, highlight=False)
    for line in lines[1:]:
        err.print(safe(line), markup=False, highlight=False)


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
        t.add_row(*[Text(cell(v)) for v in row])  # Text: no markup read from the values
    out.print(t)


STATUS_STYLE = {"Healthy": "green", "Pending": "yellow", "Unresponsive": "yellow",
                "Disconnected": "red", "Stopped": "yellow"}


def machine_status(m: dict[str, Any]) -> str:
    """``Stopped 5s ago`` for a machine whose agent said it stopped; else the status."""
    if m.get("status") == "Stopped" and m.get("stopped_at") is not None:
        return f"Stopped {ago(m['stopped_at'])}"
    return str(m.get("status"))


def machine_rows(machines: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for m in machines:
        labels = ",".join(f"{k}={v}" for k, v in sorted((m.get("labels") or {}).items()))
        status = machine_status(m)
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


class RecordPrinter:
    """Prints a job's output records as they come, a page or a poll at a time.

    ``--json``: each record as one compact JSON line, as the hub holds it (its text raw, and
    ``continues`` on the pieces of a long line but the last). Text view: one line a line of
    output, the pieces of a line longer than a record joined (held per stream until the
    last piece comes), the stream named unless it is Output, control characters escaped.
    """

    def __init__(self, json_lines: bool) -> None:
        self.json_lines = json_lines
        self._held: dict[str, list[str]] = {}
        self._attempt = 0

    def print(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            if self.json_lines:
                _write(json.dumps(r) + "\n")
                continue
            stream, text = r["stream"], r["text"]
            attempt = int(r.get("seq", 0)) >> 32  # records of attempt n from (n - 1) << 32
            if attempt != self._attempt:  # a line the last attempt left unfinished ends here
                self._attempt = attempt
                self._end_held()
            if r.get("continues"):
                self._held.setdefault(stream, []).append(text)
                continue
            held = self._held.pop(stream, None)
            self._line(stream, "".join(held) + text if held else text)
        _write("", flush=True)

    def flush(self) -> None:
        """Lines whose last piece never came (the attempt was cut off): shown as they are."""
        self._end_held()
        _write("", flush=True)

    def _end_held(self) -> None:
        for stream, held in self._held.items():
            self._line(stream, "".join(held))
        self._held = {}

    @staticmethod
    def _line(stream: str, text: str) -> None:
        shown = safe(text) if stream == "Output" else f"{stream.upper()}: {safe(text)}"
        _write(shown + "\n")


def _write(text: str, flush: bool = False) -> None:
    """Straight to stdout: a record's text as it is (tabs kept, a long line unwrapped, no
    cost per character as in the console's rendering)."""
    try:
        sys.stdout.write(text)
        if flush:
            sys.stdout.flush()
    except BrokenPipeError as exc:
        raise ReaderGone from exc
