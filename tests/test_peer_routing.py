"""The peer-system baselines (llm-d's default profile, SGLang's cache-aware router) and their prefix index,
table-driven on synthetic worker states."""

from __future__ import annotations

from collections import Counter

import pytest

from balancer.registry import WorkerState
from balancer.route_context import RouteContext
from balancer.routing import make_policy, policy_names
from balancer.routing.prefix_index import PrefixIndex


def ws(wid: str, kv_blocks_total: int = 1000, **load: object) -> WorkerState:
    state = WorkerState(wid, kv_blocks_total=kv_blocks_total)
    for k, v in load.items():
        setattr(state, k, v)
    return state


def req(*hashes: int) -> RouteContext:
    return RouteContext("r", prompt_tokens=16 * len(hashes), prefix_hashes=tuple(hashes))


def test_both_are_registered_baselines():
    assert {"llmd", "sglang_cache_aware"} <= set(policy_names())
    for name in ("llmd", "sglang_cache_aware"):
        policy = make_policy(name)
        assert policy.slo_aware is False and policy.late_binding is False
    assert make_policy("llmd").report_interval_s == 0.05
    assert make_policy("llmd", seed=3).rng.random() == make_policy("llmd", seed=3).rng.random()
    assert make_policy("llmd", prefix_weight=0.0).prefix_weight == 0.0
    assert make_policy("sglang_cache_aware", cache_threshold=0.5).cache_threshold == 0.5
    with pytest.raises(ValueError, match="bad options"):
        make_policy("sglang_cache_aware", seed_typo=1)


# ----- the prefix index -------------------------------------------------------------------------------------
INDEX_CASES = [
    # (capacity, records [(worker, hashes)], (worker, query), expected leading blocks matched)
    (100, [("a", (1, 2, 3, 4))], ("a", (1, 2, 3, 4)), 4),
    (100, [("a", (1, 2, 3, 4))], ("a", (1, 2, 9, 9)), 2),
    (100, [("a", (1, 2, 3, 4))], ("a", (1, 9, 3, 4)), 1),       # stops at the first miss
    (100, [("a", (1, 2, 3, 4))], ("b", (1, 2, 3, 4)), 0),       # per worker
    (100, [("a", (1, 2, 3, 4))], ("a", ()), 0),
    (4, [("a", (1, 2, 3, 4)), ("a", (5, 6))], ("a", (1, 2, 3, 4)), 0),    # 1 and 2 evicted
    (4, [("a", (1, 2, 3, 4)), ("a", (5, 6))], ("a", (3, 4)), 2),
    (4, [("a", (1, 2, 3, 4)), ("a", (1,)), ("a", (5,))], ("a", (1, 2)), 1),  # touching 1 keeps it; 2 goes
    (4, [("a", (1, 2, 3, 4)), ("b", (5, 6, 7, 8))], ("a", (1, 2, 3, 4)), 4),  # capacity is per worker
]


@pytest.mark.parametrize("capacity,records,query,expected", INDEX_CASES,
                         ids=[str(i) for i in range(len(INDEX_CASES))])
def test_prefix_index_matches_leading_blocks_with_lru(capacity, records, query, expected):
    index = PrefixIndex(capacity)
    for worker_id, hashes in records:
        index.record(worker_id, hashes)
    assert index.match(*query) == expected
    assert all(index.size(w) <= capacity for w, _ in records)


# ----- llm-d ----------------------------------------------------------------------------------------------
SCORE_CASES = [
    # (workers, request, expected scores): 2*queue + 2*(1 - kv_usage) + 3*prefix, nothing routed before
    ([ws("a"), ws("b")], req(), {"a": 4.0, "b": 4.0}),
    ([ws("a", waiting=3), ws("b", waiting=3)], req(1), {"a": 4.0, "b": 4.0}),            # all equal: queue 1
    ([ws("a", waiting=0), ws("b", waiting=5), ws("c", waiting=10)], req(), {"a": 4.0, "b": 3.0, "c": 2.0}),
    ([ws("a", kv_blocks_used=250), ws("b", kv_blocks_used=1000)], req(), {"a": 3.5, "b": 2.0}),
    ([ws("a", kv_blocks_total=0), ws("b", kv_blocks_used=500)], req(), {"a": 4.0, "b": 3.0}),  # no KV known: 0
]


@pytest.mark.parametrize("workers,request_,expected", SCORE_CASES, ids=[str(i) for i in range(len(SCORE_CASES))])
def test_llmd_scores(workers, request_, expected):
    assert make_policy("llmd").scores(request_, workers) == pytest.approx(expected)


PICK_CASES = [
    # (workers, expected): with kv and prefix equal the least waiting wins; with queues equal the emptiest KV
    ([ws("a", waiting=4), ws("b", waiting=1), ws("c", waiting=7)], "b"),
    ([ws("a", waiting=1), ws("b", waiting=0)], "b"),
    ([ws("a", kv_blocks_used=900), ws("b", kv_blocks_used=100), ws("c", kv_blocks_used=500)], "b"),
    # queue (weight 2, full swing) beats a 40% KV difference (0.8)
    ([ws("a", waiting=0, kv_blocks_used=600), ws("b", waiting=9, kv_blocks_used=200)], "a"),
]


@pytest.mark.parametrize("workers,expected", PICK_CASES, ids=[str(i) for i in range(len(PICK_CASES))])
def test_llmd_picks(workers, expected):
    for seed in range(5):
        assert make_policy("llmd", seed=seed).route(req(1, 2), workers).worker_id == expected


@pytest.mark.parametrize("cached_waiting,cached_kv_used,expected", [
    (9, 400, "cached"),    # 0 + 2*0.6 + 3*1 = 4.2 beats 2 + 2 = 4.0: the prefix (weight 3) outweighs load
    (9, 600, "other"),     # 0 + 2*0.4 + 3*1 = 3.8 loses to 4.0
    (0, 900, "cached"),    # 2 + 0.2 + 3 = 5.2
])
def test_llmd_prefix_outweighs_load_after_a_first_request(cached_waiting, cached_kv_used, expected):
    policy = make_policy("llmd", seed=1)
    hashes = (11, 22, 33, 44)
    first = policy.route(req(*hashes), [ws("x"), ws("y")]).worker_id
    other = "y" if first == "x" else "x"
    workers = [ws(first, waiting=cached_waiting, kv_blocks_used=cached_kv_used), ws(other)]
    chosen = policy.route(req(*hashes), workers).worker_id
    assert chosen == (first if expected == "cached" else other)


@pytest.mark.parametrize("request_hashes,expected_a", [
    ((1, 2, 9, 9), 4.0 + 1.5),     # 2 of 4 blocks
    ((1, 2, 3, 4), 4.0 + 3.0),
    ((1, 9, 3, 4), 4.0 + 0.75),    # only the leading run counts
    ((9, 1, 2, 3), 4.0),
])
def test_llmd_partial_prefix_match(request_hashes, expected_a):
    policy = make_policy("llmd")
    policy.index.record("a", (1, 2, 3, 4))
    scores = policy.scores(req(*request_hashes), [ws("a"), ws("b")])
    assert scores == pytest.approx({"a": expected_a, "b": 4.0})
    if expected_a > 4.0:
        assert policy.route(req(*request_hashes), [ws("a"), ws("b")]).worker_id == "a"


def test_llmd_index_evicts_at_a_tiny_capacity():
    policy = make_policy("llmd", lru_blocks_per_worker=2)
    workers = [ws("a"), ws("b", waiting=5)]
    assert policy.route(req(1, 2, 3), workers).worker_id == "a"           # the least waiting
    assert policy.index.size("a") == 2
    assert policy.scores(req(1, 2, 3), workers)["a"] == pytest.approx(4.0)   # block 1 evicted: no leading match
    assert policy.scores(req(2, 3), workers)["a"] == pytest.approx(7.0)
    big = make_policy("llmd")
    big.route(req(1, 2, 3), workers)
    assert big.scores(req(1, 2, 3), workers)["a"] == pytest.approx(7.0)


def test_llmd_tie_break_is_seeded_and_spreads():
    workers = [ws(x) for x in "cab"]
    picks = {make_policy("llmd", seed=3).route(req(), workers).worker_id for _ in range(5)}
    assert len(picks) == 1                                 # a fresh policy with the same seed repeats itself
    assert picks == {make_policy("llmd", seed=3).route(req(), workers[::-1]).worker_id}   # order-independent
    policy = make_policy("llmd", seed=3)
    counts = Counter(policy.route(req(), workers).worker_id for _ in range(300))
    assert set(counts) == {"a", "b", "c"} and min(counts.values()) > 60


# ----- SGLang cache-aware -----------------------------------------------------------------------------------
TEN = tuple(range(1, 11))
SGLANG_CASES = [
    # (outstanding per worker, hashes cached at "a", request hashes, expected)
    ({"a": 5, "b": 0}, (1, 2, 3, 4), (1, 2, 3, 4), "a"),          # balanced, full hit
    ({"a": 5, "b": 0}, (1, 2, 3, 4), (1, 2, 9, 9), "a"),          # 0.5 > 0.3
    ({"a": 5, "b": 0}, (1, 2, 3, 4), (1, 9, 9, 9), "b"),          # 0.25: least loaded
    ({"a": 5, "b": 0}, TEN, (1, 2, 3, 94, 95, 96, 97, 98, 99, 100), "b"),   # exactly 0.3 is not above it
    ({"a": 5, "b": 0}, TEN, (1, 2, 3, 4, 95, 96, 97, 98, 99, 100), "a"),    # 0.4
    ({"a": 5, "b": 0}, (1, 2, 3, 4), (), "b"),                    # no hashes: least loaded
    ({"a": 0, "b": 0}, (), (7, 8), "a"),                          # nothing cached, equal load: by id
    ({"a": 100, "b": 10}, (1, 2, 3, 4), (1, 2, 3, 4), "b"),       # imbalance overrides a full hit
    ({"a": 74, "b": 10}, (1, 2, 3, 4), (1, 2, 3, 4), "a"),        # max - min == 64: not imbalanced
    ({"a": 75, "b": 10}, (1, 2, 3, 4), (1, 2, 3, 4), "b"),        # 65 > 64 and 75 > 15
    ({"a": 195, "b": 130}, (1, 2, 3, 4), (1, 2, 3, 4), "a"),      # 65 > 64 but 195 == 1.5 * 130: balanced
    ({"a": 196, "b": 130}, (1, 2, 3, 4), (1, 2, 3, 4), "b"),      # both thresholds exceeded
    ({"a": 80, "b": 10, "c": 10}, (1, 2, 3, 4), (1, 2, 3, 4), "b"),   # least loaded, ties by id
]


@pytest.mark.parametrize("load,cached,request_hashes,expected", SGLANG_CASES,
                         ids=[str(i) for i in range(len(SGLANG_CASES))])
def test_sglang_cache_aware_picks(load, cached, request_hashes, expected):
    policy = make_policy("sglang_cache_aware")
    policy.index.record("a", cached)
    workers = [ws(w, outstanding=n) for w, n in load.items()]
    assert policy.route(req(*request_hashes), workers).worker_id == expected
    assert policy.index.match(expected, request_hashes) == len(request_hashes)   # recorded where it went


def test_sglang_sticks_to_the_worker_it_sent_a_prefix_to():
    policy = make_policy("sglang_cache_aware")
    hashes = (5, 6, 7, 8)
    assert policy.route(req(*hashes), [ws("a", outstanding=3), ws("b")]).worker_id == "b"
    assert policy.route(req(*hashes), [ws("a"), ws("b", outstanding=40)]).worker_id == "b"
    assert policy.route(req(*hashes), [ws("a"), ws("b", outstanding=70)]).worker_id == "a"   # imbalanced
