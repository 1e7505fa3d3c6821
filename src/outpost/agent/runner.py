"""Running one job attempt: its own directory, session and process group, a minimal
environment, and an on-disk spool between the runbook's pipes and the hub.

stdout is the Output stream and stderr the Error stream. The runbook writes them to two files
that the agent tails (process.py), so what it wrote survives the agent. A stdout line starting
``WARNING:``, ``VERBOSE:``, ``DEBUG:`` or ``PROGRESS:`` (any case) goes to that stream. Every
record is written to the attempt's spool file (and handed to the kernel) with a progress line
saying how far into each output file the records go; one uploader per attempt sends the
spool in order (running, records, finished). An agent killed and started again reads the
output files on from the last progress line (``end_leftover``), and a hub that cannot be
reached waits for the spool: nothing is lost. The hub keeps each (job, sequence) once, so
what is sent twice is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import os
import pwd
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from outpost.protocol.errors import HubRefused, OutpostError

from . import cgroups, helper, joblogs, procgroup, process, workdirs
from .reporter import Reporter
from .sandbox import HELPER_DIR, Lease, Sandbox
from .transport import Backoff

log = logging.getLogger("outpost.agent.job")

Call = Callable[..., Awaitable[Any]]
PREFIXES = {"warning:": "Warning", "verbose:": "Verbose", "debug:": "Debug",
            "progress:": "Progress"}
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
GRACE_SECONDS = 5.0
CHUNK = 64 * 1024
LINE_MAX = 1024 * 1024  # a longer line is cut into records of this size
BATCH_BYTES = 256 * 1024  # records per upload request, by their size on disk
FIRST_REPORT_WAIT = 0.02  # a job this quick is reported in one request
_EXT = {"bash": ".sh", "sh": ".sh", "python": ".py", "pwsh": ".ps1"}


SPAWN_TRIES = 5  # 0.1 + 0.2 + 0.4 + 0.8 s of waits for a fork refused with EAGAIN


@functools.cache
def _lean() -> bool:
    """Runbooks are started and watched by process.py where pidfds work."""
    return process.available()


def command(kind: str, script: str) -> list[str]:
    """The command line for a runbook type; a missing interpreter is named."""
    if kind == "pwsh":
        pwsh = shutil.which("pwsh", path=SAFE_PATH) or shutil.which("pwsh")
        if pwsh is None:
            raise OutpostError(
                "interpreter_missing",
                "PowerShell (pwsh) is not installed on this machine, so this pwsh runbook "
                "cannot run.", fix="Install PowerShell 7 ('pwsh') on the machines of this "
                "group, or publish the runbook as bash, sh or python.", interpreter="pwsh")
        return [pwsh, "-NoProfile", "-NonInteractive", "-File", script]
    if kind == "python":
        python = shutil.which("python3", path=SAFE_PATH) or sys.executable
        return [python, script]
    shell = shutil.which(kind, path=SAFE_PATH)
    if shell is None:
        raise OutpostError("interpreter_missing", f"'{kind}' is not installed on this machine.",
                           fix=f"Install {kind}, or publish the runbook with another --type.",
                           interpreter=kind)
    return [shell, script]


def environment(job_id: str, workdir: Path, values: dict[str, Any]) -> dict[str, str]:
    """Only what the runbook needs: never the agent's key, config or hub credentials."""
    env = {"PATH": SAFE_PATH, "HOME": str(workdir), "TMPDIR": str(workdir),
           "LANG": "C.UTF-8", "OUTPOST_JOB_ID": job_id}
    for name, value in values.items():
        if isinstance(value, bool):
            env[name] = "true" if value else "false"
        elif isinstance(value, str):
            env[name] = value
        else:
            env[name] = json.dumps(value)
    return env


def run_as_identity(user: str | None) -> tuple[int, int] | None:
    """(uid, gid) to drop to for the group's run-as user, None to stay as the agent (HW-1a)."""
    if not user:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise OutpostError(
            "run_as_unknown", f"The run-as user '{user}' of this group does not exist on "
            "this machine.", user=user) from None
    if entry.pw_uid == os.geteuid():
        return None
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid()).pw_name
        raise OutpostError(
            "run_as_unavailable", f"The agent runs as '{me}', not as root, so it cannot run "
            f"runbooks as '{user}'.", user=user, agent_user=me)
    return entry.pw_uid, entry.pw_gid


def classify(line: str) -> tuple[str, str]:
    lowered = line[:10].lower()
    for prefix, stream in PREFIXES.items():
        if lowered.startswith(prefix):
            return stream, line[len(prefix):].lstrip()
    return "Output", line


def describe_exit(returncode: int) -> tuple[int | None, int | None, str]:
    """(exit code, signal, reason). 4294967295 is -1 seen as an unsigned 32-bit number."""
    if returncode < 0:
        sig = -returncode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return None, sig, f"killed by {name}"
    if returncode == 0:
        return 0, None, "exit code 0"
    note = " (-1 seen as unsigned: 4294967295)" if returncode == 255 else ""
    return returncode, None, f"exit code {returncode}{note}"


class Lines:
    """Cuts one output stream's bytes into lines (a longer one than LINE_MAX into pieces),
    and counts how much of its file the lines given out cover.

    Each line is given out as (bytes, continues): ``continues`` is True for each piece of a
    longer line but its last, so a client can join them (the record's ``continues``).
    """

    def __init__(self, consumed: int = 0) -> None:
        self.rest = b""
        self.consumed = consumed  # bytes of the file before ``rest``: given out as lines
        # The stream the line being cut was given by its first piece ("warning: ..."),
        # kept for its later pieces; None between lines.
        self.stream: str | None = None

    def feed(self, chunk: bytes) -> list[tuple[bytes, bool]]:
        whole = (self.rest + chunk).split(b"\n")
        before = len(self.rest)
        self.rest = whole.pop()
        lines: list[tuple[bytes, bool]] = []
        for line in whole:  # a line that ended in this chunk may be longer than LINE_MAX too
            while len(line) > LINE_MAX:
                at = _boundary(line)
                lines.append((line[:at], True))
                line = line[at:]
            lines.append((line, False))
        while len(self.rest) >= LINE_MAX:
            at = _boundary(self.rest)
            lines.append((self.rest[:at], True))
            self.rest = self.rest[at:]
        self.consumed += before + len(chunk) - len(self.rest)
        return lines

    def flush(self) -> list[tuple[bytes, bool]]:
        """The last line, without its newline, at the stream's end."""
        last, self.rest = self.rest, b""
        self.consumed += len(last)
        return [(last, False)] if last or self.stream is not None else []


def _boundary(line: bytes) -> int:
    """Where to cut a line longer than LINE_MAX: at most LINE_MAX bytes, and not inside a
    UTF-8 character (so the joined pieces are the line), unless the bytes are no UTF-8."""
    if len(line) <= LINE_MAX:
        return len(line)
    at = LINE_MAX
    while at > LINE_MAX - 3 and line[at] & 0xC0 == 0x80:
        at -= 1
    return at if line[at] & 0xC0 != 0x80 else LINE_MAX


def line_records(lines: list[tuple[bytes, bool]], stderr: bool, seq: int, verbose: bool,
                 progress: bool, at: float, cut: Lines | None = None) -> tuple[list[bytes], int]:
    """The spool's record lines for a stream's lines, numbered from ``seq``; and the next
    number. Verbose and progress lines are kept only if the job asks for them. The pieces of
    a long line after its first keep the first's stream (``cut`` remembers it across
    calls) and carry ``"continues": true`` on all but the last."""
    out = []
    for raw, continues in lines:
        text = raw.decode("utf-8", "replace")
        if not continues:
            text = text.rstrip("\r")
        if cut is not None and cut.stream is not None:
            stream = cut.stream
        else:
            stream, text = ("Error", text) if stderr else classify(text)
        if cut is not None:
            cut.stream = stream if continues else None
        if (stream == "Verbose" and not verbose) or (stream == "Progress" and not progress):
            continue
        record: dict[str, Any] = {"seq": seq, "stream": stream, "text": text, "at": at}
        if continues:
            record["continues"] = True
        out.append(json.dumps(record, ensure_ascii=False).encode() + b"\n")
        seq += 1
    return out, seq


def progress_line(out: Lines, err: Lines, seq: int) -> bytes:
    """How far the spool's records go into each output file, and the next record's number:
    where an agent started again reads on (``end_leftover``). Never uploaded."""
    return b'{"raw":[%d,%d],"seq":%d}\n' % (out.consumed, err.consumed, seq)


class Spool:
    """One attempt's records on disk: one JSON object a line, and last an ``end`` line.

    The meta line, ``{"meta": {...}}``, holds what is needed to upload it after a restart
    and to find the attempt's process group if it outlived the agent: written when the
    process has started, before any record (an attempt that could not start has none). It
    is never uploaded. An older agent kept it beside the spool in ``.json`` (``meta_path``),
    which is still read, so its spools are delivered after an upgrade.

    While the attempt runs, the agent's own log lines about the job are lines of its spool
    too, ``{"agent": {...}}`` (joblogs.py), before the meta line as well as among the
    records, never after the end: they are never uploaded either.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.meta_path = path.with_suffix(".json")  # an older agent's meta file
        self._fh: Any = None

    @classmethod
    def create(cls, root: Path, job_id: str, attempt: int) -> Spool:
        if not root.is_dir():
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
        spool = cls(root / f"{job_id}.{attempt}.jsonl")
        spool._fh = spool.path.open("ab")
        joblogs.attach(spool.path, spool.agent_lines)  # until the end: see end()
        return spool

    def agent_lines(self, data: bytes) -> bool:
        """The agent's whole log lines about the job (joblogs.py), through the spool's own
        file object so they and the records stay whole lines; False once it is closed, or
        when the disk refuses them (they are then held in memory)."""
        if self._fh is None:
            return False
        try:
            self._write(data)
        except OSError:
            return False
        return True

    def _write(self, data: bytes) -> None:
        """Append and hand to the kernel. A write the disk refuses (full, quota) leaves no
        torn line behind: the file is cut back to where it was, so whatever is written next
        starts a line, and the error is raised."""
        fh = self._fh
        assert fh is not None
        before = fh.tell()  # append mode: the file's end
        try:
            fh.write(data)
            fh.flush()
        except OSError:
            self._fh = None
            with contextlib.suppress(OSError):
                fh.close()  # its flush may fail again: what it held is dropped
            with contextlib.suppress(OSError):
                os.truncate(self.path, before)
            raise

    def write_meta(self, meta: dict[str, Any]) -> None:
        """The spool's meta line, before any record, in one write. A torn meta line (the
        agent killed in this write) reads as no meta, and the spool is still delivered:
        end_leftover cuts the torn line, and see meta()."""
        self.append([json.dumps({"meta": meta}).encode() + b"\n"])

    def meta(self) -> dict[str, Any]:
        """The meta line's content (or an older agent's meta file's); the job and attempt
        also come from the file's name, so a spool whose process never started (no meta)
        is still delivered."""
        job_id, _, attempt = self.path.stem.rpartition(".")
        data: dict[str, Any] = {"job_id": job_id, "attempt": int(attempt)}
        first = b""
        with contextlib.suppress(FileNotFoundError), self.path.open("rb") as fh:
            for _ in range(AGENT_LINES_FIRST):  # the agent's lines logged before the meta
                first = fh.readline(META_MAX)
                if not first.startswith(joblogs.AGENT_LINE):
                    break
                while first and not first.endswith(b"\n"):  # the rest of a long one
                    first = fh.readline(META_MAX)
        found = _meta_of(first) if first.endswith(b"\n") else None
        if found is None:
            with contextlib.suppress(FileNotFoundError):
                found = _meta_of(self.meta_path.read_bytes(), wrapped=False)
        data.update(found or {})
        return data

    def append(self, lines: list[bytes]) -> None:
        """Write and hand to the kernel: a killed agent loses none of it. OSError when the
        disk refuses it (see _write)."""
        if self._fh is None:
            self._fh = self.path.open("ab")
        self._write(b"".join(lines))

    def end(self, outcome: dict[str, Any]) -> None:
        """The last line: no agent line comes after it (joblogs.detach). Its ``at`` (not
        uploaded) dates the end in the job's kept log, to which lines are added later."""
        joblogs.detach(self.path)
        self.append([json.dumps({"end": outcome, "at": round(time.time(), 6)}).encode()
                     + b"\n"])
        self.close()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def read(self, offset: int) -> tuple[list[bytes], dict[str, Any] | None, int]:
        """Complete record lines from ``offset`` (about BATCH_BYTES), the end if reached, and
        the offset after them. The meta line and the agent's lines are not records: skipped
        wherever they are."""
        with self.path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read(BATCH_BYTES)
            if len(data) == BATCH_BYTES:
                data += fh.readline()  # finish the last line
        cut = data.rfind(b"\n") + 1
        data = data[:cut]
        lines = data.splitlines()
        if joblogs.AGENT_LINE in data or META_LINE in data or RAW_LINE in data:
            # (never inside a record line, whose text is quoted)
            lines = [line for line in lines if not line.startswith(_NOT_RECORDS)]
        end = None
        if lines and lines[-1].startswith(b'{"end"'):
            end = json.loads(lines.pop())["end"]
        return lines, end, offset + cut

    def remove(self) -> None:
        """The hub has it all: the records move to the job's kept log (joblogs.py)."""
        self.close()
        joblogs.detach(self.path)
        joblogs.keep(self.path)
        for path in (self.path, self.meta_path):
            path.unlink(missing_ok=True)


META_LINE = b'{"meta"'
RAW_LINE = b'{"raw"'
META_MAX = 64 * 1024  # a line longer than this is a record, not the meta line
AGENT_LINES_FIRST = 256  # at most this many of the agent's lines are read past for the meta
_NOT_RECORDS = (META_LINE, joblogs.AGENT_LINE, RAW_LINE)


def _meta_of(raw: bytes, wrapped: bool = True) -> dict[str, Any] | None:
    """The meta in a meta line (or, not ``wrapped``, an older agent's meta file); None when
    it is not one, or torn."""
    if wrapped and not raw.startswith(META_LINE):
        return None
    try:
        item = json.loads(raw)
    except ValueError:
        return None
    if wrapped:
        item = item.get("meta") if isinstance(item, dict) else None
    return item if isinstance(item, dict) else None


class Uploader:
    """Sends one attempt's spool to the hub in order, each request a report of what is new:
    that the process started, the records, the end. A job that ends within
    FIRST_REPORT_WAIT is reported whole in one request."""

    def __init__(self, spool: Spool, job_id: str, attempt: int, call: Call,
                 reporter: Reporter | None = None) -> None:
        self.spool = spool
        self.job_id = job_id
        self.attempt = attempt
        self.call = call
        self.reporter = reporter  # reports go through it, batched with other attempts'
        self.more = asyncio.Event()
        self.ended = asyncio.Event()
        self.started = asyncio.Event()  # set when the process started, or could not
        self.spawned = False
        # The attempt's end when the spool could not take it (a full disk): sent once
        # everything the spool holds has been.
        self.unspooled_end: dict[str, Any] | None = None

    async def send(self, path: str, payload: Any) -> Any:
        """Deliver one report, retrying with backoff; a refusal (4xx) is not retried."""
        backoff = Backoff(cap=10)
        while True:
            try:
                return await self.call("POST", f"/v1/agent/jobs/{self.job_id}/{path}", payload)
            except OutpostError as exc:
                if isinstance(exc, HubRefused) and exc.status < 500:
                    raise
                delay = backoff.next()
                log.warning("job %s: %s not delivered (%s); again in %.1f s", self.job_id,
                            path, exc.message, delay)
                await asyncio.sleep(delay)

    async def run(self, announce: bool = True) -> dict[str, Any]:
        """Report until the end is delivered; returns the hub's answer to it."""
        if announce:
            await self.started.wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ended.wait(), FIRST_REPORT_WAIT)
        started = announce and self.spawned
        offset = 0
        while True:
            self.more.clear()
            lines, end, offset_after = self.spool.read(offset)  # page cache: no wait
            if end is None and not lines and offset_after == offset \
                    and self.unspooled_end is not None:
                end = self.unspooled_end
            if lines or end is not None or started:
                body = b'{"attempt":%d,"started":%s,"end":%s,"records":[%s]}' % (
                    self.attempt, b"true" if started else b"false",
                    json.dumps(end).encode(), b",".join(lines))
                if self.reporter is not None:
                    answer: dict[str, Any] = await self.reporter.report(
                        self.job_id, body, end is not None)
                else:
                    answer = await self.send("report", body)
                started, offset = False, offset_after
                if end is not None:
                    self.spool.remove()
                    return answer
            elif offset_after > offset:
                offset = offset_after  # past lines that are not records (the agent's)
            else:
                await self.more.wait()


class JobRun:
    def __init__(self, job: dict[str, Any], jobs_dir: Path, spool_dir: Path, call: Call,
                 hub_url: str = "", ca_pem: str = "",
                 reporter: Reporter | None = None, sandbox: Sandbox | None = None) -> None:
        self.job = job
        # Who the job runs as and within what limits (sandbox.py); None: as the agent,
        # unlimited.
        self.sandbox = sandbox
        self.lease: Lease | None = None
        self.run_as: str | None = None  # what 'job show' says this attempt ran as
        self.id: str = job["job_id"]
        self.attempt: int = int(job.get("attempt") or 1)
        self.seq: int = int(job.get("seq_base") or 0)
        self.jobs_dir = jobs_dir
        self.workdir = jobs_dir / self.id
        self.hub_url = hub_url
        self.ca_pem = ca_pem
        self.spool = Spool.create(spool_dir, self.id, self.attempt)
        self.uploader = Uploader(self.spool, self.id, self.attempt, call, reporter)
        self.call = call
        self.proc: asyncio.subprocess.Process | process.Process | None = None
        # The runbook's process group (procgroup.py): its leader is ``proc``.
        self.group: procgroup.ProcessGroup | None = None
        self._reusable = False  # its working directory may be given back (workdirs.py)
        self.ended_by: str | None = None  # timeout, stopped or lost: the agent ended it
        self.why = ""
        self._pending: list[bytes] = []
        # How far the records go into the runbook's stdout and stderr files (None while it
        # writes to pipes: where pidfds do not work).
        self._outputs: tuple[Lines, Lines] | None = None
        self._output: int | None = None  # its pair of output files (process.Outputs)
        self._requested: str | None = None  # a control action that came before the process
        self._ending: asyncio.Task[None] | None = None  # _spool_refused's end of the group
        # Called when the disk refuses the job's output, so that the agent claims no more
        # work before this attempt's end reaches the hub (the daemon's _recheck_poll).
        self.disk_refused: Callable[[], None] | None = None

    # --- records -------------------------------------------------------------------------
    def emit(self, stream: str, text: str) -> None:
        if stream == "Verbose" and not self.job.get("log_verbose"):
            return
        if stream == "Progress" and not self.job.get("log_progress"):
            return
        self._pending.append(json.dumps(
            {"seq": self.seq, "stream": stream, "text": text, "at": round(time.time(), 6)},
            ensure_ascii=False).encode() + b"\n")
        self.seq += 1

    def _commit(self) -> None:
        if self._pending:
            if self._outputs is not None:
                self._pending.append(progress_line(*self._outputs, self.seq))
            try:
                self.spool.append(self._pending)
            except OSError as exc:
                self._spool_refused(exc)
                return
            self._pending = []
            self.uploader.more.set()

    def _spool_refused(self, exc: OSError) -> None:
        """The spool cannot take the job's output (the disk is full): records the agent
        cannot keep must not be taken at all, so the attempt ends here, its process group
        with it, as a failed activation (the machine's fault, not the runbook's: the hub
        queues the job again). The output still coming is read and dropped, so the runbook
        is never left blocked on a full pipe."""
        self._pending = []
        if self.ended_by is not None:
            return
        self.ended_by = "lost"
        self.why = (f"the agent could not write the job's output to its spool in "
                    f"{self.spool.path.parent} ({exc.strerror or exc}); free space on the "
                    "machine")
        log.error("job %s: %s", self.id, self.why)
        if self.disk_refused is not None:
            self.disk_refused()
        if self.group is not None:
            self._ending = asyncio.get_running_loop().create_task(
                self._end_group(), name=f"end-{self.id}")

    def _lines(self, lines: list[tuple[bytes, bool]], stderr: bool, cut: Lines) -> None:
        records, self.seq = line_records(
            lines, stderr, self.seq, bool(self.job.get("log_verbose")),
            bool(self.job.get("log_progress")), round(time.time(), 6), cut)
        self._pending += records
        self._commit()

    async def _read(self, pipe: asyncio.StreamReader | process.Tail, stderr: bool) -> None:
        cut = self._outputs[stderr] if self._outputs is not None else Lines()
        while True:
            chunk = await pipe.read(CHUNK)
            lines = cut.feed(chunk) if chunk else cut.flush()
            if lines:
                self._lines(lines, stderr, cut)
            if not chunk:
                return

    def _drain(self) -> None:
        """Into the spool: what the runbook wrote that was not read (the agent is stopping)."""
        if self._outputs is not None and self._output is not None:
            out, err = self._outputs
            paths = process.outputs(self.spool.path.parent).paths(self._output)
            self.seq = drain_output(self.spool, paths, out.consumed, err.consumed, self.seq,
                                    bool(self.job.get("log_verbose")),
                                    bool(self.job.get("log_progress")))

    # --- the process group ---------------------------------------------------------------
    def _signal_group(self, sig: int) -> None:
        if self.group is not None:
            self.group.signal(sig)

    async def _end_group(self) -> None:
        """TERM the whole process group, give it a grace period, then KILL what is left."""
        assert self.group is not None
        await self.group.stop(GRACE_SECONDS)

    async def control(self, action: str, why: str = "") -> None:
        """stop, suspend, resume (the operator's) or abandon (the hub gave the attempt up)."""
        if self.group is None:
            self._requested = action
            return
        if action in ("stop", "abandon"):
            self.ended_by, self.why = ("stopped", "stopped by the operator") \
                if action == "stop" else ("lost", why)
            await self._end_group()
        elif action == "suspend":
            self.group.suspend()
            await self.uploader.send("paused", {"attempt": self.attempt})
        elif action == "resume":
            self.group.resume()
            await self.uploader.send("report", {"attempt": self.attempt, "started": True})

    # --- the attempt ---------------------------------------------------------------------
    def _spawn_args(self) -> tuple[list[str], Path, dict[str, str], tuple[int, int] | None]:
        identity = run_as_identity(self.job.get("run_as"))
        if self.sandbox is not None:
            self.lease = self.sandbox.lease(self.job, identity)
            identity = self.lease.identity
            self.run_as = self.lease.run_as
        job_user = self.lease.job_user if self.lease is not None else None
        kind = self.job["type"]
        name = f"runbook{_EXT.get(kind, '')}"
        argv = command(kind, name)  # relative to the working directory: see below
        reused = False
        if identity is None or job_user is not None:
            # A directory an earlier job of the same user gave back, if there is one
            # (workdirs.py); a job user's lie in the jobs directory, outside the state's.
            if job_user is not None:
                assert self.sandbox is not None and self.sandbox.jobs_root is not None
                workdir = self.sandbox.jobs_root / self.id
                reused = workdirs.pool(self.sandbox.jobs_root).take(workdir, job_user.uid)
            else:
                workdir = self.workdir
                reused = workdirs.pool(self.jobs_dir).take(workdir)
            if not reused:
                shutil.rmtree(workdir, ignore_errors=True)  # an earlier attempt's, cut short
                workdir.mkdir(parents=True, mode=0o700)
        else:
            # The state directory (and the machine key in it) stays closed to the run-as
            # user, so its working directory is made outside it, owned by that user.
            workdir = Path(tempfile.mkdtemp(prefix=f"outpost-job-{self.id[:8]}-"))
        self.workdir = workdir
        self._reusable = identity is None or job_user is not None
        script = workdir / name
        if reused:
            with os.scandir(workdir) as entries:
                for entry in entries:  # the last job's runbook file, emptied
                    if entry.name.startswith("runbook") and entry.name != name:
                        os.rename(entry.path, script)
        # Only for the job's user; a reused directory's runbook file is written over.
        workdirs.overwrite(script, self.job["content"].encode())
        env = environment(self.id, workdir, self.job.get("params") or {})
        # The helper files every job gets alike are hard links to one copy in STATE/helper/
        # (a job user's: JOBS/.helper/, readable by all), except for a group's run-as
        # user's: its files are chowned below, and a shared one must not be.
        shared = None
        if job_user is not None:
            assert self.sandbox is not None and self.sandbox.jobs_root is not None
            shared = helper.shared_files(self.sandbox.jobs_root / HELPER_DIR, 0o644)
        elif identity is None:
            shared = helper.shared_files(self.jobs_dir.parent / helper.SHARED_DIR)
        env.update(helper.prepare(workdir, self.job, self.hub_url, self.ca_pem, shared,
                                  fresh=not reused))
        if job_user is not None:
            # Its own files only: the shared links stay root's.
            folder = workdir / helper.DIR_NAME
            for path in (workdir, folder, script, folder / helper.CONFIG_FILE,
                         folder / helper.TOKEN_FILE):
                with contextlib.suppress(FileNotFoundError):
                    os.chown(path, job_user.uid, job_user.gid, follow_symlinks=False)
        elif identity is not None:
            for path in [workdir, *workdir.rglob("*")]:
                os.chown(path, *identity, follow_symlinks=False)
        return argv, workdir, env, identity

    async def run(self) -> dict[str, Any]:
        """Run the attempt to its end and deliver everything; returns the hub's last answer."""
        uploading = asyncio.create_task(self.uploader.run(), name=f"upload-{self.id}")
        try:
            outcome = await self._execute()
        except asyncio.CancelledError:
            # The agent is stopping: leave no process behind, and leave the end in the
            # spool for the next start to report (the hub retries the job elsewhere).
            if self.group is not None and self.group.returncode is None:
                self.ended_by, self.why = "lost", "the agent was stopped while the job ran"
                self._signal_group(signal.SIGKILL)
            self._commit()
            with contextlib.suppress(OSError):  # a full disk: the hub's lease decides
                self._drain()
                self.spool.end({"exit_code": None, "signal": None, "cause": "lost",
                                "reason": "the agent was stopped while the job ran",
                                "run_as": self.run_as})
            uploading.cancel()
            raise
        finally:
            self.uploader.started.set()
            self._cleanup()
        if self.run_as:
            outcome["run_as"] = self.run_as
        self._commit()
        try:
            self.spool.end(outcome)
        except OSError as exc:
            log.error("job %s: the end of attempt %s could not be spooled (%s); it is sent "
                      "from memory", self.id, self.attempt, exc.strerror or exc)
            self.uploader.unspooled_end = outcome
        # The records hold what the runbook wrote, or the disk refused it (then the attempt
        # failed for it, and its files must not keep the space).
        self._give_back_output()
        self.uploader.ended.set()
        self.uploader.more.set()
        return await uploading

    def _prepare_and_spawn(self) -> process.Started:
        argv, workdir, env, identity = self._spawn_args()
        outputs = process.outputs(self.spool.path.parent)
        self._output = outputs.take()
        out, err = outputs.paths(self._output)
        try:
            if self.lease is None:
                started = process.spawn(argv, workdir, env, identity, out, err)
            else:
                # Born in the job's group, as the job's user (sandbox.py).
                started = self.lease.spawn(argv, lambda argv, identity, preexec: process.spawn(
                    argv, workdir, env, identity, out, err, preexec))
                self.lease.started(started.popen.pid)
        except BaseException:
            self._give_back_output()
            raise
        self._outputs = (Lines(), Lines())
        return started

    def _give_back_output(self) -> None:
        if self._output is None:
            return
        proc = self.proc
        reuse = not isinstance(proc, process.Process) or (
            proc.stdout.clean and proc.stderr.clean)
        process.outputs(self.spool.path.parent).give_back(self._output, reuse)
        self._output = None

    async def _spawn_retrying(self) -> process.Started:
        """The runbook started. A fork refused for a moment (EAGAIN: the slot's process
        limit still counts processes of the job before it, which the kernel is reaping, or
        the machine is briefly out of processes) is tried again, waiting 0.1 s doubling,
        before the attempt counts as lost."""
        for attempt in range(SPAWN_TRIES):
            try:
                return self._prepare_and_spawn()
            except OSError as exc:
                if exc.errno != errno.EAGAIN or attempt == SPAWN_TRIES - 1:
                    raise
                log.warning("job %s: the runbook could not be started (%s); trying again",
                            self.id, exc.strerror or exc)
                await asyncio.sleep(0.1 * 2 ** attempt)
        raise AssertionError("unreachable")

    async def _execute(self) -> dict[str, Any]:
        try:
            if _lean():
                self.proc = process.Process(await self._spawn_retrying())
            else:
                argv, workdir, env, identity = self._spawn_args()
        except OutpostError as exc:
            # Nothing ran: the runbook cannot start here (HW-1a, a missing interpreter).
            self.emit("Error", exc.message)
            return {"exit_code": None, "signal": None, "cause": "exit", "reason": exc.message}
        except OSError as exc:
            # Nothing ran, and not for the runbook's sake: its directory could not be made
            # or written (a full disk) or the process not started. A failed activation: the
            # hub queues the job again, for any machine of the group.
            fix = ("free space on the machine" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
                   else "see 'outpost check' on the machine")
            why = (f"the agent could not prepare or start the job in {self.workdir} "
                   f"({exc.strerror or exc}); {fix}")
            log.error("job %s: %s", self.id, why)
            return {"exit_code": None, "signal": None, "cause": "lost", "reason": why}
        if self.proc is None:
            preexec = None
            if self.lease is not None:  # a fork: the child joins the group itself
                argv, identity, preexec = self.lease.forked(argv)
            self.proc = await asyncio.create_subprocess_exec(
                *argv, cwd=workdir, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                user=identity[0] if identity else None,
                group=identity[1] if identity else None,
                extra_groups=[] if identity else None, preexec_fn=preexec)
        self.group = procgroup.ProcessGroup(self.proc)
        try:
            self.spool.write_meta({"job_id": self.id, "attempt": self.attempt,
                                   "pgid": self.proc.pid, "started_at": time.time(),
                                   "output": self._output,
                                   "log_verbose": bool(self.job.get("log_verbose")),
                                   "log_progress": bool(self.job.get("log_progress"))})
        except OSError as exc:
            self._spool_refused(exc)
        self.uploader.spawned = True
        self.uploader.started.set()
        if self._requested:
            asyncio.create_task(self.control(self._requested), name=f"control-{self.id}")
        assert self.proc.stdout is not None and self.proc.stderr is not None
        readers = asyncio.gather(self._read(self.proc.stdout, False),
                                 self._read(self.proc.stderr, True))
        timeout = self.job.get("timeout")
        try:
            await asyncio.wait_for(asyncio.shield(readers), timeout)
        except TimeoutError:
            self.ended_by, self.why = "timeout", f"timed out after {timeout:g} s"
            await self._end_group()
            await readers
        returncode = await self.proc.wait()
        exit_code, sig, reason = describe_exit(returncode)
        if returncode != 0 and self.lease is not None and self.lease.out_of_memory():
            # The kernel killed a process of the job's group for its memory limit: the
            # runbook's own failure, named with the limit (not a bare SIGKILL, which the
            # hub would take for the sandbox dying and retry).
            limit = cgroups.mib(self.lease.limits.memory_mb)
            why = f"{self.why}; " if self.ended_by is not None else ""
            return {"exit_code": exit_code, "signal": sig, "cause": "exit",
                    "reason": f"{why}out of memory (limit {limit}); {reason}"}
        if self.ended_by is not None:
            return {"exit_code": exit_code, "signal": sig, "cause": self.ended_by,
                    "reason": f"{self.why}; {reason}"}
        if sig is not None:  # a signal the agent did not send: the sandbox died (HW-1)
            return {"exit_code": None, "signal": sig, "cause": "killed",
                    "reason": f"the runbook's process was {reason}, not by the agent"}
        return {"exit_code": exit_code, "signal": None, "cause": "exit", "reason": reason}

    def _group_alive(self) -> bool:
        """Whether a process of the runbook's group is left (or its leader never exited)."""
        return self.group is not None and self.group.alive()

    def _cleanup(self) -> None:
        if isinstance(self.proc, process.Process):
            self.proc.close()
        lease, self.lease = self.lease, None
        try:
            # Whatever the job left running in its group is killed (sandbox.py).
            emptied = lease.finish() if lease is not None else False
            # Given back for the next job of its user if the runbook left it as it got it
            # and nothing of the job is still running, in it or anywhere (workdirs.py).
            if lease is not None and lease.job_user is not None:
                assert self.sandbox is not None and self.sandbox.jobs_root is not None
                if self._reusable and emptied and workdirs.pool(
                        self.sandbox.jobs_root).give_back(
                        self.workdir, helper.DIR_NAME, helper.FILES, helper.TOKEN_FILE,
                        lease.job_user.uid):
                    return
            elif self._reusable and not self._group_alive() and workdirs.pool(
                    self.jobs_dir).give_back(self.workdir, helper.DIR_NAME, helper.FILES,
                                             helper.TOKEN_FILE):
                return
            shutil.rmtree(self.workdir, ignore_errors=True)
        finally:
            if lease is not None:
                lease.release()




def leftover_spools(spool_dir: Path) -> list[Spool]:
    """Spools of attempts that a previous run of the agent did not finish delivering."""
    if not spool_dir.is_dir():
        return []
    return [Spool(path) for path in sorted(spool_dir.glob("*.jsonl"))]


def end_leftover(spool: Spool) -> None:
    """After a restart: end an attempt the last agent left running, and its process group.

    The group is killed only if its leader is the process the agent started (same pid and
    start time), never a process that took the number since.
    """
    import psutil

    content = spool.path.read_bytes()
    whole = content.rfind(b"\n") + 1
    if whole < len(content):
        # A torn last line: the agent died inside a write. What was whole is kept.
        with spool.path.open("r+b") as fh:
            fh.truncate(whole)
    if _ended(content[:whole]):
        return  # it ended; only its delivery was cut short
    meta = spool.meta()
    pgid = meta.get("pgid")
    if pgid:
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            proc = psutil.Process(pgid)
            if abs(proc.create_time() - float(meta.get("started_at", 0))) < 5:
                os.killpg(pgid, signal.SIGKILL)
                # What they wrote is then all in their files.
                procgroup.wait_gone_blocking(pgid, 2.0)
    # What the runbook wrote after the last records the dead agent spooled, up to its end.
    out, err, seq = _progress(content[:whole]) or (0, 0, (int(meta["attempt"]) - 1) << 32)
    if isinstance(meta.get("output"), int):  # (an agent before output files had pipes)
        paths = process.outputs(spool.path.parent).paths(meta["output"])
        drain_output(spool, paths, out, err, seq, bool(meta.get("log_verbose")),
                     bool(meta.get("log_progress")))
    spool.end({"exit_code": None, "signal": None, "cause": "lost",
               "reason": "the agent stopped unexpectedly while the job ran"})


def _progress(content: bytes) -> tuple[int, int, int] | None:
    """The last progress line's (stdout offset, stderr offset, next record number)."""
    at = content.rfind(b"\n" + RAW_LINE) + 1
    if at == 0 and not content.startswith(RAW_LINE):
        return None
    try:
        item = json.loads(content[at:content.index(b"\n", at)])
        out, err = item["raw"]
        return int(out), int(err), int(item["seq"])
    except (ValueError, KeyError, TypeError):
        return None


def drain_output(spool: Spool, paths: tuple[Path, Path], out_at: int, err_at: int, seq: int,
                 verbose: bool, progress: bool) -> int:
    """Into the spool: what the runbook wrote to its output files past ``out_at`` and
    ``err_at`` while no agent read them, as records numbered from ``seq``, dated when the
    file was last written; returns the next number. stdout's lines come before stderr's:
    which came first is not known."""
    cuts = (Lines(out_at), Lines(err_at))
    for stderr, path in enumerate(paths):
        cut = cuts[stderr]
        try:
            fh = path.open("rb")
        except FileNotFoundError:
            continue
        with fh:
            at = round(os.fstat(fh.fileno()).st_mtime, 6)
            fh.seek(cut.consumed)
            while True:
                chunk = fh.read(BATCH_BYTES)
                lines = cut.feed(chunk) if chunk else cut.flush()
                records, seq = line_records(lines, bool(stderr), seq, verbose, progress, at,
                                            cut)
                if records:
                    spool.append([*records, progress_line(*cuts, seq)])
                if not chunk:
                    break
    return seq


def _ended(content: bytes) -> bool:
    """Whether the last line of a spool's whole lines that is not the agent's is its end."""
    stop = len(content.rstrip(b"\n"))
    while stop > 0:
        start = content.rfind(b"\n", 0, stop) + 1
        if not content.startswith(joblogs.AGENT_LINE, start):
            return content.startswith(b'{"end"', start)
        stop = start - 1
    return False
