"""The agent's file work per job, without a hub: microseconds per job, now and as it was.

Each job goes through what the agent does on disk around a runbook, with the agent's own
code (``runner.JobRun``, ``helper``, ``runner.Spool``, ``joblogs``), only no process is
started and nothing is sent:

    JobRun(...)             the spool file (Spool.create)
    a log line about it     a line of the spool (joblogs.JobLineHandler)
    JobRun._spawn_args()    the working directory, the runbook file, the helper directory
    spool.write_meta()      what a restarted agent needs (pgid, start time)
    one record, cleanup     a record appended; the working directory removed (rmtree)
    spool.end(), read(0)    the end line; the uploader's read
    spool.remove()          the spool moved to joblogs/JOB.1.jsonl (joblogs.keep)

Variants, run in alternating blocks in one process so the machine's load hits both alike:

- ``current``: the code in ``src/`` as it is;
- ``legacy``: the same, with the pieces this benchmark was written for put back as they
  were before (``legacy_prepare``: every helper file written into each job's directory;
  ``LegacySpool``: the spool's meta in a ``.json`` file beside the spool; the job log as in
  ``dirlogs``; no working directory used again). 12 new files and directories a job,
  against 1 now (the spool: the three shared helper files are hard links, the job's log is
  its spool, and the working directory with its files is one an earlier job gave back);
- ``dirlogs``: the code in ``src/`` with only the job log as it was before its flat layout
  (``DirJobLineHandler``, ``dir_keep``): a directory ``joblogs/JOB/`` and an ``agent.jsonl`` in
  it made for each job, the spool moved into the directory. 2 inodes a job more than now.

Each variant has its own state directory under ``--dir`` (default: a new directory in
/tmp, where the throughput benchmark's state lives; removed afterwards unless --keep).

    python bench/agent_job_files.py [--jobs 2000] [--block 100] [--variant current ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from outpost.agent import helper, joblogs, logs, runner, workdirs  # noqa: E402

CA = "-----BEGIN CERTIFICATE-----\n" + "QUJD" * 300 + "\n-----END CERTIFICATE-----\n"
OUTCOME = {"exit_code": 0, "signal": None, "cause": "exit", "reason": "exit code 0"}


# --- the old per-job file work, as it was before the shared helper copies -----------------
def legacy_prepare(workdir: Path, job: dict[str, Any], hub_url: str, ca_pem: str,
                   *_: Any, **__: Any) -> dict[str, str]:
    """helper.prepare as it was: every helper file written into each job's directory."""
    folder = workdir / helper.DIR_NAME
    folder.mkdir(mode=0o700)
    module, shell = helper._sources()
    helper._write(folder / helper.MODULE_FILE, module)
    helper._write(folder / helper.SHELL_FILE, shell)
    helper._write(folder / helper.CA_FILE, ca_pem)
    helper._write(folder / helper.CONFIG_FILE,
                  json.dumps({"hub_url": hub_url, "job_id": job["job_id"]}))
    token = job.get("job_token")
    if token:
        helper._write(folder / helper.TOKEN_FILE, str(token) + "\n")
    return {"OUTPOST_HELPER_DIR": str(folder), "OUTPOST_HUB_URL": hub_url,
            "PYTHONPATH": str(folder)}


class LegacySpool(runner.Spool):
    """runner.Spool as it was: the meta in ``JOB.ATTEMPT.json`` beside the spool."""

    def write_meta(self, meta: dict[str, Any]) -> None:
        self.path.with_suffix(".json").write_bytes(json.dumps(meta).encode())

    def remove(self) -> None:
        self.close()
        joblogs.keep(self.path)
        for path in (self.path, self.path.with_suffix(".json")):
            path.unlink(missing_ok=True)


# --- the job log as it was before its flat layout ------------------------------------------
class DirJobLineHandler(logging.Handler):
    """joblogs.JobLineHandler as it was: each line appended to ``joblogs/JOB/agent.jsonl``,
    the directory and the file made for each job."""

    def __init__(self, state_root: Path) -> None:
        super().__init__()
        self.root = state_root / joblogs.DIR

    def emit(self, record: logging.LogRecord) -> None:
        job_id = logs.job_of(record)
        if not job_id or not joblogs.safe_id(job_id):
            return
        line = json.dumps(logs.as_dict(record), ensure_ascii=False, default=str)
        folder = self.root / job_id
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with (folder / "agent.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def dir_keep(spool_path: Path) -> None:
    """joblogs.keep as it was: the spool moved to ``joblogs/JOB/N.jsonl``."""
    job_id, _, attempt = spool_path.stem.rpartition(".")
    target = spool_path.parent.parent / joblogs.DIR / job_id
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.replace(spool_path, target / f"{attempt}.jsonl")


def line_handler(name: str, state: Path) -> logging.Handler:
    return joblogs.JobLineHandler(state) if name == "current" else DirJobLineHandler(state)


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    if name == "current":
        yield
        return
    saved = helper.prepare, runner.Spool, joblogs.keep
    joblogs.keep = dir_keep  # type: ignore[assignment]
    pool = workdirs.pool
    if name == "legacy":
        helper.prepare, runner.Spool = legacy_prepare, LegacySpool  # type: ignore[assignment,misc]
        workdirs.pool = lambda jobs_dir: workdirs.Workdirs(jobs_dir, keep=0)  # type: ignore
    try:
        yield
    finally:
        helper.prepare, runner.Spool, joblogs.keep = saved  # type: ignore[misc]
        workdirs.pool = pool  # type: ignore[assignment]


# --- one job -------------------------------------------------------------------------------
def one_job(state: Path, number: int, log: logging.Logger) -> None:
    job_id = f"bench{number:07d}"
    job = {"job_id": job_id, "attempt": 1, "type": "bash", "content": "true\n",
           "job_token": f"ojt_{job_id}.secret", "params": {"who": "bench"}}
    run = runner.JobRun(job, state / "jobs", state / "spool", None,  # type: ignore[arg-type]
                        "https://127.0.0.1:8443", CA)
    log.info("job %s: running %s version %s (attempt %s)", job_id, "noop", 1, 1)
    run._spawn_args()
    run.spool.write_meta({"job_id": job_id, "attempt": 1, "pgid": os.getpid(),
                          "started_at": time.time()})
    run.emit("Output", "hello")
    run._commit()
    run._cleanup()
    run.spool.end(OUTCOME)
    lines, end, _ = run.spool.read(0)
    assert len(lines) == 1 and end == OUTCOME, (lines, end)
    run.spool.remove()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per variant")
    parser.add_argument("--block", type=int, default=100, help="jobs per variant in a row")
    parser.add_argument("--variant", action="append",
                        choices=["current", "dirlogs", "legacy"])
    parser.add_argument("--dir", type=Path, default=None, help="where the state dirs go")
    parser.add_argument("--keep", action="store_true", help="keep the state dirs")
    args = parser.parse_args()
    variants = args.variant or ["legacy", "dirlogs", "current"]
    base = Path(tempfile.mkdtemp(prefix="outpost-bench-files-", dir=args.dir or "/tmp"))
    try:
        states = {name: base / name for name in variants}
        loggers = {}
        for name, state in states.items():
            state.mkdir(mode=0o700)
            log = logging.getLogger(f"bench.agent_job_files.{name}")
            log.propagate = False
            log.setLevel(logging.INFO)
            log.addHandler(line_handler(name, state))
            loggers[name] = log
        for name in variants:  # warm-up: imports, the helper's sources, directories
            with variant(name):
                for i in range(5):
                    one_job(states[name], 9_000_000 + i, loggers[name])
        blocks: dict[str, list[float]] = {name: [] for name in variants}
        done = 0
        while done < args.jobs:
            size = min(args.block, args.jobs - done)
            for name in variants:
                with variant(name):
                    start = time.perf_counter()
                    for i in range(done, done + size):
                        one_job(states[name], i, loggers[name])
                    blocks[name].append((time.perf_counter() - start) / size * 1e6)
            done += size
        print(f"agent per-job file work: {args.jobs} jobs per variant in blocks of "
              f"{args.block}, state under {base} ({fs_type(base)}); load average "
              f"{os.getloadavg()[0]:.2f}")
        print(f"{'variant':<10}{'mean µs/job':>13}{'median block':>14}{'best block':>12}")
        means = {}
        for name in variants:
            means[name] = statistics.fmean(blocks[name])
            print(f"{name:<10}{means[name]:>13.0f}{statistics.median(blocks[name]):>14.0f}"
                  f"{min(blocks[name]):>12.0f}")
        medians = {name: statistics.median(blocks[name]) for name in variants}
        for other in ("dirlogs", "legacy"):
            if other in means and "current" in means:
                print(f"current / {other}: {means['current'] / means[other]:.2f} (mean), "
                      f"{medians['current'] / medians[other]:.2f} (median block)")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return 0


def fs_type(path: Path) -> str:
    best, kind = "", "?"
    with contextlib.suppress(OSError), open("/proc/mounts") as fh:
        for line in fh:
            parts = line.split()
            mount = parts[1]
            if str(path).startswith(mount) and len(mount) > len(best):
                best, kind = mount, parts[2]
    return kind


if __name__ == "__main__":
    sys.exit(main())
