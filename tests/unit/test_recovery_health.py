"""A protection's health as it is computed on read (hub/recovery.py ``health``): the state
and the one-line message the issue shows, with the cause of a Behind taken from the pending
point's Waiting message, the agent's silence, the extension's state, the last failure."""

from __future__ import annotations

from types import SimpleNamespace as Row
from typing import Any

import pytest

from outpost.hub import recovery

NOW = 1_000_000.0


def _p(**kw: Any) -> Row:
    values: dict[str, Any] = {"state": "Protecting", "rpo_seconds": 300.0,
                              "created_at": NOW - 3600, "reason": None,
                              "active_machine_id": None}
    return Row(**(values | kw))


def _machine(heard: float | None = NOW - 5) -> Row:
    return Row(name="web-1", stopped_at=None, heartbeat_interval=10.0, last_heartbeat_at=heard,
               registered_at=NOW - 7200)


def _point(age: float) -> Row:
    return Row(taken_at=NOW - age, created_at=NOW - age + 1)


READY = Row(state="Ready", step=None, message="")


def test_a_recent_point_is_protecting() -> None:
    assert recovery.health(_p(), _machine(), _point(100), None, READY, None, NOW) == (
        "Protecting", "RPO 5m, last point 2m ago")


def test_behind_because_of_the_load_the_pending_point_waits_for() -> None:
    op = Row(status="Waiting", message="waiting: CPU 96 %", code=None, started_at=None)
    state, message = recovery.health(_p(), _machine(), _point(720), op, READY, None, NOW)
    assert (state, message) == ("Behind", "RPO 5m, last point 12m ago: behind because CPU 96 %")


def test_behind_because_the_agent_is_silent() -> None:
    state, message = recovery.health(_p(), _machine(heard=NOW - 600), _point(900), None, READY,
                                     None, NOW)
    assert state == "Behind"
    assert "behind because the agent of web-1 is Disconnected (last heard from 10m ago)" \
        in message


def test_behind_with_the_extension_state_and_step() -> None:
    ext = Row(state="NotReady", step="enable", message="E9032: malformed status file")
    state, message = recovery.health(_p(), _machine(), _point(900), None, ext, None, NOW)
    assert state == "Behind"
    assert message.endswith("the recovery extension is NotReady at step enable: E9032: "
                            "malformed status file")


def test_the_last_failure_then_the_refusal() -> None:
    failed = Row(status="Failed", code="E9102", message="restic failed", started_at=None)
    assert recovery.health(_p(), _machine(), _point(900), failed, READY, None, NOW)[1] \
        .endswith("the last point failed (E9102: restic failed)")
    assert recovery.health(_p(reason="E9083: previous overdue"), _machine(), _point(900),
                           None, READY, None, NOW)[1].endswith("E9083: previous overdue")


def test_failed_extension_failed_over_and_paused() -> None:
    ext = Row(state="Failed", step="install", message="E9101: restic is not installed")
    assert recovery.health(_p(), _machine(), _point(10), None, ext, None, NOW)[0] == "Failed"
    active = Row(name="web-2")
    state, message = recovery.health(_p(state="FailedOver"), _machine(), _point(10), None,
                                     READY, active, NOW)
    assert state == "FailedOver" and "web-2" in message
    off = Row(state="NotReady", step="disable", message="disabled: its goal says enabled=false")
    assert recovery.health(_p(), _machine(), _point(10), None, off, None, NOW)[0] == "Paused"


def test_a_new_protection_is_protecting_until_its_rpo_passes() -> None:
    assert recovery.health(_p(created_at=NOW - 10), _machine(), None, None, READY, None,
                           NOW)[0] == "Protecting"
    state, message = recovery.health(_p(created_at=NOW - 400), _machine(), None, None, READY,
                                     None, NOW)
    assert state == "Behind" and "no point yet" in message


@pytest.mark.parametrize(("rpo", "given", "interval"), [
    (300.0, None, 150.0), (6.0, None, 5.0), (300.0, 60.0, 60.0), (300.0, 1.0, 5.0)])
def test_interval(rpo: float, given: float | None, interval: float) -> None:
    assert recovery.interval_for(rpo, given) == interval
