"""The module restart schedule (agent/modules/backoff.py), exhaustively: pure arithmetic."""

from __future__ import annotations

import pytest

from outpost.agent.modules.backoff import Schedule
from outpost.protocol.modules import Backoff


def schedule(base: float = 1.0, cap: float = 10.0, reset_after: float = 60.0,
             max_restarts: int = 5) -> Schedule:
    return Schedule(base, cap, reset_after, max_restarts)


def test_the_wait_doubles_from_base_up_to_cap() -> None:
    s = schedule(base=1, cap=10, max_restarts=8)
    assert [s.next_wait(0) for _ in range(8)] == [1, 2, 4, 8, 10, 10, 10, 10]
    assert s.restarts == 8


def test_failed_after_max_restarts_in_a_row() -> None:
    s = schedule(max_restarts=3)
    assert [s.next_wait(0.5) for _ in range(3)] == [1, 2, 4]
    assert s.next_wait(0.5) is None
    assert s.next_wait(0.5) is None  # stays failed
    assert s.restarts == 3


def test_zero_restarts_fails_at_the_first_end() -> None:
    assert schedule(max_restarts=0).next_wait(0) is None


def test_a_long_run_clears_the_count() -> None:
    s = schedule(reset_after=60, max_restarts=3)
    assert [s.next_wait(1) for _ in range(3)] == [1, 2, 4]
    assert s.next_wait(60) == 1  # exactly reset_after counts as long enough
    assert s.restarts == 1


def test_a_run_just_short_of_reset_after_does_not_clear() -> None:
    s = schedule(reset_after=60, max_restarts=3)
    s.next_wait(0)
    assert s.next_wait(59.999) == 2


def test_reset_is_a_new_deployment_or_an_explicit_restart() -> None:
    s = schedule(max_restarts=1)
    assert s.next_wait(0) == 1
    assert s.next_wait(0) is None
    s.reset()
    assert s.next_wait(0) == 1


def test_base_above_cap_waits_cap() -> None:
    s = schedule(base=20, cap=5)
    assert s.next_wait(0) == 5
    assert s.wait_for(0) == 5


def test_a_huge_count_does_not_overflow() -> None:
    s = schedule(base=0.05, cap=86400)
    assert s.wait_for(10_000) == 86400


@pytest.mark.parametrize("restarts,expected", [(0, 0.2), (1, 0.4), (2, 0.8), (3, 1.0),
                                               (4, 1.0)])
def test_wait_for_each_count(restarts: int, expected: float) -> None:
    assert schedule(base=0.2, cap=1.0).wait_for(restarts) == pytest.approx(expected)


def test_the_manifest_defaults() -> None:
    s = Schedule.of(Backoff())
    assert (s.base, s.cap, s.reset_after, s.max_restarts) == (10, 300, 600, 20)
    waits = [s.next_wait(0) for _ in range(20)]
    assert waits[:6] == [10, 20, 40, 80, 160, 300]
    assert set(waits[5:]) == {300}
    assert s.next_wait(0) is None
