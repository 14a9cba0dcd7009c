"""Automatic prefix caching: the block manager's cache and reference counts, the scheduler prefilling only what
is not cached, nothing leaking under aborts and preemption (property-tested), and the cache-aware router."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancer.registry import WorkerState
from balancer.routing import make_policy as make_routing
from balancer.routing.base import RouteContext
from services.latency import LatencyModel
from workers.block_manager import BlockManager
from workers.clock import VirtualClock
from workers.policies import make_policy
from workers.request import Request, RequestStatus, SamplingParams
from workers.scheduler import Scheduler, SchedulerConfig

BS = 4


def make_scheduler(num_blocks=64, budget=64, max_seqs=8, caching=True):
    clock = VirtualClock()
    blocks = BlockManager(num_blocks, BS, 0.0, caching=caching)
    return Scheduler(SchedulerConfig(max_seqs, budget, 512), blocks, make_policy("fcfs"), clock), clock


def req(rid, prompt, clock, max_tokens=4):
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True), clock.now())


def run_to_end(sched, token=7):
    """Step until idle; returns the steps' (request id, new tokens) lists."""
    steps = []
    while sched.has_work():
        out = sched.schedule()
        steps.append([(s.request.request_id, s.num_new_tokens) for s in out.scheduled])
        sched.update(out, {s.request.request_id: token for s in out.scheduled if s.samples})
    return steps


BASE = list(range(100, 120))          # 20 tokens: 5 full blocks of 4


@pytest.mark.parametrize("second,cached_blocks", [
    (BASE, 4),                          # the same prompt: all but the block holding the last token
    (BASE + [1, 2, 3], 5),              # a longer prompt that starts the same: every block of the first
    (BASE[:9] + [0] + BASE[10:], 2),    # differs in block 2: blocks 0 and 1
    ([0] + BASE[1:], 0),                # differs in the first token: nothing
    (BASE[:4], 0),                      # one block, all of it: its last token must still be computed
    (BASE[:5], 1),
])
def test_second_prompt_prefills_only_what_is_not_cached(second, cached_blocks):
    sched, clock = make_scheduler()
    sched.add_request(req("a", BASE, clock))
    run_to_end(sched)
    sched.add_request(req("b", second, clock))
    steps = run_to_end(sched)
    assert steps[0] == [("b", len(second) - cached_blocks * BS)]
    assert sched.blocks.hit_tokens == cached_blocks * BS
    assert sched.blocks.num_used_blocks == 0


def test_without_caching_nothing_is_kept():
    sched, clock = make_scheduler(caching=False)
    for rid in "ab":
        sched.add_request(req(rid, BASE, clock))
        assert run_to_end(sched)[0] == [(rid, 20)]
    assert sched.blocks.num_cached_blocks == 0 and sched.blocks.hit_tokens == 0


def test_shared_blocks_are_counted_once_and_freed_by_the_last_holder():
    sched, clock = make_scheduler()
    sched.add_request(req("a", BASE, clock, max_tokens=1))
    run_to_end(sched)
    for rid in "bc":
        sched.add_request(req(rid, BASE, clock, max_tokens=8))
    out = sched.schedule()
    sched.update(out, {s.request.request_id: 7 for s in out.scheduled if s.samples})
    blocks = sched.blocks
    b, c = blocks.block_table("b"), blocks.block_table("c")
    assert b[:4] == c[:4] and set(b[4:]).isdisjoint(c[4:])
    assert blocks.num_used_blocks == 4 + len(b[4:]) + len(c[4:])
    sched.abort_request("b")
    assert blocks.num_used_blocks == 4 + len(c[4:])
    sched.abort_request("c")
    assert blocks.num_used_blocks == 0 and blocks.num_cached_blocks >= 5


def test_plain_free_blocks_go_before_cached_ones_and_the_oldest_cached_go_first():
    sched, clock = make_scheduler(num_blocks=12)
    sched.add_request(req("old", list(range(200, 217)), clock, max_tokens=1))   # 17 tokens: 4 full blocks + 1
    run_to_end(sched)
    sched.add_request(req("new", list(range(300, 317)), clock, max_tokens=1))
    run_to_end(sched)
    blocks = sched.blocks
    assert blocks.num_cached_blocks == 8 and blocks.num_free_blocks == 12
    # 6 blocks: the 4 plain free ones, then 2 cached ones, the oldest prompt's tail first; then new2's fifth
    # block evicts the next oldest, so of "old" only its first block is left
    sched.add_request(req("x", list(range(400, 424)), clock, max_tokens=1))
    run_to_end(sched)
    assert blocks.num_used_blocks == 0
    for rid, prompt, expect in (("new2", range(300, 317), 16), ("old2", range(200, 217), 4)):
        before = blocks.hit_tokens
        sched.add_request(req(rid, list(prompt), clock, max_tokens=1))
        run_to_end(sched)
        assert blocks.hit_tokens - before == expect, rid


def test_a_preempted_request_resumes_from_its_own_cached_blocks():
    sched, clock = make_scheduler(num_blocks=10, budget=64)
    sched.add_request(req("a", range(0, 20), clock, max_tokens=12))
    out = sched.schedule()
    sched.update(out, {"a": 7})
    request = sched.get("a")
    sched._preempt(request, clock.now())           # as memory pressure would
    assert request.num_computed_tokens == 0
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1)]


def test_reset_cache_drops_unheld_blocks():
    sched, clock = make_scheduler()
    sched.add_request(req("a", BASE, clock))
    run_to_end(sched)
    assert sched.blocks.reset_cache() == 5          # 23 computed tokens: 5 full blocks
    assert sched.blocks.num_cached_blocks == 0
    sched.add_request(req("b", BASE, clock))
    assert run_to_end(sched)[0] == [("b", 20)]


def check_invariants(sched: Scheduler) -> None:
    blocks = sched.blocks
    held: dict[int, int] = {}
    for r in sched.running + sched.waiting:
        for b in blocks.block_table(r.request_id):
            held[b] = held.get(b, 0) + 1
    assert blocks.num_used_blocks == len(held)
    assert all(blocks._refs[b] == n for b, n in held.items())
    free = set(blocks._free) | set(blocks._evictable)
    assert free.isdisjoint(held) and len(free) + len(held) == blocks.num_blocks
    assert set(blocks._by_key.values()) == set(blocks._key_of) and set(blocks._content) == set(blocks._key_of)


PROMPT = st.lists(st.integers(1, 3), min_size=1, max_size=30)   # a tiny alphabet: prompts share prefixes often


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.one_of(
    st.tuples(st.just("add"), PROMPT, st.integers(1, 12)),
    st.tuples(st.just("step"), st.integers(1, 4), st.integers(0, 3)),
    st.tuples(st.just("abort"), st.integers(0, 40), st.just(0)),
), max_size=60), num_blocks=st.integers(8, 40))
def test_no_block_leaks_and_outputs_do_not_depend_on_the_cache(ops, num_blocks):
    """Random prompts over a tiny alphabet, steps, aborts and tight memory (preemption): the invariants hold
    after every operation, everything is free at the end, and a model whose next token is a function of the
    whole sequence gives every request that finishes both ways the same answer with the cache as without it."""

    def run(caching: bool) -> dict[str, list[int]]:
        sched, clock = make_scheduler(num_blocks=num_blocks, budget=16, max_seqs=4, caching=caching)
        added: list[str] = []
        answers: dict[str, list[int]] = {}
        requests: dict[str, Request] = {}

        def model(r: Request) -> int:
            return hash(tuple(r.prompt_token_ids + r.output_token_ids)) % 5 + 1

        def step() -> None:
            out = sched.schedule()
            sched.update(out, {s.request.request_id: model(s.request) for s in out.scheduled if s.samples})
            clock.advance(0.01)

        for op, a, b in ops:
            if op == "add":
                rid = f"r{len(added)}"
                if len(a) + b >= 4 * num_blocks:
                    continue
                r = req(rid, a, clock, max_tokens=b)
                sched.add_request(r)
                added.append(rid)
                requests[rid] = r
            elif op == "step":
                for _ in range(a):
                    if sched.has_work():
                        step()
            elif added:
                sched.abort_request(added[a % len(added)])
            check_invariants(sched)
        for _ in range(10_000):
            if not sched.has_work():
                break
            step()
            check_invariants(sched)
        assert not sched.has_work() and sched.blocks.num_used_blocks == 0
        for rid, r in requests.items():
            if r.status is not RequestStatus.FINISHED_ABORTED:
                answers[rid] = r.output_token_ids
        return answers

    with_cache, without = run(True), run(False)
    both = with_cache.keys() & without.keys()       # the cache changes timing, so what an abort reaches in time
    assert {k: with_cache[k] for k in both} == {k: without[k] for k in both}


# ----- the cache-aware router ---------------------------------------------------------------------------

def worker(wid, gpu="A100-80G", **kw):
    lm = LatencyModel.from_names(gpu, "llama-2-7b")
    kw.setdefault("kv_blocks_total", lm.kv_capacity_tokens() // 16)
    return WorkerState(wid, gpu_type=gpu, latency=lm, capacity_tok_s=lm.saturated_decode_tok_s(), max_num_seqs=256,
                       **kw)


LONG = RouteContext("r", "interactive", prompt_tokens=3000, max_tokens=64, predicted_output=64.0,
                    prefix_hashes=tuple(range(1, 48)))


@pytest.mark.parametrize("history,workers,request_,expected", [
    # the worker that was sent this prompt's prefix takes the follow-up, though the other is as idle
    ([("b", LONG)], [worker("a"), worker("b")], LONG, "b"),
    # ... and not when it is far busier than the prefill the cache would save
    ([("b", LONG)], [worker("a"), worker("b", assigned_work_s=30.0)], LONG, "a"),
    # no prefix: plain capacity (the idle fast GPU)
    ([], [worker("slow", "T4"), worker("fast")], RouteContext("r", "interactive", 3000, 64, 64.0), "fast"),
    # another prompt's history does not attract it
    ([("b", RouteContext("x", prefix_hashes=(99, 98)))], [worker("a"), worker("b")], LONG, "a"),
])
def test_cache_aware_routing(history, workers, request_, expected):
    policy = make_routing("cache_aware")
    for wid, earlier in history:
        policy.index.record(wid, earlier.prefix_hashes)
    assert policy.route(request_, workers).worker_id == expected


def test_cache_aware_index_is_bounded_by_the_workers_kv():
    policy = make_routing("cache_aware")
    small = worker("a", kv_blocks_total=8, block_size=16)     # 128 tokens: about 2 of LONG's 63-token blocks
    policy.route(LONG, [small])
    assert policy.index.size("a") == 2


# ----- the multi-turn workload of `tandem bench prefix` -------------------------------------------------

def test_multi_turn_turns_resend_their_history_and_apps_share_system_prompts():
    from bench.prefix import Chats, multi_turn
    from bench.replay import prompt_token_ids

    shape = Chats(conversations=30, turns=3, apps=2, system_blocks=4, rate=5.0)
    items = multi_turn(shape, seed=1)
    assert len(items) == 90 and [i.arrival_s for i in items] == sorted(i.arrival_s for i in items)
    assert all(i.input_tokens == len(i.prefix_hashes) * shape.block_tokens for i in items)
    systems = {i.prefix_hashes[:4] for i in items}
    assert len(systems) == 2                                   # two apps' system prompts, nothing else shared
    # a later turn starts with an earlier turn's whole prompt (its history): find each turn's predecessor
    by_start = {}
    for i in items:
        by_start.setdefault(i.prefix_hashes[:5], []).append(i)
    chains = [sorted(g, key=lambda i: i.arrival_s) for g in by_start.values()]
    assert sum(len(c) for c in chains) == 90 and all(len(c) == 3 for c in chains)
    for a, b, c in chains:
        assert b.prefix_hashes[:len(a.prefix_hashes)] == a.prefix_hashes
        assert c.prefix_hashes[:len(b.prefix_hashes)] == b.prefix_hashes
        # the simulator's prompts share tokens exactly as far as the ids do
        ta, tb = prompt_token_ids(a, 0), prompt_token_ids(b, 1)
        assert tb[:len(ta)] == ta
    unshared = prompt_token_ids(replace_hashes(items[0]), 3)
    assert set(unshared).isdisjoint(prompt_token_ids(replace_hashes(items[0]), 4))


def replace_hashes(item):
    from dataclasses import replace

    return replace(item, prefix_hashes=())


@given(st.lists(st.integers(0, 9), max_size=20), st.lists(st.integers(0, 9), max_size=20), st.data())
def test_a_requests_token_slice_equals_slicing_prompt_then_output(prompt, output, data):
    """What block keys and a step's inputs read, without concatenating the two lists."""
    r = Request("r", prompt, SamplingParams(max_tokens=32), 0.0)
    for t in output:
        r.append_output(t)
    start = data.draw(st.integers(0, len(prompt) + len(output)))
    end = data.draw(st.integers(start, len(prompt) + len(output)))
    assert r.token_ids(start, end) == (prompt + output)[start:end]
