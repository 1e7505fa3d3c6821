"""The backup extension's programs: ``python -m outpost.extensions.backup.main COMMAND``,
started by the package's ``bin/backup`` with the agent's Python (``$OUTPOST_AGENT_PYTHON``).

COMMAND is a handler (install, enable, disable, update, uninstall) or an operation
(snapshot, restore, forget). Standard input holds one JSON object from the agent:
``settings`` (paths, exclude, pre_snapshot, pre_snapshot_timeout, consistency, transport),
``protected`` (repository_password), ``credentials.backup`` (the machine's backup token,
the hub's URL, its machine id and the hub's CA) and, for an operation, ``params``. Each
command ends by writing ``$OUTPOST_EXT_STATUS_DIR/$OUTPOST_EXT_SEQ.status``, an operation's
with its ``result`` (which the agent sends to the hub with the operation's end).

restic reaches the hub directly (its REST backend, restic 0.17 and later) or through
``outpost.backup.bridge`` (its rclone backend), as the ``transport`` setting (auto, direct,
bridge; outpost.backup.transport) and restic's version decide. The token and the repository
password are put into restic's own environment only (``RESTIC_REST_PASSWORD`` or
``OUTPOST_BACKUP_TOKEN``, ``RESTIC_PASSWORD``), never into an argument, a file or this
process's output; the hub's CA, which is public, goes into a temporary file.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from outpost.backup import transport

RESTIC_FALLBACK = "/usr/bin/restic"
DEFAULT_PRE_SNAPSHOT_TIMEOUT = 300.0
STOP_GRACE = 3.0
HANDLERS = ("install", "enable", "disable", "update", "uninstall")
OPERATIONS = ("snapshot", "restore", "forget")
KEEP = ("last", "hourly", "daily", "weekly", "monthly", "yearly")

# The catalog's codes (outpost.protocol.errors), as status-file codes.
RESTIC_MISSING = 9101
RESTIC_FAILED = 9102
SETTINGS_INVALID = 9103
PRE_SNAPSHOT_FAILED = 9104
GRANT_REFUSED = 9116


class Failed(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class Context:
    command: str
    settings: dict[str, Any]
    protected: dict[str, Any]
    credential: dict[str, Any]
    params: dict[str, Any]
    status_dir: Path
    seq: str
    secrets: list[str] = field(default_factory=list)
    extension: str = "backup"

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "[redacted]")
        return text


# --- reporting ------------------------------------------------------------------------------
def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def report(ctx: Context, status: str, message: str, code: int = 0,
           result: dict[str, Any] | None = None) -> None:
    message = ctx.redact(message)[:4000]
    written: dict[str, Any] = {"status": status, "code": code, "message": message}
    if result is not None:
        written["result"] = result
    _write_json(ctx.status_dir / f"{ctx.seq}.status", written)
    print(f"{status}: {message}", flush=True)


# --- restic -----------------------------------------------------------------------------------
def find_restic() -> str:
    found = shutil.which("restic") or (RESTIC_FALLBACK if os.access(RESTIC_FALLBACK, os.X_OK)
                                       else None)
    if found is None:
        raise Failed(RESTIC_MISSING, "E9101: restic is not installed on this machine (not on "
                     f"PATH, not at {RESTIC_FALLBACK}); install the package 'restic' "
                     "(apt-get install restic, or dnf install restic), then retry the "
                     "extension")
    return found


@functools.lru_cache(maxsize=None)
def version_of(program: str) -> transport.Version | None:
    """restic's version, asked once per program (``restic version``)."""
    return transport.restic_version(program)


def chosen_transport(ctx: Context, program: str) -> str:
    """``direct`` or ``bridge``: the ``transport`` setting (auto by default) for this
    restic; E9103 for another value, or ``direct`` with a restic older than 0.17."""
    setting = ctx.settings.get("transport")
    if setting is not None and not isinstance(setting, str):
        raise Failed(SETTINGS_INVALID, f"E9103: transport must be one of "
                     f"{', '.join(transport.TRANSPORTS)} (got {setting!r})")
    try:
        return transport.choose(setting, version_of(program))
    except transport.TransportError as exc:
        raise Failed(SETTINGS_INVALID, f"E9103: {exc}") from None


class Restic:
    """restic with the machine's repository on the hub: directly (restic 0.17 and later) or
    through the bridge (outpost.backup.transport)."""

    def __init__(self, ctx: Context, workdir: Path,
                 source: dict[str, Any] | None = None) -> None:
        cred = ctx.credential
        missing = [k for k in ("token", "hub", "machine_id", "ca_pem") if not cred.get(k)]
        if missing:
            raise Failed(SETTINGS_INVALID, "E9103: the agent handed no backup credentials "
                         f"(missing {', '.join(missing)}); this agent or hub is too old for "
                         "the backup extension")
        password = ctx.protected.get("repository_password")
        machine_id, token = str(cred["machine_id"]), str(cred["token"])
        if source is not None:  # another machine's repository, through a restore grant
            machine_id, token = str(source["machine_id"]), str(source["token"])
            password = source.get("password") or password
        if not isinstance(password, str) or not password:
            how = ("'outpost backup enable'" if ctx.extension == "backup" else
                   f"'outpost extension set {ctx.extension} --protected-settings FILE'")
            raise Failed(SETTINGS_INVALID, "E9103: the protected setting repository_password "
                         f"is missing; set the extension with {how}")
        self.program = find_restic()
        self.transport = chosen_transport(ctx, self.program)
        ca_file = workdir / "hub-ca.pem"
        ca_file.write_text(str(cred["ca_pem"]))
        opened = transport.connection(
            self.transport, str(cred["hub"]), machine_id, str(ca_file), token,
            [sys.executable, "-m", "outpost.backup.bridge"])
        self.base = [self.program, *opened.args, *cache_args(workdir)]
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "HOME": str(workdir), "RESTIC_PASSWORD": password, **opened.env}
        ctx.secrets += [str(cred["token"]), token, password]
        self.ctx = ctx

    def run(self, args: Sequence[str], what: str) -> str:
        """restic ARGS; its standard output (stderr goes to the extension's log)."""
        proc = subprocess.run([*self.base, *args], env=self.env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              check=False)
        for line in proc.stderr.splitlines():
            print(self.ctx.redact(line), flush=True)
        if proc.returncode != 0:
            last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-3:]
            raise Failed(RESTIC_FAILED, f"E9102: restic failed to {what} (exit "
                         f"{proc.returncode}): {' / '.join(last) or 'no message'}")
        return proc.stdout

    def initialized(self) -> bool:
        proc = subprocess.run([*self.base, "cat", "config"], env=self.env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, check=False)
        return proc.returncode == 0


def cache_args(workdir: Path) -> list[str]:
    """restic's cache: in the extension's data directory, which the agent keeps between
    commands (``$OUTPOST_EXT_DATA_DIR``), so a snapshot reads the repository's index and its
    last snapshot's trees from the machine's disk rather than fetching them all from the hub
    again. restic keeps one cache per repository in it (another machine's, for a restore
    from it, too) and, with ``--cleanup-cache``, removes those unused for 30 days. In the
    command's temporary directory when there is none (an older agent)."""
    kept = os.environ.get("OUTPOST_EXT_DATA_DIR")
    if kept and os.path.isdir(kept) and os.access(kept, os.W_OK | os.X_OK):
        return ["--cache-dir", str(Path(kept) / "restic-cache"), "--cleanup-cache"]
    return ["--cache-dir", str(workdir / "cache")]


@contextmanager
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="outpost-backup-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- settings -------------------------------------------------------------------------------
def _strings(value: Any, name: str, required: bool = False) -> list[str]:
    if value is None and not required:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value) \
            or (required and not value):
        raise Failed(SETTINGS_INVALID, f"E9103: {name} must be a list of paths or patterns "
                     f"(got {value!r})")
    return list(value)


# --- EX-11: the application's own consistency step -----------------------------------------
@dataclass
class PreSnapshot:
    ran: bool = False
    seconds: float = 0.0
    timed_out: bool = False
    exit_code: int | None = None
    consistency: str = "crash"
    note: str = ""


def pre_snapshot(ctx: Context) -> PreSnapshot:
    """The backup extension's ``pre_snapshot`` step (settings ``pre_snapshot``,
    ``pre_snapshot_timeout``, ``consistency``)."""
    return pre_step(ctx.settings.get("pre_snapshot"),
                    float(ctx.settings.get("pre_snapshot_timeout")
                          or DEFAULT_PRE_SNAPSHOT_TIMEOUT),
                    required=ctx.settings.get("consistency", "crash") == "application")


def pre_step(command: Any, timeout: float, required: bool, setting: str = "pre_snapshot",
             taken: str = "snapshot") -> PreSnapshot:
    """Run ``command`` (the ``setting`` step) with ``sh -c`` in its own process group for at
    most ``timeout`` seconds before a ``taken`` (a snapshot, a point): application-consistent
    when it ends with 0 in time; otherwise crash-consistent with a note that names the step,
    or, when ``required``, E9104 and nothing taken."""
    found = PreSnapshot()
    if not command:
        if required:
            raise Failed(PRE_SNAPSHOT_FAILED, "E9104: consistency 'application' is required "
                         f"but no {setting} command is set")
        return found
    found.ran = True
    started = time.monotonic()
    print(f"{setting}: running {command!r} (timeout {timeout:g} s)", flush=True)
    proc = subprocess.Popen(["/bin/sh", "-c", str(command)], stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        found.exit_code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        found.timed_out = True
        _end_group(proc)
    found.seconds = round(time.monotonic() - started, 3)
    if found.timed_out:
        problem = (f"the {setting} step ({command!r}) was still running after "
                   f"{found.seconds:g} s, over its {setting}_timeout of {timeout:g} s, "
                   "and was ended")
    elif found.exit_code != 0:
        problem = (f"the {setting} step ({command!r}) exited with {found.exit_code} "
                   f"after {found.seconds:g} s")
    else:
        found.consistency = "application"
        found.note = f"{setting} step took {found.seconds:g} s"
        return found
    if required:
        raise Failed(PRE_SNAPSHOT_FAILED, f"E9104: {problem}; consistency 'application' is "
                     f"required, so no {taken} was taken")
    found.note = f"{problem}; the {taken} is crash-consistent"
    print(f"{setting}: {found.note}", flush=True)
    return found


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


# --- the commands ---------------------------------------------------------------------------
def do_install(ctx: Context) -> None:
    program = find_restic()
    how = "directly" if chosen_transport(ctx, program) == "direct" else "through the bridge"
    report(ctx, "success", f"restic {transport.shown(version_of(program))} found at "
           f"{program}; it reaches the hub {how} (transport "
           f"{ctx.settings.get('transport') or 'auto'})")


def do_enable(ctx: Context) -> None:
    _strings(ctx.settings.get("paths"), "paths", required=True)
    open_repository(ctx)


def open_repository(ctx: Context) -> None:
    """Open the machine's repository on the hub, creating it when there is none."""
    with workdir() as tmp:
        restic = Restic(ctx, tmp)
        if restic.initialized():
            report(ctx, "success", "the machine's repository on the hub is ready")
            return
        try:
            restic.run(["init"], "create the repository on the hub")
        except Failed:
            # The backup and recovery extensions share the repository: when both are
            # enabled at once, the other one's init may have won (the hub keeps the first
            # config, 409 to the second).
            if not restic.initialized():
                raise
            report(ctx, "success", "the machine's repository on the hub is ready")
            return
        report(ctx, "success", "the machine's repository was created on the hub")


def do_nothing(ctx: Context) -> None:
    report(ctx, "success", f"{ctx.command}: nothing to do (the repository on the hub stays)")


def _summary(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        try:
            found = json.loads(line)
        except ValueError:
            continue
        if isinstance(found, dict) and found.get("message_type") == "summary":
            return found
    raise Failed(RESTIC_FAILED, "E9102: restic backup ended without its summary")


def do_snapshot(ctx: Context) -> None:
    back_up(ctx, _strings(ctx.settings.get("paths"), "paths", required=True),
            _strings(ctx.settings.get("exclude"), "exclude"), ["outpost"],
            functools.partial(pre_snapshot, ctx))


def back_up(ctx: Context, paths: list[str], exclude: list[str], tags: Sequence[str],
            pre_step: Callable[[], PreSnapshot], pre_key: str = "pre_snapshot",
            noun: str = "snapshot") -> None:
    """``restic backup`` of ``paths`` tagged ``tags``, after ``pre_step`` (which may raise
    Failed), reported with its result: the snapshot's ids and time, its counts and sizes,
    its consistency and, under ``pre_key``, how the step went. A step that ran and did not
    make it application-consistent makes the status ``warning``."""
    started = time.monotonic()
    with workdir() as tmp:
        restic = Restic(ctx, tmp)
        pre = pre_step()
        args = ["backup", "--json"]
        for tag in tags:
            args += ["--tag", tag]
        for pattern in exclude:
            args += ["--exclude", pattern]
        summary = _summary(restic.run([*args, "--", *paths], f"take the {noun}"))
        # restic's short id is the first 8 hex digits of the full one; its summary names the
        # snapshot by the short id before 0.17 and by the full id since.
        short = str(summary.get("snapshot_id") or "")[:8]
        taken = _listed(restic, [short]) if short else []
    result = {
        "snapshot": short or None,
        # the full id read back with 'restic snapshots'; the catalog keeps both.
        "snapshot_id": taken[0]["id"] if taken else None,
        "time": taken[0]["time"] if taken else None,
        "files": summary.get("total_files_processed"),
        "files_new": summary.get("files_new"),
        "files_changed": summary.get("files_changed"),
        "bytes_added": summary.get("data_added"),
        "total_bytes": summary.get("total_bytes_processed"),
        "duration_seconds": round(time.monotonic() - started, 3),
        "paths": paths,
        "consistency": pre.consistency,
        pre_key: None if not pre.ran else {
            "seconds": pre.seconds, "timed_out": pre.timed_out, "exit_code": pre.exit_code,
            "note": pre.note},
    }
    message = (f"{noun} {str(result['snapshot'])[:8]}: {result['files']} files, "
               f"{result['bytes_added']} bytes added, {result['total_bytes']} bytes in all, "
               f"in {result['duration_seconds']:g} s, {pre.consistency}-consistent")
    if pre.ran and pre.consistency != "application":
        report(ctx, "warning", f"{message} ({pre.note})", result=result)
    else:
        report(ctx, "success", message + (f" ({pre.note})" if pre.note else ""),
               result=result)


def _epoch(stamp: str) -> float | None:
    """restic's RFC 3339 time (nanoseconds, an offset) as seconds since the epoch."""
    text = stamp.strip().replace("Z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:  # Python takes at most 6 digits of a fraction
        digits = rest[:len(rest) - len(rest.lstrip("0123456789"))]
        text = f"{head}.{digits[:6]}{rest[len(digits):]}"
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _listed(restic: Restic, ids: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The repository's snapshots (or those ``ids`` name): full id and time."""
    found = json.loads(restic.run(["snapshots", "--json", *ids], "list the snapshots") or "[]")
    return [{"id": str(s["id"]), "time": _epoch(str(s.get("time", "")))}
            for s in found or [] if isinstance(s, dict) and s.get("id")]


def grant(ctx: Context, workdir: Path) -> dict[str, Any]:
    """A read-only grant to the source machine's repository, asked of the hub with this
    machine's own backup token (``POST /v1/backup-grants``); its token and, when this
    machine's password differs, the source's password."""
    import httpx  # the agent's dependency; only a restore from another machine needs it

    cred = ctx.credential
    ca_file = workdir / "grant-ca.pem"
    ca_file.write_text(str(cred.get("ca_pem") or ""))
    try:
        with httpx.Client(verify=str(ca_file), timeout=60, trust_env=False) as client:
            answer = client.post(f"{str(cred.get('hub')).rstrip('/')}/v1/backup-grants",
                                 headers={"Authorization": f"Bearer {cred.get('token')}"})
    except httpx.HTTPError as exc:
        raise Failed(RESTIC_FAILED, f"E9102: the hub could not be asked for a grant to the "
                     f"source machine's repository: {exc}") from None
    try:
        body = answer.json()
    except ValueError:
        body = {}
    if answer.status_code != 201 or not isinstance(body, dict) or not body.get("token"):
        raise Failed(GRANT_REFUSED, f"{body.get('code', 'E9116')}: the hub refused a grant "
                     f"to the source machine's repository ({answer.status_code}): "
                     f"{body.get('message', answer.text[:200])}")
    ctx.secrets += [str(body["token"])] + ([str(body["password"])] if body.get("password")
                                           else [])
    return body


def do_restore(ctx: Context) -> None:
    started = time.monotonic()
    snapshot = str(ctx.params.get("snapshot") or "latest")
    target = str(ctx.params.get("target") or "/")
    include = _strings(ctx.params.get("include"), "include")
    if snapshot.startswith("-") or not target.startswith("/"):
        raise Failed(SETTINGS_INVALID, "E9103: restore needs a snapshot id (or 'latest') and "
                     f"an absolute target path (got {snapshot!r}, {target!r})")
    source_id = ctx.params.get("source_machine_id")
    restore(ctx, snapshot, target, include, source_id)
    seconds = round(time.monotonic() - started, 3)
    origin = f" of machine {ctx.params.get('source_machine') or source_id}" if source_id else ""
    report(ctx, "success", f"restored {snapshot}{origin} into {target} in {seconds:g} s",
           result={"snapshot": snapshot, "target": target, "include": include,
                   "source_machine_id": source_id, "duration_seconds": seconds})


def restore(ctx: Context, snapshot: str, target: str, include: Sequence[str] = (),
            source_id: Any = None) -> dict[str, Any]:
    """``restic restore SNAPSHOT --target TARGET`` from this machine's repository or, with
    ``source_id``, from that machine's through a restore grant; restic's summary (restic 0.17
    and later print one: ``total_files``, ``total_bytes``, ...), or {} from older ones."""
    with workdir() as tmp:
        source = grant(ctx, tmp) if source_id else None
        restic = Restic(ctx, tmp, source)
        args = ["restore", "--json", snapshot, "--target", target]
        for pattern in include:
            args += ["--include", pattern]
        out = restic.run(args, f"restore {snapshot} into {target}")
    try:
        return _summary(out)
    except Failed:
        return {}


def do_forget(ctx: Context) -> None:
    snapshot = ctx.params.get("snapshot")
    keep = {k: ctx.params.get(f"keep_{k}") for k in KEEP if ctx.params.get(f"keep_{k}")}
    if not snapshot and not keep:
        raise Failed(SETTINGS_INVALID, "E9103: forget needs a snapshot id or a keep policy "
                     "(keep_last, keep_daily, ...)")
    args = ["forget", "--prune", "--tag", "outpost"] if keep else ["forget", "--prune"]
    for k, n in keep.items():
        if not isinstance(n, int) or n < 1:
            raise Failed(SETTINGS_INVALID, f"E9103: keep_{k} must be a whole number of 1 or "
                         f"more (got {n!r})")
        args += [f"--keep-{k}", str(n)]
    if snapshot:
        if not isinstance(snapshot, str) or snapshot.startswith("-"):
            raise Failed(SETTINGS_INVALID, f"E9103: not a snapshot id: {snapshot!r}")
        args.append(snapshot)
    started = time.monotonic()
    removed = forget(ctx, args)
    seconds = round(time.monotonic() - started, 3)
    what = f"snapshot {snapshot}" if snapshot else "snapshots outside " + ", ".join(
        f"keep_{k}={n}" for k, n in keep.items())
    report(ctx, "success", f"forgot {what} ({len(removed)} removed) and pruned the "
           f"repository in {seconds:g} s",
           result={"snapshot": snapshot, "keep": keep, "removed": removed,
                   "duration_seconds": seconds})


def forget(ctx: Context, args: Sequence[str]) -> list[str]:
    """``restic ARGS`` (a ``forget --prune ...``); the full ids of the snapshots it removed."""
    with workdir() as tmp:
        restic = Restic(ctx, tmp)
        before = {s["id"] for s in _listed(restic)}
        restic.run(args, "forget snapshots")
        return sorted(before - {s["id"] for s in _listed(restic)})


COMMANDS = {"install": do_install, "enable": do_enable, "disable": do_nothing,
            "update": do_nothing, "uninstall": do_nothing, "snapshot": do_snapshot,
            "restore": do_restore, "forget": do_forget}


def context(command: str, raw: str, extension: str = "backup") -> Context:
    """The command's context from the JSON object the agent wrote on its stdin (anything
    else reads as empty)."""
    try:
        payload = json.loads(raw) if raw.strip() else {}
    except ValueError:
        payload = {}
    if not isinstance(payload, dict):
        payload = {}

    def part(value: Any) -> dict[str, Any]:
        return value if isinstance(value, dict) else {}

    credentials = part(payload.get("credentials"))
    return Context(command=command, settings=part(payload.get("settings")),
                   protected=part(payload.get("protected")),
                   credential=part(credentials.get("backup")),
                   params=part(payload.get("params")),
                   status_dir=Path(os.environ.get("OUTPOST_EXT_STATUS_DIR", ".")),
                   seq=os.environ.get("OUTPOST_EXT_SEQ", "0"), extension=extension)


def main(argv: Sequence[str] | None = None) -> int:
    return run(COMMANDS, argv)


def run(commands: Mapping[str, Callable[[Context], None]], argv: Sequence[str] | None = None,
        extension: str = "backup") -> int:
    """Run the command ``argv`` names (a handler's or an operation's, from ``commands``)
    and write its status file; the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args else os.environ.get("OUTPOST_EXT_HANDLER", "")
    ctx = context(command, sys.stdin.read(), extension)
    if command not in commands:
        report(ctx, "error", f"E9103: unknown command {command!r}; one of "
               f"{', '.join(commands)}", SETTINGS_INVALID)
        return 2
    try:
        commands[command](ctx)
    except Failed as exc:
        report(ctx, "error", exc.message, exc.code)
        return 1
    except OSError as exc:
        report(ctx, "error", f"E9102: {command} failed: {exc}", RESTIC_FAILED)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

