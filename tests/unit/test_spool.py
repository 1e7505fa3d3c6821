"""The agent's on-disk spool: batches, the end line, and a torn write after a crash."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest

from outpost.agent import joblogs, runner
from outpost.agent.runner import Spool, end_leftover, leftover_spools
from outpost.protocol.errors import OutpostError


def _line(seq: int, text: str = "x") -> bytes:
    return json.dumps({"seq": seq, "stream": "Output", "text": text, "at": 1.0}).encode() + b"\n"


def test_reads_come_in_batches_of_whole_lines_and_stop_at_the_end(tmp_path: Path) -> None:
    spool = Spool.create(tmp_path, "job", 1)
    spool.append([_line(i, "y" * 100) for i in range(5000)])
    spool.end({"exit_code": 0, "signal": None, "cause": "exit", "reason": "exit code 0"})
    offset, seqs, end = 0, [], None
    while end is None:
        lines, end, offset = spool.read(offset)
        assert len(b",".join(lines)) <= runner.BATCH_BYTES + 200
        seqs += [json.loads(line)["seq"] for line in lines]
    assert seqs == list(range(5000))
    assert end == {"exit_code": 0, "signal": None, "cause": "exit", "reason": "exit code 0"}


def test_a_half_written_record_is_cut_and_the_attempt_ended_as_lost(tmp_path: Path) -> None:
    spool = Spool.create(tmp_path, "job", 2)
    spool.append([_line(0), _line(1), b'{"seq": 2, "str'])  # the agent died mid-write
    spool.close()
    (found,) = leftover_spools(tmp_path)
    end_leftover(found)
    lines, end, _ = found.read(0)
    assert [json.loads(line)["seq"] for line in lines] == [0, 1]
    assert end is not None and end["cause"] == "lost"


def test_an_ended_attempt_is_left_as_it_is(tmp_path: Path) -> None:
    spool = Spool.create(tmp_path, "job", 1)
    spool.append([_line(0)])
    spool.end({"exit_code": 3, "signal": None, "cause": "exit", "reason": "exit code 3"})
    before = spool.path.read_bytes()
    end_leftover(Spool(spool.path))
    assert spool.path.read_bytes() == before


def test_a_process_that_took_the_pid_since_is_not_killed(tmp_path: Path) -> None:
    import os

    spool = Spool.create(tmp_path, "job", 1)
    spool.write_meta({"job_id": "job", "attempt": 1, "pgid": os.getpid(), "started_at": 1.0})
    spool.close()
    end_leftover(Spool(spool.path))  # this test's own pid, started long after 1970
    _, end, _ = Spool(spool.path).read(0)
    assert end is not None and end["cause"] == "lost"


# --- the meta line -------------------------------------------------------------------------

META = {"job_id": "job", "attempt": 3, "pgid": 4242, "started_at": 1234.5}
END = {"exit_code": 0, "signal": None, "cause": "exit", "reason": "exit code 0"}


def test_the_meta_is_the_first_line_and_no_file_beside_it(tmp_path: Path) -> None:
    spool = Spool.create(tmp_path, "job", 3)
    spool.write_meta(META)
    spool.append([_line(0), _line(1)])
    spool.close()
    assert [p.name for p in tmp_path.iterdir()] == ["job.3.jsonl"]
    first = spool.path.read_bytes().split(b"\n")[0]
    assert json.loads(first) == {"meta": META}
    assert Spool(spool.path).meta() == META
    lines, end, offset = Spool(spool.path).read(0)
    assert [json.loads(line)["seq"] for line in lines] == [0, 1] and end is None
    assert Spool(spool.path).read(offset) == ([], None, offset)


def test_without_a_meta_line_the_name_still_gives_job_and_attempt(tmp_path: Path) -> None:
    spool = Spool.create(tmp_path, "a.b-c", 2)  # a spawn that failed: records, no meta
    spool.append([_line(0, "interpreter missing")])
    spool.end(END)
    assert Spool(spool.path).meta() == {"job_id": "a.b-c", "attempt": 2}
    lines, end, _ = Spool(spool.path).read(0)
    assert len(lines) == 1 and end == END


def test_a_torn_meta_line_reads_as_no_meta_and_the_spool_is_delivered(tmp_path: Path) -> None:
    spool = Spool.create(tmp_path, "job", 1)
    spool.append([json.dumps({"meta": META}).encode()[:25]])  # the agent died mid-write
    spool.close()
    (found,) = leftover_spools(tmp_path)
    assert found.meta() == {"job_id": "job", "attempt": 1}
    end_leftover(found)
    lines, end, _ = found.read(0)
    assert lines == [] and end is not None and end["cause"] == "lost"


def test_an_unparsable_meta_line_is_neither_meta_nor_a_record(tmp_path: Path) -> None:
    path = tmp_path / "job.1.jsonl"
    path.write_bytes(b'{"meta": {"job_id": "jo\n' + _line(0))
    assert Spool(path).meta() == {"job_id": "job", "attempt": 1}
    lines, _, _ = Spool(path).read(0)
    assert [json.loads(line)["seq"] for line in lines] == [0]


def test_an_older_agents_meta_file_is_still_read_and_removed(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    path = spool_dir / "job.3.jsonl"
    path.write_bytes(_line(0) + _line(1))  # the format before the meta line
    (spool_dir / "job.3.json").write_text(json.dumps(META))
    (found,) = leftover_spools(spool_dir)
    assert found.meta() == META
    end_leftover(found)  # pgid 4242 started at 1234.5: surely not the process it was
    lines, end, _ = found.read(0)
    assert [json.loads(line)["seq"] for line in lines] == [0, 1]
    assert end is not None and end["cause"] == "lost"
    found.remove()
    assert list(spool_dir.iterdir()) == []
    assert (tmp_path / "joblogs" / "job.3.jsonl").exists()


def test_end_leftover_kills_the_group_named_by_the_meta_line(tmp_path: Path) -> None:
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        spool = Spool.create(tmp_path, "job", 1)
        spool.write_meta({"job_id": "job", "attempt": 1, "pgid": proc.pid,
                          "started_at": psutil.Process(proc.pid).create_time()})
        spool.append([_line(0)])
        spool.close()  # the agent is gone; the runbook is not
        end_leftover(Spool(spool.path))
        assert proc.wait(timeout=10) == -9
        lines, end, _ = Spool(spool.path).read(0)
        assert len(lines) == 1 and end is not None and end["cause"] == "lost"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_meta_line_is_never_uploaded_nor_shown_as_output(tmp_path: Path) -> None:
    spool = Spool.create(tmp_path / "spool", "job", 1)
    spool.write_meta({"job_id": "job", "attempt": 1, "pgid": 1, "started_at": 1.0})
    spool.append([_line(0, "hello")])
    spool.end(END)
    sent: list[Any] = []

    async def call(method: str, path: str, payload: bytes) -> dict[str, Any]:
        sent.append(json.loads(payload))
        return {}

    asyncio.run(runner.Uploader(spool, "job", 1, call).run(announce=False))
    assert len(sent) == 1 and sent[0]["end"] == END
    assert [r["text"] for r in sent[0]["records"]] == ["hello"]
    kept = tmp_path / "joblogs" / "job.1.jsonl"
    assert kept.read_bytes().startswith(b'{"meta"')  # the spool, moved as it is
    shown = joblogs.records(tmp_path, "job") or []
    assert [(r["stream"], r["message"]) for r in shown] == [
        ("Output", "hello"), ("End", "attempt ended (exit): exit code 0")]


def test_a_job_writes_its_meta_before_its_records(tmp_path: Path) -> None:
    async def call(*_: Any) -> dict[str, Any]:
        return {}

    job = {"job_id": "job", "attempt": 2, "type": "bash", "content": "echo one\necho two >&2\n"}
    run = runner.JobRun(job, tmp_path / "jobs", tmp_path / "spool", call)
    outcome = asyncio.run(run._execute())
    run._commit()
    run.spool.end(outcome)
    lines = run.spool.path.read_bytes().splitlines()
    meta = json.loads(lines[0])["meta"]
    assert meta["job_id"] == "job" and meta["attempt"] == 2 and meta["pgid"] == run.proc.pid
    assert sorted(json.loads(line)["text"] for line in lines[1:-1]
                  if not line.startswith(b'{"raw"')) == ["one", "two"]
    assert Spool(run.spool.path).meta() == meta
    run._cleanup()
    assert not (tmp_path / "spool" / "job.2.json").exists()


def test_a_job_that_cannot_start_has_no_meta_line(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(kind: str, script: str) -> list[str]:
        raise OutpostError("interpreter_missing", "pwsh is not installed", interpreter=kind)

    async def call(*_: Any) -> dict[str, Any]:
        return {}

    monkeypatch.setattr(runner, "command", missing)
    job = {"job_id": "job", "attempt": 1, "type": "pwsh", "content": "Write-Output 1\n"}
    run = runner.JobRun(job, tmp_path / "jobs", tmp_path / "spool", call)
    outcome = asyncio.run(run._execute())
    run._commit()
    run.spool.end(outcome)
    first = run.spool.path.read_bytes().split(b"\n")[0]
    assert json.loads(first)["text"] == "pwsh is not installed"
    assert Spool(run.spool.path).meta() == {"job_id": "job", "attempt": 1}
    lines, end, _ = Spool(run.spool.path).read(0)
    assert len(lines) == 1 and end is not None
