"""Job working directories given back and used again (agent/workdirs.py): real bash
runbooks through JobRun, on the real file system; the hub is the one seam faked (every
report is acknowledged)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from outpost.agent import helper, runner, workdirs


def _run(tmp_path: Path, job_id: str, content: str, kind: str = "bash") -> runner.JobRun:
    payload = {"job_id": job_id, "attempt": 1, "type": kind, "content": content,
               "job_token": f"ojt_{job_id}.secret"}

    async def call(*_: Any) -> dict[str, Any]:
        return {"id": job_id, "status": "Completed"}

    return runner.JobRun(payload, tmp_path / "jobs", tmp_path / "spool", call,
                         "https://hub:8443", "CA")


def _go(run: runner.JobRun) -> list[str]:
    """Run the attempt to its end; its Output records."""
    asyncio.run(run.run())
    kept = _kept(run)
    return [line for line in kept.read_text().splitlines() if '"Output"' in line]


def _kept(run: runner.JobRun) -> Path:
    flat = run.spool.path.parent.parent / "joblogs" / f"{run.id}.1.jsonl"
    return flat if flat.exists() else run.spool.path.parent.parent / "joblogs" / run.id / "1.jsonl"


def _spares(tmp_path: Path) -> list[Path]:
    spare = tmp_path / "jobs" / workdirs.SPARE
    return sorted(spare.iterdir()) if spare.is_dir() else []


def test_a_directory_left_as_it_was_given_serves_the_next_job(tmp_path: Path) -> None:
    first = _run(tmp_path, "job-a", 'echo "a $(cat "$OUTPOST_HELPER_DIR/job.token")"\n')
    out = _go(first)
    assert "a ojt_job-a.secret" in out[0]
    assert not (tmp_path / "jobs" / "job-a").exists()
    [spare] = _spares(tmp_path)
    inode = os.stat(spare).st_ino
    # Nothing of the job stays: its runbook file and its token are emptied.
    assert (spare / "runbook.sh").read_bytes().strip(b"\0") == b""
    assert (spare / helper.DIR_NAME / helper.TOKEN_FILE).read_bytes().strip(b"\0") == b""
    assert os.stat(spare).st_mode & 0o777 == 0o700

    # The next job (another type, so another runbook file name) gets that directory, with
    # its own runbook, token and helper.json, and the documented helper layout.
    second = _run(tmp_path, "job-b", 'import os, pathlib\n'
                  'h = pathlib.Path(os.environ["OUTPOST_HELPER_DIR"])\n'
                  'print("b", (h / "job.token").read_text().strip(), sorted(os.listdir(".")),'
                  ' sorted(os.listdir(h)), (h / "helper.json").read_text())\n', kind="python")
    out = _go(second)
    assert "b ojt_job-b.secret" in out[0]
    assert "['.outpost', 'runbook.py']" in out[0]
    assert str(sorted(helper.FILES)) in out[0]
    assert '\\"job_id\\": \\"job-b\\"' in out[0]
    [spare] = _spares(tmp_path)
    assert os.stat(spare).st_ino == inode


def test_a_directory_the_job_changed_is_removed_not_used_again(tmp_path: Path) -> None:
    for job_id, content in (("made-a-file", "echo x > left-behind\n"),
                            ("opened-it-up", "chmod 755 .\n"),
                            ("swapped-the-token",
                             'ln -sf /etc/passwd "$OUTPOST_HELPER_DIR/job.token"\n'),
                            ("still-running", "sleep 30 >/dev/null 2>&1 &\n")):
        run = _run(tmp_path, job_id, content)
        _go(run)
        assert not (tmp_path / "jobs" / job_id).exists(), job_id
        assert _spares(tmp_path) == [], job_id
        if job_id == "still-running":
            os.killpg(run.proc.pid, 9)  # type: ignore[union-attr]
    assert "root:" in Path("/etc/passwd").read_text()  # nothing was emptied through a link


def test_spares_of_an_earlier_run_are_not_trusted(tmp_path: Path) -> None:
    left = tmp_path / "jobs" / workdirs.SPARE / "7"
    (left / helper.DIR_NAME).mkdir(parents=True, mode=0o700)
    (left / "runbook.sh").write_text("echo planted\n")
    out = _go(_run(tmp_path, "fresh", "echo mine\n"))
    assert "mine" in out[0]
    assert not left.exists()


def test_at_most_keep_spares(tmp_path: Path) -> None:
    pool = workdirs.Workdirs(tmp_path / "jobs", keep=2)
    pool._started = True  # (the spares below are this run's own)
    made = []
    for i in range(3):
        workdir = tmp_path / "jobs" / f"j{i}"
        (workdir / helper.DIR_NAME).mkdir(parents=True, mode=0o700)
        workdir.chmod(0o700)
        (workdir / "runbook.sh").write_text("true\n")
        made.append(pool.give_back(workdir, helper.DIR_NAME, helper.FILES, helper.TOKEN_FILE))
    assert made == [True, True, False]
    target = tmp_path / "jobs" / "next"
    assert pool.take(target) and pool.take(tmp_path / "jobs" / "other")
    assert not pool.take(tmp_path / "jobs" / "third")
    assert (target / "runbook.sh").read_bytes().strip(b"\0") == b""
