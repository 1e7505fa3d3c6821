"""The agent's on-disk spool: batches, the end line, and a torn write after a crash."""

from __future__ import annotations

import json
from pathlib import Path

from outpost.agent import runner
from outpost.agent.runner import Spool, end_leftover, leftover_spools


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
