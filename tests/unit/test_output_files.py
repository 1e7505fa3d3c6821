"""A runbook's stdout and stderr go to files the agent tails (agent/process.py): where they
end, what the spool says of them, and what an agent started again reads on from."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from outpost.agent import process, runner
from outpost.agent.runner import Lines, Spool

pytestmark = pytest.mark.skipif(not process.available(), reason="needs pidfds (Linux 5.3+)")


async def _nothing(*_: Any) -> dict[str, Any]:
    return {}


def run_job(tmp_path: Path, script: str, **job: Any) -> tuple[dict[str, Any], list[dict[str, Any]],
                                                               float]:
    """Run one attempt to its end; (its outcome, its records, seconds taken)."""
    spec = {"job_id": "job", "attempt": 1, "type": "bash", "content": script, **job}
    run = runner.JobRun(spec, tmp_path / "jobs", tmp_path / "spool", _nothing)
    began = time.monotonic()
    outcome = asyncio.run(run._execute())
    took = time.monotonic() - began
    run._commit()
    run.spool.end(outcome)
    run._give_back_output()
    run._cleanup()
    lines = run.spool.path.read_bytes().splitlines()
    records = [json.loads(line) for line in lines if line.startswith(b'{"seq"')]
    return outcome, records, took


def test_a_background_child_that_keeps_stdout_is_waited_for(tmp_path: Path) -> None:
    """As with a pipe: the output ends when nothing holds it open any more."""
    outcome, records, _ = run_job(tmp_path, "(sleep 0.5; echo late) &\necho early\n")
    assert outcome["reason"] == "exit code 0"
    assert [r["text"] for r in records] == ["early", "late"]


def test_a_daemon_that_let_go_of_stdout_does_not_hold_the_job(tmp_path: Path) -> None:
    outcome, records, took = run_job(
        tmp_path, 'nohup sleep 30 >/dev/null 2>&1 &\necho "$!" > pid\necho started\n')
    assert [r["text"] for r in records] == ["started"] and outcome["reason"] == "exit code 0"
    assert took < 5


def test_streams_lines_and_progress_lines_in_the_spool(tmp_path: Path) -> None:
    outcome, records, _ = run_job(
        tmp_path, 'echo one\necho "two" >&2\nprintf "VERBOSE: v\\nno newline"\n',
        log_verbose=True)
    assert sorted((r["stream"], r["text"]) for r in records) == [
        ("Error", "two"), ("Output", "no newline"), ("Output", "one"), ("Verbose", "v")]
    assert sorted(r["seq"] for r in records) == [0, 1, 2, 3]
    spool = (tmp_path / "spool" / "job.1.jsonl").read_bytes()
    last = [json.loads(line) for line in spool.splitlines() if line.startswith(b'{"raw"')][-1]
    assert last == {"raw": [len(b"one\nVERBOSE: v\nno newline"), len(b"two\n")], "seq": 4}
    # The pair is emptied and kept for the next runbook.
    assert sorted((p.name, p.stat().st_size) for p in (tmp_path / "spool").glob("output-*")) \
        == [("output-0.err", 0), ("output-0.out", 0)]


def test_lines_count_what_they_gave_out() -> None:
    cut = Lines(10)
    assert cut.feed(b"ab\ncd") == [(b"ab", False)] and cut.consumed == 13
    assert cut.feed(b"e\n\n") == [(b"cde", False), (b"", False)] and cut.consumed == 18
    assert cut.feed(b"tail") == [] and cut.flush() == [(b"tail", False)] and cut.consumed == 22
    long = Lines()
    # A piece of a longer line is marked as continued; the line's last piece is not.
    assert long.feed(b"x" * (runner.LINE_MAX + 5)) == [(b"x" * runner.LINE_MAX, True)]
    assert long.consumed == runner.LINE_MAX and long.rest == b"xxxxx"
    assert long.feed(b"\n") == [(b"xxxxx", False)]
    exact = Lines()
    assert exact.feed(b"y" * runner.LINE_MAX) == [(b"y" * runner.LINE_MAX, True)]
    assert exact.feed(b"\n") == [(b"", False)]


def test_the_pieces_of_a_long_line_keep_its_stream_and_say_they_continue() -> None:
    cut = Lines()
    line = b"warning: " + b"w" * runner.LINE_MAX + b"\n"
    records, seq = runner.line_records(cut.feed(line), False, 0, False, False, 1.0, cut)
    pieces = [json.loads(r) for r in records]
    assert seq == 2
    assert [(p["stream"], p.get("continues", False)) for p in pieces] == [
        ("Warning", True), ("Warning", False)]
    assert "".join(p["text"] for p in pieces) == "w" * runner.LINE_MAX
    # Not cut inside a character: the pieces joined are the line.
    cut = Lines()
    line = ("é" * runner.LINE_MAX).encode() + b"\n"
    records, _ = runner.line_records(cut.feed(line), False, 0, False, False, 1.0, cut)
    assert "".join(json.loads(r)["text"] for r in records) == "é" * runner.LINE_MAX
    assert all(len(json.loads(r)["text"].encode()) <= runner.LINE_MAX for r in records)


def test_a_restarted_agent_reads_on_from_the_last_progress_line(tmp_path: Path) -> None:
    """What the dead agent spooled stays as it is; what the runbook wrote after it is added
    once, numbered on, then the end."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    spool = Spool(spool_dir / "job.2.jsonl")
    base = 1 << 32
    spool.write_meta({"job_id": "job", "attempt": 2, "pgid": 0, "started_at": 0, "output": 5})
    out, err = process.outputs(spool_dir).paths(5)
    out.write_bytes(b"a\nb\nc\nd")  # a and b were spooled; c and the unfinished d were not
    err.write_bytes(b"e1\ne2\n")  # e1 was spooled
    spooled = [json.dumps({"seq": base + i, "stream": s, "text": t, "at": 1.0}).encode()
               + b"\n" for i, (s, t) in enumerate([("Output", "a"), ("Error", "e1"),
                                                   ("Output", "b")])]
    spool.append([*spooled, b'{"raw":[4,3],"seq":%d}\n' % (base + 3)])
    spool.close()

    runner.end_leftover(spool)

    lines, end, _ = Spool(spool.path).read(0)
    got = [json.loads(line) for line in lines]
    assert [(r["seq"] - base, r["stream"], r["text"]) for r in got] == [
        (0, "Output", "a"), (1, "Error", "e1"), (2, "Output", "b"), (3, "Output", "c"),
        (4, "Output", "d"), (5, "Error", "e2")]
    assert end is not None and end["cause"] == "lost"
    process.outputs(spool_dir).take()  # the next runbook's pair: the leftovers are gone
    assert not out.exists() and not err.exists()


def test_a_restarted_agent_ends_the_runbook_first_and_reads_all_it_wrote(
        tmp_path: Path) -> None:
    """The runbook outlived its agent and still prints: it is ended, then read to its end."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    spool = Spool(spool_dir / "job.1.jsonl")
    out, err = process.outputs(spool_dir).paths(0)
    started = process.spawn(["bash", "-c", 'i=0; while :; do i=$((i+1)); echo "n $i"; '
                             '[ $((i % 1000)) -eq 0 ] && sleep 0.01; done'],
                            tmp_path, {"PATH": runner.SAFE_PATH}, None, out, err)
    os.close(started.stdout)
    os.close(started.stderr)
    spool.write_meta({"job_id": "job", "attempt": 1, "pgid": started.popen.pid,
                      "started_at": time.time(), "output": 0})
    spool.close()
    time.sleep(0.2)

    runner.end_leftover(spool)
    assert started.popen.wait(5) == -signal.SIGKILL
    lines = spool.path.read_bytes().splitlines()
    assert json.loads(lines[-1])["end"]["cause"] == "lost"
    texts = [json.loads(line)["text"] for line in lines if line.startswith(b'{"seq"')]
    assert len(texts) > 10
    # Every line it wrote, in order, from the first; the kill may have cut the last one.
    assert texts[:-1] == [f"n {i}" for i in range(1, len(texts))]
    assert f"n {len(texts)}".startswith(texts[-1])


def test_a_fork_refused_for_a_moment_is_tried_again(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """EAGAIN from the fork (the slot's process limit still counting the job before it) is
    tried again; another error, or EAGAIN that lasts, loses the attempt as before."""
    import errno

    from outpost.agent import process

    real = process.spawn
    refusals = {"left": 2}

    def spawn(*args: Any, **kw: Any) -> Any:
        if refusals["left"]:
            refusals["left"] -= 1
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        return real(*args, **kw)

    monkeypatch.setattr(process, "spawn", spawn)
    outcome, records, _ = run_job(tmp_path / "a", "echo started\n")
    assert outcome["exit_code"] == 0 and refusals["left"] == 0
    assert [r["text"] for r in records] == ["started"]

    refusals["left"] = 99
    outcome, _, took = run_job(tmp_path / "b", "echo never\n")
    assert outcome["cause"] == "lost" and "Resource temporarily unavailable" in outcome["reason"]
    assert 1.4 < took < 10 and refusals["left"] == 99 - runner.SPAWN_TRIES
