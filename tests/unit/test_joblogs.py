"""A job's log kept on the machine (joblogs.py): one flat file per attempt, the agent's own
lines about the job inside the job's files (never uploaded), no inode made for a log line,
an older agent's directories still read and pruned."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from outpost.agent import joblogs, runner
from outpost.agent.runner import Spool, end_leftover

META = {"job_id": "job", "attempt": 1, "pgid": 4242, "started_at": 1234.5}
END = {"exit_code": 0, "signal": None, "cause": "exit", "reason": "exit code 0"}


def _line(seq: int, text: str = "x", at: float = 1.0) -> bytes:
    return json.dumps({"seq": seq, "stream": "Output", "text": text, "at": at}).encode() + b"\n"


def _old_end(outcome: dict[str, Any]) -> bytes:
    return json.dumps({"end": outcome}).encode() + b"\n"  # an older agent's: no "at"


@pytest.fixture
def log(tmp_path: Path) -> Iterator[logging.Logger]:
    """A logger with the daemon's job handler over the state directory ``tmp_path``."""
    logger = logging.getLogger(f"outpost.test.joblogs.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = joblogs.JobLineHandler(tmp_path)
    logger.addHandler(handler)
    yield logger
    logger.removeHandler(handler)


def _texts(lines: list[bytes]) -> list[str]:
    return [json.loads(line)["text"] for line in lines]


def _inodes(root: Path) -> set[Path]:
    return {path for path in root.rglob("*")}


def _deliver(spool: Spool) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def call(method: str, path: str, payload: bytes) -> dict[str, Any]:
        sent.append(json.loads(payload))
        return {}

    asyncio.run(runner.Uploader(spool, "job", 1, call).run(announce=False))
    return sent


def test_agent_lines_go_to_the_running_spool_and_are_never_uploaded(
        tmp_path: Path, log: logging.Logger) -> None:
    def tick() -> float:
        time.sleep(0.003)  # the agent's lines are timed to the millisecond
        return time.time()

    spool = Spool.create(tmp_path / "spool", "job", 1)
    log.info("job %s: running greet version 1 (attempt 1)", "job")  # before the meta line
    spool.write_meta(META)
    spool.append([_line(0, "one", at=tick())])
    tick()
    log.warning("job %s: report not delivered (hub away); again in 1.0 s", "job")
    spool.append([_line(1, "two", at=tick()), _line(2, "three", at=tick())])
    tick()
    log.info("job %s: stop requested", "job")
    tick()
    before_end = _inodes(tmp_path)
    spool.end(END)
    raw = spool.path.read_bytes().splitlines()
    assert [next(iter(json.loads(line))) for line in raw] == [
        "agent", "meta", "seq", "agent", "seq", "seq", "agent", "end"]
    assert raw[-1].startswith(b'{"end"') and json.loads(raw[-1])["end"] == END

    assert Spool(spool.path).meta() == META  # found past the agent's line
    lines, end, _ = Spool(spool.path).read(0)
    assert _texts(lines) == ["one", "two", "three"] and end == END
    # From any offset: after the first record, the agent's lines are skipped all the same.
    second = sum(len(line) + 1 for line in raw[:3])
    lines, end, _ = Spool(spool.path).read(second)
    assert _texts(lines) == ["two", "three"] and end == END
    for start in range(len(spool.path.read_bytes())):  # and a batch starting anywhere
        lines, _, _ = Spool(spool.path).read(start)
        assert not any(line.startswith((b'{"agent"', b'{"meta"')) for line in lines)

    sent = _deliver(Spool(spool.path))
    assert len(sent) == 1 and sent[0]["end"] == END
    assert [r["text"] for r in sent[0]["records"]] == ["one", "two", "three"]
    assert all(set(r) == {"seq", "stream", "text", "at"} for r in sent[0]["records"])

    kept = tmp_path / "joblogs" / "job.1.jsonl"
    assert kept.is_file() and not (tmp_path / "spool" / "job.1.jsonl").exists()
    # No inode for the job's log but the spool itself (and joblogs/, once for every job).
    assert _inodes(tmp_path) - before_end == {tmp_path / "joblogs", kept}
    assert [p for p in (tmp_path / "joblogs").iterdir() if p.is_dir()] == []
    shown = joblogs.records(tmp_path, "job") or []
    assert [(r.get("stream") or r["level"], r["message"]) for r in shown] == [
        ("INFO", "job job: running greet version 1 (attempt 1)"),
        ("Output", "one"),
        ("WARNING", "job job: report not delivered (hub away); again in 1.0 s"),
        ("Output", "two"), ("Output", "three"),
        ("INFO", "job job: stop requested"),
        ("End", "attempt ended (exit): exit code 0")]
    agent = [r for r in shown if "stream" not in r]
    assert all(r["job"] == "job" and r["logger"] == log.name and r["ts"] for r in agent)


def test_a_batch_of_agent_lines_only_does_not_hold_the_uploader(tmp_path: Path,
                                                                log: logging.Logger) -> None:
    spool = Spool.create(tmp_path / "spool", "job", 1)
    spool.write_meta(META)
    for i in range(4000):  # more than a batch (BATCH_BYTES) of the agent's lines alone
        log.warning("job %s: report not delivered (%s); again in 10 s", "job", "x" * 80 + str(i))
    spool.append([_line(0, "after")])
    spool.end(END)
    sent = _deliver(Spool(spool.path))
    assert [r["text"] for batch in sent for r in batch["records"]] == ["after"]
    assert sent[-1]["end"] == END


def test_lines_after_the_end_wait_in_memory_then_go_to_the_kept_file(
        tmp_path: Path, log: logging.Logger) -> None:
    spool = Spool.create(tmp_path / "spool", "job", 1)
    spool.write_meta(META)
    spool.append([_line(0, "one", at=100.0)])
    spool.end(END)
    ended = spool.path.read_bytes()
    ended_at = json.loads(ended.splitlines()[-1])["at"]
    log.warning("job %s: report not delivered (hub away); again in 1.0 s", "job")
    assert spool.path.read_bytes() == ended  # the end stays the last line
    assert not (tmp_path / "joblogs").exists()  # and no file is made for the line
    end_leftover(Spool(spool.path))
    assert spool.path.read_bytes() == ended

    os.utime(spool.path, (ended_at + 500, ended_at + 500))  # delivered much later
    Spool(spool.path).remove()
    kept = tmp_path / "joblogs" / "job.1.jsonl"
    content = kept.read_bytes()
    assert content.startswith(ended)  # the line held since the end follows it
    assert b"report not delivered" in content[len(ended):]
    log.info("job %s: a line after delivery", "job")
    last = json.loads(kept.read_bytes().splitlines()[-1])
    assert last["agent"]["message"] == "job job: a line after delivery"

    shown = joblogs.records(tmp_path, "job") or []
    end = next(r for r in shown if r.get("stream") == "End")
    assert end["ts"] == ended_at  # the end line's time, not the file's
    messages = [r["message"] for r in shown]
    assert "job job: report not delivered (hub away); again in 1.0 s" in messages
    assert "job job: a line after delivery" in messages


def test_a_line_about_a_job_with_no_file_makes_none(tmp_path: Path,
                                                    log: logging.Logger) -> None:
    for i in range(joblogs.PENDING_LINES + 10):
        log.info("job %s: line %d", "later", i)
    log.info("job %s: about a job never run here", "never")
    assert list(tmp_path.iterdir()) == []
    assert joblogs.records(tmp_path, "never") is None

    spool = Spool.create(tmp_path / "spool", "later", 1)  # its lines are written now
    spool.write_meta({"job_id": "later", "attempt": 1, "pgid": 1, "started_at": 1.0})
    spool.end(END)
    lines = spool.path.read_bytes().splitlines()
    held = [json.loads(line)["agent"]["message"] for line in lines[:-2]]
    assert held == [f"job later: line {i}" for i in range(10, joblogs.PENDING_LINES + 10)]
    assert Spool(spool.path).meta()["pgid"] == 1  # past the lines before it
    assert Spool(spool.path).read(0) == ([], END, len(spool.path.read_bytes()))


def test_the_end_is_found_past_agent_lines_and_a_torn_line_is_cut(tmp_path: Path) -> None:
    agent = b'{"agent": {"time": "2026-01-01T00:00:00.000Z", "level": "INFO", ' \
            b'"logger": "t", "message": "job job: x", "job": "job"}}\n'
    path = tmp_path / "job.1.jsonl"
    # An end followed by nothing is the end (with the agent's lines before it).
    path.write_bytes(agent + json.dumps({"meta": META}).encode() + b"\n" + agent
                     + _line(0) + agent + _old_end(END))
    assert Spool(path).read(0) == ([_line(0).rstrip(b"\n")], END, path.stat().st_size)
    before = path.read_bytes()
    end_leftover(Spool(path))
    assert path.read_bytes() == before
    # An agent line after the end (the agent never writes one) does not hide the end.
    path.write_bytes(before + agent)
    assert Spool(path).read(0)[1] == END
    end_leftover(Spool(path))
    assert path.read_bytes() == before + agent

    # A torn agent line (the agent killed inside that write) is cut, the attempt ended.
    path.write_bytes(json.dumps({"meta": META}).encode() + b"\n" + _line(0) + agent[:30])
    end_leftover(Spool(path))
    lines, end, _ = Spool(path).read(0)
    assert _texts(lines) == ["x"] and end is not None and end["cause"] == "lost"
    assert b'{"agent"' not in path.read_bytes()

    # In a kept file, a torn line in the middle is skipped, the rest is shown.
    kept = tmp_path / "joblogs" / "job.2.jsonl"
    kept.parent.mkdir()
    kept.write_bytes(agent[:40] + b"\n" + agent + _line(0, "shown") + _old_end(END))
    shown = joblogs.records(tmp_path, "job") or []
    assert [r["message"] for r in shown] == ["shown", "job job: x",
                                             "attempt ended (exit): exit code 0"]


def _write(path: Path, content: bytes, mtime: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    os.utime(path, (mtime, mtime))


def test_the_flat_layout_is_listed_and_pruned_per_job(tmp_path: Path) -> None:
    now = 1_000_000.0
    kept = tmp_path / "joblogs"
    _write(kept / "a.1.jsonl", _line(0, "a1") + _old_end(END), now - 100)
    _write(kept / "a.3.jsonl", _line(0, "a3") + _old_end(END), now - 50)
    _write(kept / "a.b.1.jsonl", _line(0, "ab1") + _old_end(END), now - 10)  # job "a.b"
    _write(kept / "old.1.jsonl", _line(0, "old") + _old_end(END), now - 1000)
    _write(kept / "busy.1.jsonl", _line(0, "busy") + _old_end(END), now - 1000)
    _write(tmp_path / "spool" / "busy.2.jsonl", _line(0, "running"), now - 5)
    _write(tmp_path / "spool" / "waiting.1.jsonl", _line(0, "w") + _old_end(END), now - 1000)
    _write(kept / "notes.txt", b"not a job log", now - 1000)

    rows = joblogs.index(tmp_path, 200.0)
    assert [(r["job"], r["attempts"]) for r in rows] == [
        ("busy", [1]), ("a.b", [1]), ("a", [1, 3]), ("old", [1]), ("waiting", [])]
    by_job = {r["job"]: r for r in rows}
    assert by_job["a"]["bytes"] == (kept / "a.1.jsonl").stat().st_size \
        + (kept / "a.3.jsonl").stat().st_size
    assert by_job["busy"]["updated_ts"] == now - 5  # its running spool changed last
    assert by_job["a"]["expires_at"] == joblogs.logs.iso(now - 50 + 200)
    assert [r["message"] for r in joblogs.records(tmp_path, "a") or []
            if r.get("stream") == "Output"] == ["a1", "a3"]  # not a.b's

    assert joblogs.prune(tmp_path, 200.0, now) == ["old"]  # a spool is never pruned
    assert sorted(p.name for p in kept.iterdir()) == [
        "a.1.jsonl", "a.3.jsonl", "a.b.1.jsonl", "busy.1.jsonl", "notes.txt"]
    assert (tmp_path / "spool" / "waiting.1.jsonl").exists()
    assert joblogs.prune(tmp_path, 200.0, now + 160) == ["a"]  # all of a job's files at once
    assert sorted(p.name for p in kept.iterdir()) == ["a.b.1.jsonl", "busy.1.jsonl",
                                                      "notes.txt"]
    assert joblogs.records(tmp_path, "a") is None


def test_an_older_agents_directories_are_still_read_listed_and_pruned(tmp_path: Path) -> None:
    now = 1_000_000.0
    folder = tmp_path / "joblogs" / "legacy"
    agent_line = json.dumps({"time": "1970-01-12T13:00:00.000Z", "level": "INFO",
                             "logger": "outpost.agent", "job": "legacy",
                             "message": "job legacy: running greet version 1 (attempt 1)"})
    _write(folder / "agent.jsonl", agent_line.encode() + b"\n", now - 1000)
    _write(folder / "1.jsonl", json.dumps({"meta": META}).encode() + b"\n"
           + _line(0, "from the old layout", at=now - 1100) + _old_end(END), now - 1000)
    # The same job run again by this agent: its attempt 2 is a flat file.
    _write(tmp_path / "joblogs" / "legacy.2.jsonl",
           _line(0, "from the flat layout", at=now - 900) + _old_end(END), now - 900)
    _write(tmp_path / "joblogs" / "gone" / "1.jsonl", _line(0) + _old_end(END), now - 5000)

    shown = joblogs.records(tmp_path, "legacy") or []
    assert [(r.get("stream"), r.get("attempt"), r["message"]) for r in shown] == [
        (None, None, "job legacy: running greet version 1 (attempt 1)"),
        ("Output", 1, "from the old layout"),
        ("End", 1, "attempt ended (exit): exit code 0"),
        ("Output", 2, "from the flat layout"),
        ("End", 2, "attempt ended (exit): exit code 0")]
    assert shown[2]["ts"] == now - 1000  # an older agent's end: the file's time
    rows = joblogs.index(tmp_path, 950.0)
    assert [(r["job"], r["attempts"], r["updated_ts"]) for r in rows] == [
        ("legacy", [1, 2], now - 900), ("gone", [1], now - 5000)]

    assert joblogs.prune(tmp_path, 950.0, now) == ["gone"]
    assert not (tmp_path / "joblogs" / "gone").exists() and folder.is_dir()
    assert joblogs.prune(tmp_path, 950.0, now + 100) == ["legacy"]
    assert list((tmp_path / "joblogs").iterdir()) == []
    assert joblogs.records(tmp_path, "legacy") is None


@pytest.mark.parametrize("name, parsed", [
    ("job.3.jsonl", ("job", 3)), ("a.b-c.12.jsonl", ("a.b-c", 12)),
    ("x.jsonl.1.jsonl", ("x.jsonl", 1)), ("job.jsonl", None), ("job.x.jsonl", None),
    ("job.\u00b2.jsonl", None), ("..1.jsonl", None), (".hidden.1.jsonl", None),
    ("a..b.1.jsonl", None), ("job.1.json", None), ("job.1.corrupt", None)])
def test_file_names_parse_on_the_last_dot(name: str, parsed: tuple[str, int] | None) -> None:
    assert joblogs.parse_name(name) == parsed


def test_a_job_id_cannot_make_a_path_escape(tmp_path: Path, log: logging.Logger) -> None:
    state = tmp_path / "state"
    (state / "spool").mkdir(parents=True)
    for job_id in ("../evil", "..", "a/../../b", ".hidden"):
        assert joblogs.records(state, job_id) is None
    escaped = state / "spool" / "...1.jsonl"  # a name no safe id makes
    escaped.write_bytes(_line(0))
    joblogs.keep(escaped)
    assert not (state / "joblogs").exists() and not (tmp_path / "joblogs").exists()
    log.info("job %s: hello", "../../evil")  # not a job id the log tags: nothing written
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["...1.jsonl", "spool", "state"]


def test_the_meta_is_found_past_a_long_agent_line(tmp_path: Path, log: logging.Logger) -> None:
    spool = Spool.create(tmp_path / "spool", "job", 1)
    log.error("job %s: %s", "job", "x" * (runner.META_MAX * 2))  # longer than META_MAX
    log.info("job %s: running", "job")
    spool.write_meta(META)
    spool.append([_line(0)])
    spool.close()  # the agent is gone
    assert Spool(spool.path).meta() == META
    lines, end, _ = Spool(spool.path).read(0)
    assert _texts(lines) == ["x"] and end is None
