"""Registry and routing policies on synthetic worker states, with a hand-moved clock."""

import pytest

from balancer.registry import Registry, WorkerState
from balancer.routing import RouteContext, make_policy, policy_names


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_silent_worker_expires_and_reporting_keeps_it():
    clock = Clock()
    reg = Registry(clock, timeout_s=1.5)
    reg.register("a", address="x:1")
    reg.register("b", address="x:2")
    clock.t = 1.0
    reg.report("a", running=3)
    clock.t = 2.0
    assert reg.expire() == ["b"]
    assert [w.worker_id for w in reg.routable()] == ["a"] and reg.workers["a"].running == 3
    assert reg.report("b", running=1) is False


def test_stale_stream_end_does_not_remove_a_reregistered_worker():
    reg = Registry(Clock(), timeout_s=1.5)
    old = reg.register("a", address="x:1").generation
    reg.register("a", address="x:1")
    assert not reg.remove("a", "old stream ended", old) and "a" in reg.workers


def test_draining_and_excluded_workers_are_not_routable():
    reg = Registry(Clock(), timeout_s=1.5)
    for w in "abc":
        reg.register(w, address=w)
    reg.report("b", draining=True)
    assert [w.worker_id for w in reg.routable(frozenset({"c"}))] == ["a"]


@pytest.mark.parametrize("states,expected", [
    ([WorkerState("a", outstanding=2), WorkerState("b", outstanding=1)], "b"),
    ([WorkerState("a", outstanding=1, waiting=3), WorkerState("b", outstanding=1, waiting=0)], "b"),
    ([WorkerState("a"), WorkerState("b")], "a"),
])
def test_least_outstanding(states, expected):
    assert make_policy("least_outstanding").pick(RouteContext(), states).worker_id == expected


def test_round_robin_cycles_in_id_order():
    policy = make_policy("round_robin")
    states = [WorkerState("c"), WorkerState("a"), WorkerState("b")]
    assert [policy.pick(RouteContext(), states).worker_id for _ in range(4)] == ["a", "b", "c", "a"]


def test_unknown_policy_lists_known_ones():
    with pytest.raises(ValueError, match="known: least_outstanding, round_robin"):
        make_policy("magic")
    assert {"round_robin", "least_outstanding"} <= set(policy_names())
