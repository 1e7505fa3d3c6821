"""A module's inbox on disk alone (agent/modules/inbox_store.py), and the message hub's
inboxes rebuilt from it (msghub.py): records torn by a kill, takes out of arrival order,
segments deleted or copied on, expiry, the taken log's size and the inputs' bounds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from outpost.agent.modules import inbox_store, msghub
from outpost.agent.modules.inbox_store import InboxStore
from outpost.protocol.modreaders import DeploymentManifest
from outpost.protocol.modules import load_manifest

LATER = time.time() + 3600


def _append(store: InboxStore, body: str, priority: int = 0,
            expires_at: float = LATER) -> int:
    return store.append("in", priority, expires_at, b'{"op":"message","input":"in"}',
                        body.encode())


def _live(directory: Path, segment_bytes: int = 1 << 20) -> list[str]:
    store = InboxStore(directory, segment_bytes)
    found, _ = store.load()
    store.close()
    return [s.body.decode() for s in found]


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def test_a_torn_record_is_cut_off_and_appends_go_on(tmp_path: Path) -> None:
    store = InboxStore(tmp_path, 1 << 20)
    assert [_append(store, f"m{i}") for i in range(3)] == [1, 2, 3]
    store.close()
    [segment] = _segments(tmp_path)
    whole = segment.stat().st_size
    with open(segment, "ab") as handle:  # a kill in the middle of the fourth write
        handle.write(b"\x00\x00\x01\x00\x12\x34")
    again = InboxStore(tmp_path, 1 << 20)
    found, expired = again.load()
    assert [(s.seq, s.body, s.input) for s in found] == [(1, b"m0", "in"), (2, b"m1", "in"),
                                                         (3, b"m2", "in")]
    assert expired == 0 and segment.stat().st_size == whole
    assert _append(again, "m3") == 4
    again.close()
    assert _live(tmp_path) == ["m0", "m1", "m2", "m3"]


def test_takes_out_of_arrival_order_are_not_read_back(tmp_path: Path) -> None:
    store = InboxStore(tmp_path, 1 << 20)
    for i in range(6):
        _append(store, f"m{i}", priority=i % 2)
    store.take([2, 4])  # priority 1 first: out of arrival order
    store.take([6])
    store.close()
    assert _live(tmp_path) == ["m0", "m2", "m4"]
    store = InboxStore(tmp_path, 1 << 20)
    found, _ = store.load()
    assert [s.priority for s in found] == [0, 0, 0]
    store.take([s.seq for s in found])
    store.close()
    assert _live(tmp_path) == []
    # Nothing live: every segment and the taken log's runs are gone.
    assert _segments(tmp_path) == [] and (tmp_path / inbox_store.TAKEN).stat().st_size == 0


def test_a_segment_all_taken_is_deleted_and_a_mostly_taken_one_copied_on(
        tmp_path: Path) -> None:
    store = InboxStore(tmp_path, 4000)
    seqs = [_append(store, f"m{i:03d}".ljust(150, ".")) for i in range(40)]
    files = _segments(tmp_path)
    assert len(files) >= 4
    first = files[0]
    in_first = [s for s in seqs if store._where.get(s) == int(first.stem)]
    assert len(in_first) >= 8
    store.take(in_first)  # every record of the first segment taken: deleted
    assert not first.exists()
    second = _segments(tmp_path)[0]
    in_second = [s for s in seqs if store._where.get(s) == int(second.stem)]
    keep = in_second[len(in_second) // 2]
    store.take([s for s in in_second if s != keep])  # one in eight or less left: copied on
    assert not second.exists() and store._where[keep] == int(_segments(tmp_path)[-1].stem)
    store.close()
    expected = [f"m{i:03d}".ljust(150, ".") for i, s in enumerate(seqs)
                if s not in in_first and (s not in in_second or s == keep)]
    found = _live(tmp_path, 4000)
    assert sorted(found) == sorted(expected) and len(found) == len(expected)


def test_a_copy_cut_short_by_a_kill_is_read_once(tmp_path: Path) -> None:
    store = InboxStore(tmp_path, 1 << 20)
    for i in range(3):
        _append(store, f"m{i}")
    store.close()
    [segment] = _segments(tmp_path)
    # The copy of a relocation written, the old segment not yet deleted.
    data = b"".join(inbox_store.encode(dict(record, moved=True))
                    for _, record in inbox_store.records(segment))
    (tmp_path / f"{int(segment.stem) + 1:020d}.seg").write_bytes(data)
    store = InboxStore(tmp_path, 1 << 20)
    found, _ = store.load()
    assert [s.body for s in found] == [b"m0", b"m1", b"m2"]
    store.take([found[1].seq])
    store.close()
    assert _live(tmp_path) == ["m0", "m2"]


def test_expired_messages_are_dropped_and_counted_when_read_back(tmp_path: Path) -> None:
    store = InboxStore(tmp_path, 1 << 20)
    _append(store, "old", expires_at=time.time() - 1)
    _append(store, "new")
    store.close()
    again = InboxStore(tmp_path, 1 << 20)
    found, expired = again.load()
    assert [s.body for s in found] == [b"new"] and expired == 1
    again.close()


def test_the_taken_log_stays_small(tmp_path: Path) -> None:
    store = InboxStore(tmp_path, 64 << 10)
    for i in range(5000):
        seq = _append(store, f"m{i}")
        if i % 7:  # one in seven left behind: takes out of order, runs that do not merge
            store.take([seq])
    assert (tmp_path / inbox_store.TAKEN).stat().st_size < 2 * inbox_store.TAKEN_LOG_MIN + 4096
    record = len(inbox_store.encode({"seq": 5000, "input": "in", "priority": 0,
                                     "expires_at": LATER, "header": {"op": "message",
                                                                     "input": "in"},
                                     "body": "bTQ5OTk=", "moved": True}))
    live = len([i for i in range(5000) if i % 7 == 0])
    # At most eight times the live records in closed segments, plus the open one.
    on_disk = sum(f.stat().st_size for f in _segments(tmp_path))
    assert on_disk <= 8 * live * record + (64 << 10), (on_disk, live, record)
    store.close()
    assert len(_live(tmp_path, 64 << 10)) == len([i for i in range(5000) if i % 7 == 0])


MANIFEST = """
modules:
  sensor: {command: [/bin/true]}
  filter: {command: [/bin/true]}
routes:
  low:
    route: FROM /messages/modules/sensor/outputs/low
      INTO BrokeredEndpoint("/modules/filter/inputs/in")
    priority: 5
  high:
    route: FROM /messages/modules/sensor/outputs/high
      INTO BrokeredEndpoint("/modules/filter/inputs/in")
    priority: 0
message_hub: {constrained: true}
"""


def _hub(state: Path) -> msghub.MessageHub:
    checked, routes = load_manifest(MANIFEST)
    hub = msghub.MessageHub(lambda pid: None, state)
    hub.configure(DeploymentManifest.read(checked.model_dump(mode="json")), routes)
    return hub


def test_a_rebuilt_inbox_keeps_its_order_and_its_bound(tmp_path: Path) -> None:
    hub = _hub(tmp_path)
    for i in range(100):
        hub.route("sensor", {"output": "high" if i % 10 == 9 else "low"}, f"m{i}".encode())
    with pytest.raises(msghub.Refusal) as full:
        hub.route("sensor", {"output": "low"}, b"over")
    assert full.value.status == 507
    for inbox in hub.inboxes.values():
        inbox.store.close()
    # A new agent on the same state directory: the same queue, the same 507.
    again = _hub(tmp_path)
    inbox = again._inbox("filter")
    assert inbox.count == {"in": 100}
    with pytest.raises(msghub.Refusal) as still:
        again.route("sensor", {"output": "low"}, b"over")
    assert still.value.status == 507
    assert "input in of module filter is full (100 messages wait)" in still.value.reason
    order = []
    while (item := inbox.pop()) is not None:
        order.append(item.body.decode())
    high = [f"m{i}" for i in range(100) if i % 10 == 9]
    assert order == high + [f"m{i}" for i in range(100) if i % 10 != 9]
    inbox.store.close()


def test_what_is_not_yet_synced_is_handed_out_once(tmp_path: Path) -> None:
    store = InboxStore(tmp_path, 1 << 20)
    assert store.to_sync() == []
    _append(store, "m0")
    store.take([1])
    fds = store.to_sync()
    assert len(fds) == 2 and store.to_sync() == []  # the segment and the taken log
    for fd in fds:
        msghub._fsync_all([fd])
    store.close()
