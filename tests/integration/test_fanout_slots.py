"""A job on every machine of a group: every way a child ends or can no longer start frees
its slot, and only the rate control releases a held child. Real hub, real agents (one
killed with SIGKILL), both databases."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_fanout import _api_status, _ledger, _show
from tests.support import Agent, Hub, healthy_agent, publish_script, wait_until

# Waits for its go file, stamps its start, holds on while the test's hold file for its job
# id is there, then stamps its end.
RUNBOOK = """\
for i in $(seq 1 1200); do [ -e "{shared}/go-$tag" ] && break; sleep 0.05; done
echo "start $OUTPOST_JOB_ID $(date +%s.%N)" >> "{shared}/ledger-$tag"
for i in $(seq 1 1800); do [ -e "{shared}/hold-$OUTPOST_JOB_ID" ] || break; sleep 0.1; done
echo "end $OUTPOST_JOB_ID $(date +%s.%N)" >> "{shared}/ledger-$tag"
"""
NAMES = ("w1", "w2", "w3")


def _fleet(hub: Hub, tmp_path: Path, agents: list[Agent], shared: Path) -> None:
    publish_script(hub, tmp_path, "fleet", RUNBOOK.format(shared=shared), "--param", "tag")
    for name in NAMES:
        healthy_agent(hub, tmp_path, agents, name, max_concurrent_jobs=4)


def _start_one_at_a_time(hub: Hub, shared: Path, tag: str) -> tuple[str, dict[str, str]]:
    """A job on w1..w3, one at a time, w1's child held on (Running) until the test lets it
    go; returns the parent's id and the children's ids by machine."""
    _ledger(shared, tag)
    done = hub.cli("job", "start", "fleet", "--group", "web", "--all", "--param",
                   f"tag={tag}", "--max-concurrency", "1", "--json")
    assert done.returncode == 0, done.stderr
    parent = json.loads(done.stdout)
    child = {c["machine"]: c["job_id"] for c in parent["fanout"]["breakdown"]}
    assert [c["status"] for c in parent["fanout"]["breakdown"]] == ["Queued", "New", "New"]
    (shared / f"hold-{child['w1']}").touch()
    (shared / f"go-{tag}").touch()
    wait_until(lambda: _api_status(hub, child["w1"]) == "Running", 60, 0.2,
               what="w1's child runs")
    return parent["id"], child


def _parent_ended(hub: Hub, parent_id: str, seconds: float) -> dict[str, Any]:
    wait_until(lambda: _api_status(hub, parent_id) in ("Completed", "Failed", "Stopped"),
               seconds, 0.25, what=f"parent {parent_id} to end\n{_show(hub, parent_id)}")
    return _show(hub, parent_id)


@pytest.mark.timeout(240)
def test_a_child_whose_agent_is_killed_ends_and_frees_its_slot(
        hub: Hub, agents: list[Agent], tmp_path: Path, shared: Path) -> None:
    _fleet(hub, tmp_path, agents, shared)
    parent_id, child = _start_one_at_a_time(hub, shared, "k")
    try:
        agents[0].stop(signal.SIGKILL)  # w1, with its child Running
        # Its lease (5 s: 3 heartbeats of 1 s, at least 5 s) is reaped; the child ends and
        # the next one takes the slot, so the parent ends without w1 coming back.
        done = _parent_ended(hub, parent_id, 90)
    finally:
        (shared / f"hold-{child['w1']}").unlink(missing_ok=True)
    fan = done["fanout"]
    assert done["status"] == "Failed", done
    assert done["reason"] == "3 children: 2 Completed, 1 Failed"
    assert fan["counts"] == {"Completed": 2, "Failed": 1}
    lost = {c["machine"]: c for c in fan["breakdown"]}["w1"]
    assert lost["status"] == "Failed" and lost["exit_code"] is None
    assert lost["machine_status"] in ("Unresponsive", "Disconnected")
    assert lost["reason"] == ("lease expired: the machine stopped renewing it (no heartbeat);"
                              " a child job runs on its own machine only, so it is not queued"
                              " again")
    # one at a time still: w2's and w3's children each ran after the one before had ended
    shown = {name: _show(hub, job_id) for name, job_id in child.items()}
    assert shown["w2"]["started_at"] > shown["w1"]["ended_at"]
    assert shown["w3"]["started_at"] > shown["w2"]["ended_at"]
    text = hub.cli("job", "show", parent_id)
    assert text.returncode == 0 and "2 Completed, 1 Failed" in text.stdout, text.stderr
    assert "not queued again" in text.stdout


@pytest.mark.timeout(240)
def test_children_of_a_removed_or_disconnected_machine_end_and_free_their_slots(
        hub: Hub, agents: list[Agent], tmp_path: Path, shared: Path) -> None:
    _fleet(hub, tmp_path, agents, shared)
    parent_id, child = _start_one_at_a_time(hub, shared, "r")
    agents[1].stop(signal.SIGKILL)  # w2: silent from now on; its child is held
    removed = hub.cli("machine", "remove", "w3")  # w3: its child is held
    assert removed.returncode == 0, removed.stderr
    (shared / f"hold-{child['w1']}").unlink()
    # w1's child ends; w2's is released to w2, which is silent: it holds the slot until w2
    # is Disconnected (10 heartbeats of 1 s), then ends not started; w3's ends at its
    # release, its machine gone.
    wait_until(lambda: _api_status(hub, child["w2"]) == "Queued", 60, 0.2,
               what="w2's child released")
    assert _api_status(hub, child["w3"]) == "New"
    done = _parent_ended(hub, parent_id, 90)
    fan = done["fanout"]
    assert done["status"] == "Failed", done
    assert done["reason"] == "3 children: 1 Completed, 2 Stopped"
    by_machine = {c["machine_id"]: c for c in fan["breakdown"]}
    states = {c["job_id"]: c for c in fan["breakdown"]}
    assert states[child["w1"]]["status"] == "Completed"
    assert states[child["w2"]]["reason"] == "not started: machine w2 is Disconnected"
    assert states[child["w2"]]["machine_status"] == "Disconnected"
    gone = states[child["w3"]]
    assert (gone["status"], gone["reason"], gone["machine"]) == (
        "Stopped", "not started: its machine was removed", None)
    assert len(by_machine) == 3
    assert all(c["started_at"] is None for c in (states[child["w2"]], gone))


@pytest.mark.timeout(240)
def test_a_held_child_is_released_by_the_rate_control_only(
        hub: Hub, agents: list[Agent], tmp_path: Path, shared: Path) -> None:
    _fleet(hub, tmp_path, agents, shared)
    parent_id, child = _start_one_at_a_time(hub, shared, "h")
    try:
        for action in ("suspend", "resume"):
            done = hub.cli("job", action, child["w3"])
            assert done.returncode == 1, (action, done.stdout, done.stderr)
            assert "E8128" in done.stderr and "held back by the rate control" in \
                done.stderr, done.stderr
            assert "Traceback" not in done.stderr
        answer = hub.api("POST", f"/v1/jobs/{child['w2']}/resume")
        assert answer.status_code == 409 and answer.json()["code"] == "E8128", answer.text
        assert [_api_status(hub, child[n]) for n in NAMES] == ["Running", "New", "New"]
        # w1's child ends: the rate control releases w2's, and w3's still waits.
        (shared / f"hold-{child['w2']}").touch()
        (shared / f"hold-{child['w1']}").unlink()
        wait_until(lambda: _api_status(hub, child["w2"]) == "Running", 60, 0.2,
                   what="w2's child runs")
        assert _api_status(hub, child["w3"]) == "New"
        shown = _show(hub, parent_id)
        assert shown["reason"] == "3 children: 1 Completed, 1 in progress, 1 waiting"
        assert shown["fanout"]["counts"] == {"Completed": 1, "Running": 1, "New": 1}
    finally:
        for name in NAMES:
            (shared / f"hold-{child[name]}").unlink(missing_ok=True)
    done = _parent_ended(hub, parent_id, 90)
    assert done["status"] == "Completed" and done["reason"] == "3 children: 3 Completed"
