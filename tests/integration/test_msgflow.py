"""Flow control from the local message hub to a module, with real sockets and real module
processes (tests/msgmodule.py on ``ModuleClient``): the agent writes at most ``window``
messages ahead of what the module's code took, so a slow module's queue stays bounded and
its senders hear 507 once the input's bound is reached; what a killed module had not taken
is delivered again, in order, to its next connection.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest

from outpost.protocol import modwire
from tests.integration.test_msghub import MANIFEST, HubThread, Module
from tests.support import wait_until

CONSTRAINED = MANIFEST.replace("max_message_kb: 16", "max_message_kb: 16\n  constrained: true")


def test_a_slow_module_holds_at_most_its_window_and_its_senders_hear_507(
        tmp_path: Path) -> None:
    running = HubThread(tmp_path, CONSTRAINED)  # an input holds 100 messages; window 8
    try:
        filt = Module(running, "filter")
        assert filt.ask(op="slow", interval=1.0) == {"ok": True}  # one message a second
        sensor = Module(running, "sensor")
        assert sensor.proc.stdin is not None
        sensor.proc.stdin.write(json.dumps({"op": "flood", "output": "alarm", "count": 1000,
                                            "pad": 8192}) + "\n")
        sensor.proc.stdin.flush()
        acked, refusal = -1, None
        while refusal is None:
            line = sensor.line()
            acked = line.get("acked", acked)
            refusal = line.get("error")
        assert sensor.line() == {"done": True}
        # 100 wait in the agent, 8 in the module's queue, and the one or two it took.
        assert 108 <= acked + 1 <= 112, acked
        assert refusal.startswith("507 input hot of module filter is full (100 messages wait)")
        stats = filt.ask(op="stats")
        assert stats["window"] == 8
        assert stats["max_pending"] <= 8 and stats["pending"] <= 8
        conn = running.hub.connections["filter"]
        assert len(conn.outstanding) <= 8
        # As the module takes them, room comes back for the sender, and order is kept.
        taken = len(stats["taken"])
        wait_until(lambda: len(filt.ask(op="stats")["taken"]) > taken, 5,
                   what="the slow module to take one more")
        wait_until(lambda: sensor.ask(op="send", output="alarm", body="again") == {"ok": True},
                   5, interval=0.2, what="room in the input")
        stats = filt.ask(op="stats")
        assert stats["taken"] == [f"m{i}" for i in range(len(stats["taken"]))]
        assert stats["max_pending"] <= 8
        sensor.close()
        filt.close()
    finally:
        running.close()


def test_what_a_killed_module_had_not_taken_comes_again_in_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    running = HubThread(tmp_path)
    try:
        sensor = Module(running, "sensor")
        for i in range(20):
            assert sensor.ask(op="send", output="alarm", body=f"m{i}") == {"ok": True}
        monkeypatch.setenv("OUTPOST_TEST_WINDOW", "8")  # a hello may ask for less than 64
        first = Module(running, "filter")
        # The agent writes its window of 8, and no more; the module takes one (not told
        # yet: the client tells two at a time while more wait in its queue).
        assert first.ask(op="wait_pending", count=8) == {"pending": 8}
        assert first.ask(op="recv", timeout=5)["body"] == "m0"
        assert first.ask(op="wait_pending", count=8, timeout=0.3) == {"pending": 7}
        conn = running.hub.connections["filter"]
        assert [q.body.decode() for q in conn.outstanding] == [f"m{i}" for i in range(8)]
        assert len(running.hub.inboxes["filter"].heap) == 12
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        wait_until(lambda: "filter" not in running.hub.connections, 5,
                   what="the agent to see the connection close")
        inbox = running.hub.inboxes["filter"]
        assert len(inbox.heap) == 20 and inbox.count == {"hot": 20}
        assert running.hub.counters().delivered == 0  # nothing was told taken
        for i in range(20, 23):  # sent while no one reads: after those given back
            assert sensor.ask(op="send", output="alarm", body=f"m{i}") == {"ok": True}
        monkeypatch.delenv("OUTPOST_TEST_WINDOW")
        second = Module(running, "filter")
        got = [second.ask(op="recv", timeout=5).get("body") for _ in range(23)]
        assert got == [f"m{i}" for i in range(23)]  # m0 again: at-least-once
        assert second.ask(op="recv", timeout=0.3) == {"none": True}
        counters = wait_until(lambda: (c := running.hub.counters()).delivered == 23 and c, 5,
                              what="every message told taken")
        assert counters.received == 23 and counters.refused == 0
        assert not running.hub.connections["filter"].outstanding
        sensor.close()
        second.close()
    finally:
        running.close()


def test_a_took_for_more_than_was_written_is_a_bad_frame(tmp_path: Path) -> None:
    running = HubThread(tmp_path)
    running.pids[os.getpid()] = "filter"  # the test process speaks the wire by hand
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(running.path))
            sock.sendall(modwire.encode({"op": "hello", "module": "filter", "window": 2}))
            welcome, _ = modwire.read_frame(sock)
            assert welcome == {"op": "welcome", "module": "filter", "max_message_kb": 16,
                               "window": 2}
            sock.sendall(modwire.encode({"op": "took", "count": 1}))
            error, _ = modwire.read_frame(sock)
            assert error == {"op": "error", "status": 400, "reason": "a took counts some of "
                             "the 0 messages written and not yet taken, not 1"}
            with pytest.raises(EOFError):
                modwire.read_frame(sock)
    finally:
        running.close()


def test_the_asyncio_client_tells_what_its_loop_took_and_no_more(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    running = HubThread(tmp_path)
    try:
        sensor = Module(running, "sensor")
        for i in range(20):
            assert sensor.ask(op="send", output="alarm", body=f"m{i}") == {"ok": True}
        monkeypatch.setenv("OUTPOST_TEST_WINDOW", "4")
        consumer = Module(running, "filter", args=("aiotake",))
        assert consumer.first == {"ready": True}
        got: list[str] = []
        for step in (3, 7):
            answer = consumer.ask(take=step)
            assert max(answer["pending"]) <= 4  # never more than the window ahead
            got += answer["bodies"]
        assert got == [f"m{i}" for i in range(10)]
        # m9 is still in the loop's body (not asked for the next): told are m0 .. m8.
        wait_until(lambda: running.hub.counters().delivered == 9, 5, what="nine told")
        consumer.proc.send_signal(signal.SIGKILL)
        consumer.proc.wait(10)
        wait_until(lambda: "filter" not in running.hub.connections, 5)
        monkeypatch.delenv("OUTPOST_TEST_WINDOW")
        second = Module(running, "filter")
        got = [second.ask(op="recv", timeout=5).get("body") for _ in range(11)]
        assert got == [f"m{i}" for i in range(9, 20)]
        wait_until(lambda: running.hub.counters().delivered == 20, 5, what="all told")
        sensor.close()
        second.close()
    finally:
        running.close()


def test_a_callback_returning_counts_as_taken(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    running = HubThread(tmp_path)
    try:
        monkeypatch.setenv("OUTPOST_TEST_WINDOW", "4")
        filt = Module(running, "filter")
        assert filt.ask(op="callback") == {"ok": True}
        monkeypatch.delenv("OUTPOST_TEST_WINDOW")
        sensor = Module(running, "sensor")
        for i in range(30):
            assert sensor.ask(op="send", output="alarm", body=f"m{i}") == {"ok": True}
        wait_until(lambda: running.hub.counters().delivered == 30, 5, what="all 30 told")
        assert filt.ask(op="stats")["taken"] == [f"m{i}" for i in range(30)]
        sensor.close()
        filt.close()
    finally:
        running.close()


def test_what_a_module_holds_when_the_agent_restarts_comes_again_from_disk(
        tmp_path: Path) -> None:
    first = HubThread(tmp_path)
    filt = Module(first, "filter")
    first.modules.remove(filt)  # it outlives the first agent
    try:
        sensor = Module(first, "sensor")
        for i in range(5):
            assert sensor.ask(op="send", output="alarm", body=f"m{i}") == {"ok": True}
        assert filt.ask(op="wait_pending", count=5) == {"pending": 5}
    finally:
        first.close()
    second = HubThread(tmp_path)
    second.pids.update(first.pids)
    second.modules.append(filt)
    try:
        wait_until(lambda: "filter" in second.hub.connections, 10, what="the reconnection")
        # The new agent read the untaken messages back from the inbox's store and writes
        # them again; the client, connected again, drops the copies it held of the old
        # connection: each comes once, in order, none lost.
        got = [filt.ask(op="recv", timeout=5).get("body") for _ in range(5)]
        assert got == [f"m{i}" for i in range(5)]
        assert filt.ask(op="recv", timeout=0.3) == {"none": True}
        wait_until(lambda: second.hub.counters().delivered == 5, 10, what="the takes")
        assert not second.hub.connections["filter"].outstanding
        assert second.hub.inboxes["filter"].store.live == 0
    finally:
        second.close()
