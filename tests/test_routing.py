"""Registry, global queue and every routing policy on synthetic worker states (table-driven, hand-moved clock)."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from balancer.queue import GlobalQueue, QueueFull, has_room
from balancer.registry import Assignment, Registry, WorkerState
from balancer.route_context import RouteContext
from balancer.routing import make_policy, policy_names
from services.latency import LatencyModel


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def worker(wid: str, gpu: str = "A100-80G", **load) -> WorkerState:
    lm = LatencyModel.from_names(gpu, "llama-2-7b")
    w = WorkerState(wid, gpu_type=gpu, latency=lm, capacity_tok_s=lm.saturated_decode_tok_s(),
                    kv_blocks_total=lm.kv_capacity_tokens() // 16, max_num_seqs=256)
    for k, v in load.items():
        setattr(w, k, v)
    return w


CHAT = RouteContext("r", "interactive", prompt_tokens=500, max_tokens=256, predicted_output=129, ttft_ms=1000,
                    tpot_ms=100)
CODE = RouteContext("c", "code", prompt_tokens=2500, max_tokens=64, predicted_output=40, e2e_ms=2000)


# ----- registry -----------------------------------------------------------------------------------------
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


def test_in_flight_work_is_counted_between_reports_and_released_once():
    reg = Registry(Clock(), timeout_s=1.5)
    reg.register("a", address="a")
    reg.acquire("r1", Assignment("a", 0.5, 700, 500))
    reg.acquire("r2", Assignment("a", 0.25, 300, 100))
    w = reg.workers["a"]
    assert (w.outstanding, w.assigned_work_s, w.assigned_tokens, w.routed_since_report) == (2, 0.75, 1000, 600)
    reg.report("a", running=2)
    assert w.routed_since_report == 0
    reg.release("r1")
    reg.release("r1")
    assert (w.outstanding, w.assigned_tokens) == (1, 300)


# ----- policies ---------------------------------------------------------------------------------------------
def test_every_policy_is_registered():
    assert set(policy_names()) == {"round_robin", "random", "least_outstanding", "power_of_two", "least_kv",
                                   "capacity", "token_aware", "prefix_affinity", "adaptive", "llmd", "sglang_cache_aware",
                                   "cache_aware"}
    with pytest.raises(ValueError, match="unknown routing policy 'magic'"):
        make_policy("magic")


CASES = [
    # (policy, workers, request, expected worker)
    ("least_outstanding", [worker("a", outstanding=2), worker("b", outstanding=1)], CHAT, "b"),
    ("least_outstanding", [worker("a", outstanding=1, waiting=3), worker("b", outstanding=1)], CHAT, "b"),
    ("least_kv", [worker("a", assigned_tokens=90_000), worker("b", "L40S", assigned_tokens=10_000)], CHAT, "b"),
    ("least_kv", [worker("a", assigned_tokens=10_000), worker("b", "L40S", assigned_tokens=40_000)], CHAT, "a"),
    # capacity: an idle fast GPU beats an idle slow one; a long backlog on the fast one sends work to the slow one
    ("capacity", [worker("fast"), worker("slow", "T4")], CHAT, "fast"),
    ("capacity", [worker("fast", assigned_work_s=30.0), worker("slow", "T4")], CHAT, "slow"),
    # capacity: no KV headroom on the fast one
    ("capacity", [worker("fast", assigned_tokens=111_600), worker("mid", "L40S")], CHAT, "mid"),
    # token_aware: pending prefill tokens per unit of speed, not request counts
    ("token_aware", [worker("a", pending_prefill_tokens=8000, outstanding=1),
                     worker("b", "L40S", pending_prefill_tokens=500, outstanding=5)], CHAT, "b"),
    ("token_aware", [worker("a", routed_since_report=6000), worker("b")], CHAT, "b"),
    ("token_aware", [worker("a", pending_prefill_tokens=2000), worker("slow", "T4", pending_prefill_tokens=1500)],
     CHAT, "a"),
    # adaptive at light load: earliest expected finish, the fastest GPU
    ("adaptive", [worker("t4", "T4"), worker("a100"), worker("l40s", "L40S")], CHAT, "a100"),
]


@pytest.mark.parametrize("policy,workers,request_,expected", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_policy_picks(policy, workers, request_, expected):
    assert make_policy(policy).route(request_, workers).worker_id == expected


def test_round_robin_cycles_in_id_order():
    policy = make_policy("round_robin")
    states = [worker("c"), worker("a"), worker("b")]
    assert [policy.route(CHAT, states).worker_id for _ in range(4)] == ["a", "b", "c", "a"]


def test_random_is_seeded_and_spreads():
    states = [worker(x) for x in "abc"]
    picks = [make_policy("random", seed=3).route(CHAT, states).worker_id for _ in range(5)]
    assert len(set(picks)) == 1                        # a fresh policy with the same seed repeats itself
    policy = make_policy("random", seed=3)
    counts = Counter(policy.route(CHAT, states).worker_id for _ in range(300))
    assert set(counts) == {"a", "b", "c"} and min(counts.values()) > 60


def test_power_of_two_never_picks_the_most_loaded():
    states = [worker("a", outstanding=9), worker("b", outstanding=1), worker("c", outstanding=3)]
    policy = make_policy("power_of_two", seed=1)
    counts = Counter(policy.route(CHAT, states).worker_id for _ in range(200))
    assert counts["a"] == 0 and counts["b"] > counts["c"] > 0


def test_prefix_affinity_sticks_and_guards_imbalance():
    states = [worker(x) for x in "abcd"]
    policy = make_policy("prefix_affinity")
    same = RouteContext("x", prompt_tokens=10, prefix_hashes=(11, 22, 33, 44, 55))
    chosen = {policy.route(same, states).worker_id for _ in range(5)}
    assert len(chosen) == 1
    spread = {policy.route(RouteContext("y", prefix_hashes=(i, i + 1, i + 2, i + 3)), states).worker_id
              for i in range(40)}
    assert len(spread) >= 3
    target = next(w for w in states if w.worker_id in chosen)
    target.outstanding = 20                            # far above the least loaded (0): the guard moves it
    assert policy.route(same, states).worker_id != target.worker_id


def test_adaptive_switches_by_load_with_hysteresis():
    policy = make_policy("adaptive")
    assert policy.update_level(0.1) == "light"
    assert policy.update_level(0.5) == "medium"
    assert policy.update_level(0.8) == "heavy"
    assert policy.update_level(0.65) == "heavy"        # must fall below 0.6 to leave heavy
    assert policy.update_level(0.55) == "medium"
    assert policy.update_level(0.25) == "medium"       # and below 0.2 to leave medium
    assert policy.update_level(0.1) == "light"


@pytest.mark.parametrize("policy", ["least_outstanding", "capacity", "token_aware", "least_kv", "power_of_two",
                                    "prefix_affinity", "adaptive"])
def test_code_request_avoids_a_worker_that_would_miss_its_slo(policy):
    # the T4 is idle and preferred by most loads, but prefilling 2,500 tokens plus 40 decodes there takes
    # longer than 2 s, while the busier A100 still makes it
    states = [worker("t4", "T4", kv_blocks_total=10_000), worker("a100", outstanding=3, running=3,
                                                                 decode_context_tokens=3000)]
    for _ in range(5):
        assert make_policy(policy).route(CODE, states).worker_id == "a100"


def test_baselines_do_not_filter_by_slo():
    states = [worker("t4", "T4"), worker("a100")]
    assert {make_policy("round_robin").route(CODE, states).worker_id,
            make_policy("round_robin").route(CODE, states[::-1]).worker_id} == {"a100"}  # id order: a100 first
    policy = make_policy("round_robin")
    assert [policy.route(CODE, states).worker_id for _ in range(2)] == ["a100", "t4"]


# ----- the global queue ---------------------------------------------------------------------------------
def test_queue_orders_by_priority_then_deadline():
    async def main():
        q = GlobalQueue(limit=10)
        q.push(RouteContext("late", tenant="t"), frozenset(), deadline=9.0)
        q.push(RouteContext("soon", tenant="t"), frozenset(), deadline=1.0)
        q.push(RouteContext("vip", tenant="t", priority=5), frozenset(), deadline=20.0)
        return [w.request.request_id for w in q.ordered()]

    assert asyncio.run(main()) == ["vip", "soon", "late"]


def test_a_tenants_flood_does_not_starve_another_tenant():
    async def main():
        q = GlobalQueue(limit=64)
        for i in range(20):
            q.push(RouteContext(f"flood-{i}", tenant="flood"), frozenset(), deadline=float(i))
        for i in range(3):
            q.push(RouteContext(f"quiet-{i}", tenant="quiet"), frozenset(), deadline=100.0 + i)
        served = []
        while len(q):                                  # dispatch one at a time, charging as the balancer does
            head = q.ordered()[0]
            q.remove(head)
            q.charge(head.request.tenant, 100)
            served.append(head.request.request_id)
        return served

    served = asyncio.run(main())
    positions = [served.index(f"quiet-{i}") for i in range(3)]
    assert max(positions) <= 6, served                 # interleaved, not after the 20 flood requests


def test_queue_sheds_sheddable_first_and_stays_bounded():
    async def main():
        q = GlobalQueue(limit=4, shed_at=0.5)
        q.push(RouteContext("s1", sheddable=True), frozenset(), 1.0)
        q.push(RouteContext("s2", sheddable=True), frozenset(), 1.0)
        with pytest.raises(QueueFull):                 # sheddable past half the queue: refused
            q.push(RouteContext("s3", sheddable=True), frozenset(), 1.0)
        q.push(RouteContext("i1"), frozenset(), 1.0)
        q.push(RouteContext("i2"), frozenset(), 1.0)
        _, evicted = q.push(RouteContext("i3"), frozenset(), 1.0)    # full: evicts a sheddable one
        assert [w.request.request_id for w in evicted] == ["s2"] and len(q) == 4
        _, evicted = q.push(RouteContext("i4"), frozenset(), 1.0)    # and the last sheddable one
        assert [w.request.request_id for w in evicted] == ["s1"]
        with pytest.raises(QueueFull):                 # full of non-sheddable requests: refused
            q.push(RouteContext("i5"), frozenset(), 1.0)
        return len(q), q.shed

    assert asyncio.run(main()) == (4, 4)           # two refused, two evicted


def test_vtc_lifts_a_returning_tenant_to_the_active_floor():
    async def main():
        q = GlobalQueue(limit=10)
        q.charge("busy", 5000)
        q.push(RouteContext("x", tenant="busy"), frozenset(), 1.0)
        q.push(RouteContext("y", tenant="newcomer"), frozenset(), 1.0)
        return q.vtc["newcomer"]

    assert asyncio.run(main()) == 5000


def test_room_means_a_slot_and_unpromised_kv():
    w = worker("a", kv_blocks_total=100, outstanding=2, assigned_tokens=1500)
    assert has_room(w, 100) and not has_room(w, 200)
    w.outstanding = 256
    assert not has_room(w, 1)
    assert has_room(worker("idle", kv_blocks_total=1), 10_000)     # an idle worker always takes one
