"""The recovery extension's programs: ``python -m outpost.extensions.recovery.main COMMAND``,
started by the package's ``bin/recovery`` with the agent's Python (``$OUTPOST_AGENT_PYTHON``).

COMMAND is a handler (install, enable, disable, update, uninstall) or an operation (point,
recover, prune). Standard input, the credentials, the status file, restic and how it reaches
the hub are the backup extension's (outpost.extensions.backup.main, whose functions these
commands run): the same per-machine repository on the hub, so recovery points and backups
deduplicate against each other. Points are restic snapshots tagged ``outpost-recovery``
(backups are tagged ``outpost``), and ``prune`` forgets only those.

Settings: ``role`` (``source``: a protected machine that takes points; ``target``: a
machine points are recovered onto), ``paths`` (required for a source), ``exclude``,
``transport``, ``pre_script`` (a shell script's text, run with ``sh -c`` before an
application-consistent point) and ``pre_script_timeout``; protected: ``repository_password``.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Sequence
from typing import Any

from outpost.extensions.backup import main as backup
from outpost.extensions.backup.main import (
    PRE_SNAPSHOT_FAILED,
    SETTINGS_INVALID,
    Context,
    Failed,
    PreSnapshot,
    report,
)

NAME = "recovery"
TAG = "outpost-recovery"
ROLES = ("source", "target")
CONSISTENCIES = ("crash", "application")
DEFAULT_PRE_SCRIPT_TIMEOUT = 300.0
FULL_ID = re.compile(r"[0-9a-f]{64}")
# restic's tag (no comma: it separates tags) and duration (keep-within: 1y2m3d4h).
EXTRA_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
DURATION = re.compile(r"(?:[0-9]+[ymdh])+")


def invalid(field: str, problem: str, value: Any) -> Failed:
    return Failed(SETTINGS_INVALID, f"E9103: {field}: {problem} (got {value!r})")


# --- settings and params ----------------------------------------------------------------------
def role(settings: dict[str, Any]) -> str:
    found = settings.get("role")
    if found not in ROLES:
        raise invalid("settings.role", f"must be one of {', '.join(ROLES)}", found)
    return str(found)


def absolute_paths(value: Any, field: str, required: bool) -> list[str]:
    if value is None and not required:
        return []
    if not isinstance(value, list) or not value or not all(
            isinstance(v, str) and v.startswith("/") for v in value):
        raise invalid(field, "must be a list of absolute paths", value)
    return list(value)


def patterns(value: Any, field: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise invalid(field, "must be a list of patterns", value)
    return list(value)


def check_settings(settings: dict[str, Any]) -> str:
    """The settings' role, once every setting is checked (E9103 naming the first wrong one)."""
    found = role(settings)
    absolute_paths(settings.get("paths"), "settings.paths", required=found == "source")
    patterns(settings.get("exclude"), "settings.exclude")
    script = settings.get("pre_script")
    if script is not None and not isinstance(script, str):
        raise invalid("settings.pre_script", "must be a shell script's text", script)
    pre_script_timeout(settings)
    return found


def pre_script_timeout(settings: dict[str, Any]) -> float:
    value = settings.get("pre_script_timeout")
    if value is None:
        return DEFAULT_PRE_SCRIPT_TIMEOUT
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise invalid("settings.pre_script_timeout", "must be a number of seconds over 0",
                      value)
    return float(value)


def point_params(settings: dict[str, Any], params: dict[str, Any]
                 ) -> tuple[str, list[str], list[str]]:
    """A point's consistency, paths (``params.paths`` or the settings') and restic tags."""
    consistency = params.get("consistency") or "crash"
    if consistency not in CONSISTENCIES:
        raise invalid("params.consistency", f"must be one of {', '.join(CONSISTENCIES)}",
                      consistency)
    given = params.get("paths")
    # one path may be given as a string ('extension run ... --param paths=/srv')
    paths = absolute_paths([given] if isinstance(given, str) else given, "params.paths",
                           required=False)
    if not paths:
        if role(settings) != "source":
            raise invalid("params.paths", "a point on a machine of role target needs the "
                          "paths to take", params.get("paths"))
        paths = absolute_paths(settings.get("paths"), "settings.paths", required=True)
    tags = [TAG]
    extra = params.get("tag")
    if extra is not None:
        if not isinstance(extra, str) or not EXTRA_TAG.fullmatch(extra) or extra == TAG:
            raise invalid("params.tag", "must be a tag of letters, digits, '.', '_', ':' or "
                          "'-' (at most 64)", extra)
        tags.append(extra)
    return str(consistency), paths, tags


def recover_params(params: dict[str, Any]) -> tuple[str, str, str | None]:
    """A recovery's point (a full snapshot id), target directory and source machine id."""
    point = params.get("point")
    if not isinstance(point, str) or not FULL_ID.fullmatch(point):
        raise invalid("params.point", "must be a point's full id (64 hex digits)", point)
    target = params.get("target") or "/"
    if not isinstance(target, str) or not target.startswith("/"):
        raise invalid("params.target", "must be an absolute path", target)
    source = params.get("source_machine_id")
    if source is not None and (not isinstance(source, str) or not source
                               or source.startswith("-")):
        raise invalid("params.source_machine_id", "must be a machine id", source)
    return point, target, source


def prune_args(params: dict[str, Any]) -> list[str]:
    """``restic forget`` over the points only: ``keep_within`` (a restic duration) and/or
    ``keep_last`` (a whole number of 1 or more), then ``--prune``."""
    within, last = params.get("keep_within"), params.get("keep_last")
    if within is None and last is None:
        raise invalid("params", "prune needs keep_within (a duration like 24h or 7d) or "
                      "keep_last (a number of points)", params)
    args = ["forget", "--prune", "--tag", TAG]
    if within is not None:
        if not isinstance(within, str) or not DURATION.fullmatch(within):
            raise invalid("params.keep_within", "must be a duration like 24h, 7d or 1m2d",
                          within)
        args += ["--keep-within", within]
    if last is not None:
        if isinstance(last, str) and last.isdigit():  # 'extension run ... --param keep_last=3'
            last = int(last)
        if isinstance(last, bool) or not isinstance(last, int) or last < 1:
            raise invalid("params.keep_last", "must be a whole number of 1 or more", last)
        args += ["--keep-last", str(last)]
    return args


# --- the commands ---------------------------------------------------------------------------
def do_enable(ctx: Context) -> None:
    check_settings(ctx.settings)
    backup.open_repository(ctx)


def do_point(ctx: Context) -> None:
    check_settings(ctx.settings)
    consistency, paths, tags = point_params(ctx.settings, ctx.params)
    exclude = patterns(ctx.settings.get("exclude"), "settings.exclude")
    backup.back_up(ctx, paths, exclude, tags, functools.partial(pre_script, ctx, consistency),
                   pre_key="pre_script", noun="point")


def pre_script(ctx: Context, consistency: str) -> PreSnapshot:
    """Before an application-consistent point, the settings' ``pre_script``: a point whose
    script fails or overruns is taken crash-consistent, with a warning that says so."""
    if consistency != "application":
        return PreSnapshot()
    script = ctx.settings.get("pre_script")
    if not script:
        raise Failed(PRE_SNAPSHOT_FAILED, "E9104: an application-consistent point was asked "
                     "but the recovery extension's settings have no pre_script; set one "
                     "or ask a crash-consistent point")
    return backup.pre_step(script, pre_script_timeout(ctx.settings), required=False,
                           setting="pre_script", taken="point")


def do_recover(ctx: Context) -> None:
    started = time.monotonic()
    point, target, source_id = recover_params(ctx.params)
    summary = backup.restore(ctx, point, target, (), source_id)
    seconds = round(time.monotonic() - started, 3)
    result: dict[str, Any] = {
        "point": point, "target": target, "files": summary.get("total_files"),
        "total_bytes": summary.get("total_bytes"), "duration_seconds": seconds}
    origin = ""
    if source_id:
        result["source_machine_id"] = source_id
        origin = f" of machine {ctx.params.get('source_machine') or source_id}"
    report(ctx, "success", f"recovered point {point[:8]}{origin} into {target}: "
           f"{result['files']} files, {result['total_bytes']} bytes in {seconds:g} s",
           result=result)


def do_prune(ctx: Context) -> None:
    args = prune_args(ctx.params)
    started = time.monotonic()
    removed = backup.forget(ctx, args)
    seconds = round(time.monotonic() - started, 3)
    policy = ", ".join(f"{k}={ctx.params[k]}" for k in ("keep_within", "keep_last")
                       if ctx.params.get(k) is not None)
    report(ctx, "success", f"forgot {len(removed)} recovery points outside {policy} and "
           f"pruned the repository in {seconds:g} s",
           result={"removed": removed, "keep_within": ctx.params.get("keep_within"),
                   "keep_last": ctx.params.get("keep_last"), "duration_seconds": seconds})


COMMANDS = {"install": backup.do_install, "enable": do_enable, "disable": backup.do_nothing,
            "update": backup.do_nothing, "uninstall": backup.do_nothing, "point": do_point,
            "recover": do_recover, "prune": do_prune}


def main(argv: Sequence[str] | None = None) -> int:
    return backup.run(COMMANDS, argv, NAME)


if __name__ == "__main__":
    raise SystemExit(main())
