"""Each engine policy's order, admission and preemption victims, stepped by hand on a small fake block budget."""

from __future__ import annotations

import pytest

from workers.block_manager import BlockManager
from workers.clock import VirtualClock
from workers.policies import make_policy, policy_names
from workers.request import Request, RequestStatus, SamplingParams
from workers.scheduler import Scheduler, SchedulerConfig
from tests.helpers import ids, step


def setup(policy, num_blocks=64, block_size=4, budget=64, max_seqs=8, **kw):
    clock = VirtualClock()
    sched = Scheduler(SchedulerConfig(max_seqs, budget, 512), BlockManager(num_blocks, block_size, 0.0),
                      make_policy(policy, **kw), clock)
    return sched, clock


def add(sched, clock, rid, prompt=4, max_tokens=8, priority=0, advance=0.001):
    r = Request(rid, [1] * prompt, SamplingParams(max_tokens=max_tokens), clock.now(), priority=priority)
    sched.add_request(r)
    clock.advance(advance)
    return r



def drain(sched, limit=1000):
    for _ in range(limit):
        if not sched.has_work():
            return
        step(sched)
    raise AssertionError("did not drain")


def test_registry_knows_the_policies():
    assert {"fcfs", "priority", "rtc", "orca"} <= set(policy_names())
    with pytest.raises(ValueError, match="unknown engine policy 'lifo'"):
        make_policy("lifo")


@pytest.mark.parametrize("policy,arrivals,expected", [
    # (rid, priority) in arrival order -> admission order with room for two
    ("fcfs", [("a", 0), ("b", 5), ("c", 1)], ["a", "b"]),
    ("priority", [("a", 0), ("b", 5), ("c", 1)], ["b", "c"]),
    ("orca", [("a", 0), ("b", 5), ("c", 1)], ["a", "b"]),
    ("rtc", [("a", 0), ("b", 5), ("c", 1)], ["a", "b"]),
])
def test_admission_order(policy, arrivals, expected):
    sched, clock = setup(policy, max_seqs=2)
    for rid, prio in arrivals:
        add(sched, clock, rid, priority=prio)
    assert ids(step(sched)) == expected


def test_priority_preempts_lower_priority_when_a_higher_one_waits():
    sched, clock = setup("priority", max_seqs=2, aging_per_s=0.0)
    low1, low2 = add(sched, clock, "low1", max_tokens=50), add(sched, clock, "low2", max_tokens=50)
    step(sched)
    urgent = add(sched, clock, "urgent", priority=10)
    out = step(sched)
    assert out.preempted == [low2]                       # the least important (then latest) running one
    assert "urgent" in ids(out) and low2.status is RequestStatus.PREEMPTED
    assert low1.status is RequestStatus.RUNNING and urgent.status is RequestStatus.RUNNING
    drain(sched)
    assert sched.blocks.num_used_blocks == 0 and low2.num_output_tokens == 50


def test_priority_equal_importance_does_not_preempt():
    sched, clock = setup("priority", max_seqs=1, aging_per_s=0.0)
    add(sched, clock, "first", max_tokens=20)
    step(sched)
    add(sched, clock, "second")
    assert step(sched).preempted == []


def test_priority_aging_lets_old_low_priority_requests_through():
    sched, clock = setup("priority", max_seqs=1, aging_per_s=1.0)
    old = add(sched, clock, "old", priority=0, advance=10.0)     # waited 10 s: effective priority 10
    add(sched, clock, "new", priority=5)
    assert ids(step(sched)) == ["old"] and old.status is RequestStatus.RUNNING


def test_rtc_runs_static_batches():
    sched, clock = setup("rtc", max_seqs=4)
    first = [add(sched, clock, f"b1-{i}", max_tokens=3 + i) for i in range(2)]
    step(sched)                                           # batch 1 = the two waiting at the start
    late = add(sched, clock, "late")
    while any(not r.is_finished for r in first):
        assert "late" not in ids(step(sched))             # nobody joins a running batch
    assert ids(step(sched)) == ["late"]
    drain(sched)
    assert late.num_output_tokens == 8


def test_orca_reserves_the_maximum_length_up_front_and_never_preempts():
    # 12 blocks of 4 tokens; each request reserves 4 + 20 = 24 tokens = 6 blocks, so only two fit at once
    sched, clock = setup("orca", num_blocks=12, block_size=4, max_seqs=8)
    reqs = [add(sched, clock, f"r{i}", prompt=4, max_tokens=20) for i in range(3)]
    out = step(sched)
    assert ids(out) == ["r0", "r1"] and sched.blocks.num_used_blocks == 12
    preempted = []
    while sched.has_work():
        preempted += step(sched).preempted
    assert preempted == [] and all(r.num_output_tokens == 20 for r in reqs)
    assert sched.blocks.num_used_blocks == 0


def test_fcfs_with_paged_blocks_admits_what_orca_cannot():
    sched, clock = setup("fcfs", num_blocks=12, block_size=4, max_seqs=8)
    for i in range(3):
        add(sched, clock, f"r{i}", prompt=4, max_tokens=20)
    assert ids(step(sched)) == ["r0", "r1", "r2"]          # one block each to start


def test_fcfs_as_vllm_preempted_request_returns_to_the_head_and_nothing_joins_that_step():
    # 4 blocks of 4 tokens: a and b hold two each, c (two blocks) waits; a's growth preempts b
    sched, clock = setup("fcfs", num_blocks=4, block_size=4, max_seqs=8)
    a, b = add(sched, clock, "a", prompt=4, max_tokens=40), add(sched, clock, "b", prompt=4, max_tokens=40)
    step(sched)
    step(sched)
    c = add(sched, clock, "c", prompt=8, max_tokens=4)
    preempting = None
    for _ in range(40):
        out = step(sched)
        if out.preempted:
            preempting = out
            break
    assert preempting is not None and preempting.preempted == [b]        # the latest arrival is the victim
    assert "c" not in ids(preempting)                                   # no admission in a step that preempted
    assert [r.request_id for r in sched.waiting] == ["b", "c"]          # b back at the head, ahead of c
    assert b.num_preemptions == 1 and a.status is RequestStatus.RUNNING and c.status is RequestStatus.WAITING
