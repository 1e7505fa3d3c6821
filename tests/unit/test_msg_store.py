"""The upstream store alone (agent/modules/upstream.py) and the modules' frames
(protocol/modwire.py): records torn by a kill, seqs across restarts, expiry, the bound."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from outpost.agent.modules import upstream
from outpost.protocol import modwire


def _message(text: str) -> dict[str, object]:
    return {"module": "m", "output": "o", "body": text, "created_at": 1.0}


def test_a_torn_record_is_cut_off_and_seqs_go_on(tmp_path: Path) -> None:
    store = upstream.Store(tmp_path, 1 << 20)
    assert [store.append(_message(f"m{i}"), 60) for i in range(3)] == [1, 2, 3]
    store.close()
    segment = next(tmp_path.glob("*.seg"))
    whole = segment.stat().st_size
    with open(segment, "ab") as handle:
        handle.write(b"\x00\x00\x01\x00half a record")  # a kill in the middle of a write
    again = upstream.Store(tmp_path, 1 << 20)
    assert segment.stat().st_size == whole and again.queued == 3
    records, through = again.batch()
    assert [r["body"] for r in records] == ["m0", "m1", "m2"] and through == 3
    again.release(2)
    assert again.append(_message("m3"), 60) == 4
    again.close()
    third = upstream.Store(tmp_path, 1 << 20)
    assert [r["body"] for r in third.batch()[0]] == ["m2", "m3"]
    assert third.next_seq == 5
    third.release(4)
    assert not list(tmp_path.glob("*.seg")) and third.queued == 0
    assert upstream.Store(tmp_path, 1 << 20).next_seq == 5  # from the acked file


def test_expired_messages_are_counted_once_and_make_room(tmp_path: Path) -> None:
    store = upstream.Store(tmp_path, 600, upstream.Sizes(200, 10, 1 << 20))
    store.append(_message("old" * 20), 0.01)
    store.append(_message("new"), 60)
    assert store.size > 100
    with pytest.raises(upstream.StoreFull):
        store.append(_message("x" * 500), 60)
    records, through = store.batch(now=1e12 - 1)  # everything expired
    store.batch(now=1e12 - 1)
    assert records == [] and through == 2 and store.dropped_expired == 2
    store.release(through)
    assert store.size == 0 and store.expired_total == 2
    big = _message("y" * 300)
    store.append(big, 0.001)
    store.drop_expired_front(now=1e12)  # a full store lets go of the expired front
    assert store.queued == 0
    store.close()


def test_frames_round_trip_and_bad_ones_are_named() -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(modwire.encode({"op": "send", "id": 1}, b"\x00body"))
        assert modwire.read_frame(right) == ({"op": "send", "id": 1}, b"\x00body")
        left.sendall(modwire.PREFIX.pack(2, 0) + b"[]")
        with pytest.raises(modwire.FrameError, match='JSON object with "op"'):
            modwire.read_frame(right)
        left.sendall(modwire.PREFIX.pack(modwire.MAX_HEADER + 1, 0))
        with pytest.raises(modwire.FrameError, match="header is at most"):
            modwire.read_frame(right)


def test_the_client_imports_with_the_standard_library_only() -> None:
    import subprocess
    import sys

    code = ("import sys\n"
            "for name in ('pydantic', 'yaml', 'httpx', 'cryptography', 'typer', 'rich', "
            "'psutil'):\n"
            "    sys.modules[name] = None  # importing it now fails\n"
            "import outpost.modules\n"
            "print(outpost.modules.ModuleClient.__name__)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ModuleClient"
