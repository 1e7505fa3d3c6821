"""Nothing acked to a module's sender is lost when the agent dies before the receiver took
it: a real hub, a real agent running a deployment of two module processes (sensor and
filter, tests/msgmodule.py on ``ModuleClient``), and kill -9 of the agent.

The filter takes a few messages, then its client goes away (its process lives on) while the
sensor sends on two routes of different priorities into the same input, every send acked.
The agent is killed with kill -9 and started again; it adopts the modules, reads the
filter's inbox back from disk, and the filter's new client gets every acked message, by
priority then arrival, once, and none of those it took before the kill.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path

from outpost.agent.modules.msghub import socket_path

from tests.integration.test_messages_agent import Edge, deploy, edges  # noqa: F401
from tests.support import Agent, Hub, wait_until

ROUTES = {
    "low": {"route": 'FROM /messages/modules/sensor/outputs/low '
                     'INTO BrokeredEndpoint("/modules/filter/inputs/in")', "priority": 5},
    "high": {"route": 'FROM /messages/modules/sensor/outputs/high '
                      'INTO BrokeredEndpoint("/modules/filter/inputs/in")', "priority": 0},
}
COUNT = 60


def test_a_kill_9_of_the_agent_loses_no_acked_message_between_modules(
        sqlite_hub: Hub, tmp_path: Path, agents: list[Agent],
        edges: list[Edge]) -> None:  # noqa: F811 - the fixture imported above
    edge = deploy(sqlite_hub, tmp_path, agents, ["sensor", "filter"], ROUTES)
    edges.append(edge)
    sensor, filt = edge.modules["sensor"], edge.modules["filter"]

    for i in range(3):
        assert sensor.ask(op="send", output="low", body=f"t{i}") == {"ok": True}
    assert [filt.ask(op="recv", timeout=10)["body"] for _ in range(3)] == ["t0", "t1", "t2"]
    # Its took reached the agent before the kill: these three must not come again.
    wait_until(lambda: edge.counters()["delivered"] == 3, 20, 0.1, "the filter's takes")

    filt.close()  # the filter's client goes away; its process waits for the next one
    sent = []
    for i in range(COUNT):
        output = "high" if i % 4 == 3 else "low"
        assert sensor.ask(op="send", output=output, body=f"n{i}") == {"ok": True}, i
        sent.append((output, f"n{i}"))
    assert edge.counters()["delivered"] == 3

    edge.agent.stop(signal.SIGKILL)
    edge.agent.start()

    def listening() -> bool:
        status = edge.agent.status() or {}
        adopted = [m for m in (status.get("modules") or {}).get("modules", [])
                   if m.get("name") == "filter" and m.get("pid")]
        if not adopted:
            return False
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(socket_path(edge.agent.state_dir)))
                return True
            except OSError:
                return False
    # A new client connects at once (ModuleClient's constructor): once the agent listens
    # and has adopted the module.
    wait_until(listening, 30, 0.05, "the new agent's message socket")
    filt.connect()
    got = [filt.ask(op="recv", timeout=10).get("body") for _ in range(COUNT)]
    expected = ([body for output, body in sent if output == "high"]
                + [body for output, body in sent if output == "low"])
    assert got == expected
    assert filt.ask(op="recv", timeout=0.5) == {"none": True}  # none twice, no t0-t2
    wait_until(lambda: edge.counters()["delivered"] == COUNT, 20, 0.1, "the new takes")
    counters = edge.counters()
    assert (counters["expired"], counters["received"]) == (0, 0), counters
    # Everything read back was taken: the disk is given back. A segment the store still
    # appends to (one its takes moved the last waiting records into, when they came in
    # pieces) stays open until it fills; read again at the next start, it holds nothing
    # waiting and is deleted.
    inbox = edge.agent.state_dir / "messages" / "inbox" / "filter"
    assert inbox.is_dir() and len(list(inbox.glob("*.seg"))) <= 1, sorted(inbox.iterdir())
    edge.agent.stop(signal.SIGKILL)
    edge.agent.start()
    wait_until(lambda: not list(inbox.glob("*.seg")), 30, 0.1,
               f"the taken segments deleted at start: {sorted(inbox.iterdir())}")
    assert filt.ask(op="recv", timeout=1.0) == {"none": True}  # nothing comes again
