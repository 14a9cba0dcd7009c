"""The SLO-aware engine policies (edf, sage, sa_slo) stepped by hand, the length distribution they rank by,
and the balancer's binding in front of engines that triage."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balancer.queue import GlobalQueue, admit, holds_queue
from balancer.registry import Registry
from balancer.route_context import RouteContext
from balancer.routing import make_policy as make_routing
from services.engine_traits import TRIAGING_ENGINE_POLICIES
from services.length_distribution import LengthDistribution
from workers.block_manager import BlockManager
from workers.clock import VirtualClock
from workers.policies import make_policy, policy_names
from workers.policies.base import _POLICIES
from workers.policies.sage import gittins_index
from workers.policies.slo_aware import SloAwarePolicy
from workers.request import Request, SamplingParams, SloTarget
from workers.scheduler import Scheduler, SchedulerConfig
from workers.true_lengths import TrueLengths
from tests.helpers import ids, step

SLO_POLICIES = ("edf", "sage", "sa_slo")


class FlatLatency:
    """10 ms a decode step, 1 ms per 100 prompt tokens of prefill."""

    def prefill_time(self, tokens: int) -> float:
        return 0.01 + tokens / 100_000

    def decode_time(self, batch: int, context: int) -> float:
        return 0.01


def setup(policy, max_seqs=2, num_blocks=256, budget=256, **kw):
    clock = VirtualClock()
    sched = Scheduler(SchedulerConfig(max_seqs, budget, 4096), BlockManager(num_blocks, 4, 0.0),
                      make_policy(policy, latency=FlatLatency(), **kw), clock)
    return sched, clock


def add(sched, clock, rid, prompt=8, max_tokens=64, slo=SloTarget("x", e2e_s=10.0), lengths=(10, 20, 40),
        advance=0.001, upstream=0.0):
    r = Request(rid, [1] * prompt, SamplingParams(max_tokens=max_tokens), clock.now(), slo=slo,
                predicted_lengths=lengths, upstream_s=upstream)
    sched.add_request(r)
    clock.advance(advance)
    return r



# ----- the distribution ------------------------------------------------------------------------------------
@given(q=st.lists(st.floats(1, 3000), min_size=3, max_size=3), cap=st.integers(1, 4096), produced=st.integers(0, 5000))
def test_length_distribution_is_a_distribution(q, cap, produced):
    d = LengthDistribution.from_quantiles(sorted(q), cap)
    assert d.cdf(-1) == 0.0 and d.cdf(d.upper + 1) == 1.0 and d.upper <= max(cap, 1)
    xs = [d.quantile(p / 10) for p in range(11)]
    assert xs == sorted(xs)
    rest = d.remaining(produced)
    assert rest.quantile(0.0) >= 0 and rest.cdf(rest.upper) == 1.0 and rest.mean() >= 0


@pytest.mark.parametrize("lengths,cap,median,upper", [
    ((20, 129, 450), 2048, 129, 900),         # the tail ends at twice the 90th percentile
    ((20, 129, 450), 300, 129, 300),          # never beyond the cap
    ((), 100, 50, 100),                       # nothing predicted: uniform up to the cap
])
def test_length_distribution_reads_the_quantiles(lengths, cap, median, upper):
    d = LengthDistribution.from_quantiles(lengths, cap)
    assert d.quantile(0.5) == pytest.approx(median, abs=1) and d.upper == upper


def test_remaining_length_is_conditioned_on_tokens_produced():
    d = LengthDistribution.from_quantiles((20, 129, 450), 2048)
    rest = d.remaining(129)
    assert rest.cdf(450 - 129) == pytest.approx(0.8)       # P(X <= 450 | X > 129) = 0.4 / 0.5
    assert d.remaining(5000).upper <= 2048                 # past the tail: a bounded guess, not nothing


# ----- order and triage --------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", SLO_POLICIES)
def test_a_request_that_cannot_make_it_goes_behind_those_that_can(policy):
    sched, clock = setup(policy, max_seqs=1)
    hopeless = add(sched, clock, "hopeless", slo=SloTarget("i", ttft_s=0.001, tpot_s=0.1))
    clock.advance(0.01)                                     # its first token is already late
    add(sched, clock, "fine", slo=SloTarget("i", ttft_s=1.0, tpot_s=0.1))
    assert ids(step(sched)) == ["fine"]
    assert hopeless in sched.policy.late and hopeless.status.value == "waiting"
    while sched.has_work():                                 # it still runs, and finishes
        step(sched)
    assert hopeless.num_output_tokens == 64


@pytest.mark.parametrize("policy", SLO_POLICIES)
def test_the_slo_clock_starts_at_the_client_not_the_engine(policy):
    sched, clock = setup(policy, max_seqs=1)
    waited = add(sched, clock, "waited", slo=SloTarget("c", e2e_s=2.0), upstream=2.5)   # 2.5 s at the balancer
    add(sched, clock, "fresh", slo=SloTarget("c", e2e_s=2.0))
    assert ids(step(sched)) == ["fresh"] and waited in sched.policy.late


def test_edf_counts_upstream_time_in_the_deadline():
    sched, clock = setup("edf", max_seqs=1)
    add(sched, clock, "fresh", slo=SloTarget("c", e2e_s=2.0))
    add(sched, clock, "waited", slo=SloTarget("c", e2e_s=2.0), upstream=1.0)
    assert ids(step(sched)) == ["waited"]


def test_edf_orders_by_deadline():
    sched, clock = setup("edf", max_seqs=1)
    add(sched, clock, "batch", slo=SloTarget("b", e2e_s=60.0))
    add(sched, clock, "code", slo=SloTarget("c", e2e_s=2.0))
    add(sched, clock, "chat", slo=SloTarget("i", ttft_s=1.0, tpot_s=0.1))
    assert ids(step(sched)) == ["chat"]


@pytest.mark.parametrize("short,long,expected", [
    ((5, 10, 20), (200, 400, 800), "short"),               # fewer predicted tokens: smaller index
    ((200, 400, 800), (5, 10, 20), "long"),
])
def test_sage_runs_the_smallest_gittins_index_first(short, long, expected):
    sched, clock = setup("sage", max_seqs=1)
    add(sched, clock, "long", lengths=long, max_tokens=2048)
    add(sched, clock, "short", lengths=short, max_tokens=2048)
    assert ids(step(sched)) == [expected]


def test_gittins_index_counts_memory_and_conditions_on_progress():
    d = LengthDistribution.from_quantiles((10, 100, 400), 2048)
    assert gittins_index(d, 4000, 0) > gittins_index(d, 10, 0)          # a long prompt holds memory longer
    fresh, survived = gittins_index(d, 100, 0), gittins_index(d.remaining(300), 100, 300)
    assert survived > fresh          # having outlived most of the distribution, its expected rest is longer


def test_sage_recomputes_its_index_at_bucket_boundaries():
    sched, clock = setup("sage", max_seqs=1)
    r = add(sched, clock, "r", lengths=(10, 100, 400), max_tokens=2048)
    policy = sched.policy
    first = policy.index(r)
    for _ in range(40):
        step(sched)
    assert r.num_output_tokens == 40 and policy.index(r) != first


def test_sa_slo_search_keeps_the_head_feasible_and_stays_deterministic():
    def run():
        sched, clock = setup("sa_slo", max_seqs=4, seed=1)
        for i in range(12):
            add(sched, clock, f"r{i}", slo=SloTarget("c", e2e_s=0.5 + 0.1 * (i % 3)), lengths=(5, 10 + i, 30))
        requests = list(sched.waiting)
        while sched.has_work():
            step(sched)
        order = [r.request_id for r in sorted(requests, key=lambda r: (r.first_scheduled_time, r.request_id))]
        return order, sched.policy.searches

    first, searches = run()
    assert searches > 0 and sorted(set(first)) == sorted(f"r{i}" for i in range(12))
    assert run()[0] == first                                # a move budget, not a wall-clock box


def test_clairvoyant_twin_plans_by_the_true_length():
    truths = TrueLengths()
    clock = VirtualClock()
    policy = make_policy("sage", latency=FlatLatency(), true_lengths=truths, clairvoyant=True)
    r = Request("r", [1] * 8, SamplingParams(max_tokens=2048), 0.0, predicted_lengths=(5, 10, 20))
    truths.set("r", 1500)
    assert policy.distribution(r).quantile(0.5) == pytest.approx(1500, abs=1)
    assert make_policy("sage", latency=FlatLatency()).distribution(r).quantile(0.5) == pytest.approx(10)
    assert make_policy("sage", latency=FlatLatency(), true_lengths=truths).true_lengths is None   # not asked for
    with pytest.raises(ValueError, match="clairvoyant needs replayed true lengths"):
        make_policy("sage", latency=FlatLatency(), clairvoyant=True)
    del clock


def test_slo_policies_need_a_latency_model():
    with pytest.raises(ValueError, match="needs latency"):
        make_policy("edf")


def test_the_balancer_knows_which_engine_policies_triage():
    triaging = {name for name in policy_names() if issubclass(_POLICIES._classes[name], SloAwarePolicy)}
    assert triaging == set(TRIAGING_ENGINE_POLICIES)


# ----- the balancer in front of them ------------------------------------------------------------------------
def _registry(engine_policy):
    reg = Registry(lambda: 0.0, timeout_s=math.inf)
    for wid in ("w0", "w1"):
        reg.register(wid, address="x", model="m", gpu_type="A10", max_model_len=4096, kv_blocks_total=8,
                     block_size=16, engine_policy=engine_policy, max_num_seqs=1)
        reg.report(wid, running=1, waiting=0, kv_blocks_used=8, kv_blocks_free=0, step_time_ms=30.0,
                   pending_prefill_tokens=0, decode_context_tokens=100, iterations=1, draining=False)
    return reg


@pytest.mark.parametrize("engine,options,binds", [
    ("fcfs", {}, False),                        # full workers: a late-binding policy queues in front of fcfs
    ("sage", {}, True),                         # ... but binds at once in front of engines that triage
    ("sage", {"late_binding": True}, False),    # unless the cluster file asks for the queue
    ("fcfs", {"late_binding": False}, True),
])
def test_admission_binds_at_once_in_front_of_triaging_engines(engine, options, binds):
    reg = _registry(engine)
    policy = make_routing("capacity", **options)
    queue = GlobalQueue(16)
    for i in range(2):                          # each worker already holds one request and its KV
        admit(make_routing("capacity", late_binding=False), reg, queue, RouteContext(f"old{i}", prompt_tokens=100),
              reg.routable(), 0.0)
    ctx = RouteContext("r", "interactive", prompt_tokens=100, max_tokens=100, ttft_ms=1000, tpot_ms=100)
    decision = admit(policy, reg, queue, ctx, reg.routable(), 0.0)
    assert (decision.worker is not None) is binds and holds_queue(policy, reg.routable()) is not binds


def test_slack_queue_puts_requests_past_their_deadline_last():
    now = [0.0]
    queue = GlobalQueue(16, order="slack", clock=lambda: now[0])
    old, _ = queue.push(RouteContext("old", ttft_ms=1000), frozenset(), deadline=1.0)
    new, _ = queue.push(RouteContext("new", ttft_ms=1000), frozenset(), deadline=5.0)
    assert queue.ordered() == [old, new]
    now[0] = 2.0                                            # old can no longer make it
    assert queue.ordered() == [new, old]
    with pytest.raises(ValueError, match="needs the balancer's clock"):
        GlobalQueue(16, order="slack")


@pytest.mark.parametrize("loads,levels", [
    ([0.1, 0.6, 0.4, 0.2], ["light", "medium", "medium", "light"]),      # down only below 0.25
    ([3.0, 1.5, 0.9, 0.1], ["heavy", "heavy", "medium", "light"]),        # jumps up, steps down
])
def test_adaptive_engine_switches_levels_with_hysteresis(loads, levels):
    from workers.policies.adaptive import LEVELS
    policy = make_policy("adaptive", latency=FlatLatency())
    seen = []
    for load in loads:
        policy.update_level(load)
        seen.append(LEVELS[policy.level])
    assert seen == levels


def test_adaptive_engine_orders_by_arrival_when_light_and_by_cost_when_heavy():
    policy = make_policy("adaptive", latency=FlatLatency())
    long = Request("long", [1] * 8, SamplingParams(max_tokens=2048), 0.0, predicted_lengths=(200, 400, 800))
    short = Request("short", [1] * 8, SamplingParams(max_tokens=2048), 1.0, predicted_lengths=(5, 10, 20))
    policy.level = 0
    assert policy.key(long, 2.0) < policy.key(short, 2.0)            # light: first come, first served
    policy.level = 2
    assert policy.key(short, 2.0) < policy.key(long, 2.0)            # heavy: cheapest expected cost first


def test_adaptive_engine_re_sorts_its_queue_when_the_level_changes():
    sched, clock = setup("adaptive", max_seqs=1)
    first = add(sched, clock, "first", max_tokens=4, lengths=(4, 4, 4))
    step(sched)                                               # one waiting, none running: medium
    add(sched, clock, "long", lengths=(200, 400, 800), max_tokens=30)
    add(sched, clock, "short", lengths=(5, 10, 20), max_tokens=30)
    order = []
    while sched.has_work():
        order += [s.request.request_id for s in step(sched).scheduled if s.request.first_scheduled_time == clock.now()]
    assert first.is_finished and order.index("short") < order.index("long")
    assert sched.policy.switches >= 1


# ----- refusing sheddable lost causes -----------------------------------------------------------------------
@pytest.mark.parametrize("refuse,refuse_late,sheddable,refused", [
    (True, False, True, True),      # a sheddable request that can no longer make it is refused before it runs
    (True, False, False, False),    # one that is not sheddable is kept (behind the others) and finishes
    (False, False, True, False),    # refusing is the policy's option
    (False, True, False, True),     # refuse_late: any class that turned late before it ran is refused
    (False, True, True, True),
])
def test_triage_refuses_late_sheddable_requests_when_asked(refuse, refuse_late, sheddable, refused):
    sched, clock = setup("sage", max_seqs=1, refuse_sheddable=refuse, refuse_late=refuse_late)
    hopeless = add(sched, clock, "hopeless", slo=SloTarget("batch", e2e_s=0.001, sheddable=sheddable))
    clock.advance(0.01)
    out = step(sched)
    assert (out.refused == [hopeless]) is refused
    assert (hopeless.status.value == "refused") is refused and (sched.get("hopeless") is None) is refused
    while sched.has_work():
        step(sched)
    assert hopeless.is_finished and sched.blocks.num_used_blocks == 0


def test_a_refused_request_reaches_its_reader_as_refused():
    import asyncio

    from workers.build import assemble_engine
    from workers.executors.sim import SimExecutor
    from services.latency import LatencyModel

    async def run():
        clock = VirtualClock()
        executor = SimExecutor(LatencyModel.from_names("A10", "llama-2-7b"), clock)
        engine = assemble_engine(executor, 256, 16, 8, 512, "sage", {"refuse_sheddable": True}, clock)
        request = Request("r", [1] * 16, SamplingParams(max_tokens=8), 0.0,
                          slo=SloTarget("batch", e2e_s=0.001, sheddable=True), upstream_s=1.0)
        stream = engine.add_request(request)
        assert engine.begin_step() is None                  # nothing left to run: it was refused
        chunk = await stream.next_chunk()
        return chunk

    chunk = asyncio.run(run())
    assert chunk.finished and chunk.finish_reason == "refused" and not chunk.token_ids


def test_the_balancer_prices_work_by_the_whole_distribution():
    from balancer.estimate import expected_output_tokens, output_tokens

    skewed = RouteContext("r", prompt_tokens=100, max_tokens=2048, predicted_output=100.0,
                          predicted_lengths=(50.0, 100.0, 1000.0))
    narrow = RouteContext("r", prompt_tokens=100, max_tokens=2048, predicted_output=100.0,
                          predicted_lengths=(90.0, 100.0, 110.0))
    assert output_tokens(skewed) == output_tokens(narrow) == 100.0            # the same typical answer ...
    assert expected_output_tokens(skewed) > 2 * expected_output_tokens(narrow)  # ... but a long tail costs more


def test_refuse_late_reaches_past_the_triage_window():
    """A late request its rank keeps at the back (beyond the window checked every step) is refused at the next
    full re-check, not left waiting unchecked."""
    sched, clock = setup("sage", max_seqs=1, refuse_late=True)
    add(sched, clock, "running", max_tokens=200, lengths=(200, 200, 200))
    step(sched)
    queued = [add(sched, clock, f"q{i}", max_tokens=20, lengths=(20, 20, 20)) for i in range(12)]
    hopeless = add(sched, clock, "hopeless", max_tokens=2000, lengths=(2000, 2000, 2000),
                   slo=SloTarget("code", e2e_s=0.05))
    clock.advance(0.1)
    refused = []
    for _ in range(40):
        refused += step(sched).refused
    assert hopeless in refused and not any(q in refused for q in queued[:2])
