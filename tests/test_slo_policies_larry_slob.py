"""larry (memory-aware admission) and slob (prefill-first, least-padding batches), stepped by hand on a small
fake block budget with a constant step-time model."""

from __future__ import annotations

import pytest

from services.latency import LatencyModel
from workers.block_manager import BlockManager
from workers.build import assemble_engine
from workers.clock import VirtualClock
from workers.executors.sim import SimExecutor
from workers.policies import make_policy
from workers.policies.larry import LarryPolicy
from workers.policies.slob import SlobPolicy
from workers.request import Request, RequestStatus, SamplingParams, SloTarget
from workers.scheduler import Scheduler, SchedulerConfig
from tests.helpers import ids, step


class FlatLatency:
    """Every prefill and every decode step takes 10 ms."""

    def prefill_time(self, tokens: int) -> float:
        return 0.01

    def decode_time(self, batch: int, context: int) -> float:
        return 0.01


LATENCY = FlatLatency()


def setup(policy, num_blocks=64, block_size=4, budget=64, max_seqs=8, **kw):
    clock = VirtualClock()
    sched = Scheduler(SchedulerConfig(max_seqs, budget, 512), BlockManager(num_blocks, block_size, 0.0),
                      make_policy(policy, latency=LATENCY, kv_tokens=num_blocks * block_size, **kw), clock)
    return sched, clock


def add(sched, clock, rid, prompt=4, max_tokens=8, pred=(), slo=None, advance=0.001):
    r = Request(rid, [1] * prompt, SamplingParams(max_tokens=max_tokens), clock.now(), slo=slo or SloTarget(),
                predicted_lengths=tuple(pred))
    sched.add_request(r)
    clock.advance(advance)
    return r



def drain(sched, clock, limit=5000):
    """Steps until idle; the preemptions it took."""
    preempted = 0
    for _ in range(limit):
        if not sched.has_work():
            return preempted
        preempted += len(step(sched, clock).preempted)
    raise AssertionError("did not drain")


# ----- construction --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,cls", [("larry", LarryPolicy), ("slob", SlobPolicy)])
def test_both_build_by_name(name, cls):
    policy = make_policy(name, latency=LATENCY, kv_tokens=1024)
    assert isinstance(policy, cls) and policy.static_key


def test_larry_options_and_a_clear_error_without_kv_tokens():
    policy = make_policy("larry", latency=LATENCY, kv_tokens=1000, watermark=0.5, low_watermark=0.4)
    assert (policy.high, policy.low) == (500, 400)
    with pytest.raises(ValueError, match="larry' needs kv_tokens"):
        make_policy("larry", latency=LATENCY)
    with pytest.raises(ValueError, match="low_watermark"):
        make_policy("larry", latency=LATENCY, kv_tokens=1000, watermark=0.5, low_watermark=0.6)


def test_assemble_engine_hands_larry_the_kv_capacity():
    clock = VirtualClock()
    latency = LatencyModel.from_names("A100-80G", "llama-2-7b")
    engine = assemble_engine(SimExecutor(latency, clock), 100, 16, 8, 512, "larry", {}, clock)
    assert engine.scheduler.policy.kv_tokens == 1600


# ----- order ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy,options,arrivals,expected", [
    # (rid, prompt, predicted (q10, q50, q90), seconds before the next arrives) -> admitted with room for two
    ("larry", {}, [("long", 4, (80, 100, 120), 0.001), ("short", 4, (4, 5, 6), 0.001),
                   ("mid", 4, (20, 30, 40), 0.001)], ["short", "mid"]),
    ("larry", {}, [("big-prompt", 60, (4, 5, 6), 0.001), ("small", 4, (10, 20, 30), 0.001),
                   ("tiny", 4, (4, 5, 6), 0.001)], ["tiny", "small"]),          # by prompt + median output
    ("larry", {"aging_per_s": 10.0}, [("old-long", 4, (80, 100, 120), 10.0), ("new-short", 4, (4, 5, 6), 0.001),
                                      ("newer-mid", 4, (20, 30, 40), 0.001)], ["old-long", "new-short"]),
    ("larry", {"aging_per_s": 0.0}, [("old-long", 4, (80, 100, 120), 10.0), ("new-short", 4, (4, 5, 6), 0.001),
                                     ("newer-mid", 4, (20, 30, 40), 0.001)], ["new-short", "newer-mid"]),
    ("slob", {}, [("long", 4, (80, 100, 120), 0.001), ("short", 4, (4, 5, 6), 0.001),
                  ("mid", 4, (20, 30, 40), 0.001)], ["short", "mid"]),
    ("slob", {"aging_per_s": 10.0}, [("old-long", 4, (80, 100, 120), 10.0), ("new-short", 4, (4, 5, 6), 0.001),
                                     ("newer-mid", 4, (20, 30, 40), 0.001)], ["old-long", "new-short"]),
])
def test_admission_order(policy, options, arrivals, expected):
    sched, clock = setup(policy, num_blocks=256, max_seqs=2, budget=256, **options)
    for rid, prompt, pred, gap in arrivals:
        add(sched, clock, rid, prompt=prompt, max_tokens=200, pred=pred, advance=gap)
    assert ids(step(sched)) == expected


@pytest.mark.parametrize("policy,second_step", [
    ("slob", ["b"]),          # b has no first token yet: its prefill takes the whole budget before a's decode
    ("edf", ["a", "b"]),      # no SLOs: arrival order, a's decode first
])
def test_slob_puts_a_request_without_a_first_token_ahead_of_a_decoding_one(policy, second_step):
    sched, clock = setup(policy, budget=8)
    add(sched, clock, "a", prompt=4, max_tokens=50, pred=(5, 5, 5))   # would rank first by remaining work
    step(sched, clock)                                                 # a prefills and streams
    add(sched, clock, "b", prompt=20, max_tokens=50, pred=(40, 45, 50))
    assert ids(step(sched, clock)) == ["a", "b"]                       # b joins behind the running batch
    assert ids(step(sched, clock)) == second_step


@pytest.mark.parametrize("policy", ["larry", "slob"])
@pytest.mark.parametrize("triage,expected", [(True, ["ok"]), (False, ["doomed"])])
def test_a_request_that_cannot_meet_its_slo_goes_behind_a_feasible_one(policy, triage, expected):
    sched, clock = setup(policy, max_seqs=1, triage=triage)
    doomed = add(sched, clock, "doomed", pred=(2, 3, 4), slo=SloTarget("chat", ttft_s=0.001), advance=1.0)
    add(sched, clock, "ok", pred=(4, 6, 8), slo=SloTarget("chat", ttft_s=10.0))
    assert ids(step(sched, clock)) == expected                  # without triage the shorter doomed one goes first
    assert (doomed in sched.policy.late) is triage
    drain(sched, clock)
    assert doomed.num_output_tokens == 8                          # it still runs, behind


# ----- larry: memory-aware admission ---------------------------------------------------------------------
def running_of(total):
    """A running request that will hold ``total`` KV tokens at its end (its prompt, then one output token)."""
    return Request("r", [1] * (total - 1), SamplingParams(max_tokens=1), 0.0)


def test_larry_hysteresis_closes_above_the_watermark_and_reopens_below_the_low_one():
    policy = make_policy("larry", latency=LATENCY, kv_tokens=100, watermark=0.9, low_watermark=0.8)
    # projected KV of the running batch, step by step -> whether anything may join
    for projected, is_open in [(50, True), (95, False), (85, False), (79, True), (85, True), (91, False)]:
        running = [running_of(projected)]
        policy.plan(0.0, running, [])
        assert policy.admission_open(0.0, running) is is_open, projected


@pytest.mark.parametrize("running,candidates,admitted", [
    # projected KV of the batch, candidates' projected needs (in order) -> which join (watermark 90 of 100)
    (50, [45, 30, 10, 20], [False, True, True, False]),     # 95 > 90; 80; 90; 110 > 90
    (0, [120, 10], [True, False]),                           # an empty batch always takes its first
    (89, [2], [False]),
])
def test_larry_admits_only_under_the_watermark(running, candidates, admitted):
    policy = make_policy("larry", latency=LATENCY, kv_tokens=100, watermark=0.9, low_watermark=0.8)
    batch = [running_of(running)] if running else []
    policy.plan(0.0, batch, [])
    policy.admission_open(0.0, batch)                    # as the scheduler asks before any admit
    assert [policy.admit(running_of(n), 0.0, batch) for n in candidates] == admitted


def test_larry_stops_at_the_watermark_then_admits_the_rest_as_the_batch_drains():
    # 256 KV tokens, watermark 230: each request projects 4 + 40 = 44 tokens, so five join, not six
    sched, clock = setup("larry", num_blocks=64, block_size=4, budget=256, max_seqs=8)
    reqs = [add(sched, clock, f"r{i}", prompt=4, max_tokens=40, pred=(40, 40, 40)) for i in range(7)]
    assert ids(step(sched, clock)) == [f"r{i}" for i in range(5)]
    assert sched.num_waiting == 2
    assert drain(sched, clock) == 0
    assert all(r.status is RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 40 for r in reqs)
    assert sched.blocks.num_used_blocks == 0


@pytest.mark.parametrize("policy", ["fcfs", "larry"])
def test_larry_preempts_less_than_fcfs_on_long_outputs_and_a_tight_budget(policy):
    sched, clock = setup(policy, num_blocks=48, block_size=4, budget=64, max_seqs=8)
    reqs = [add(sched, clock, f"r{i}", prompt=8, max_tokens=60, pred=(50, 55, 60)) for i in range(12)]
    preempted = drain(sched, clock)
    assert all(r.num_output_tokens == 60 for r in reqs)
    if policy == "fcfs":
        assert preempted >= 10
    else:
        assert preempted == 0


# ----- slob: least-padding batches -----------------------------------------------------------------------
def mixed(sched, clock, n=16):
    for i in range(n):
        add(sched, clock, f"r{i}", prompt=4 if i % 2 == 0 else 40, max_tokens=4, pred=(4, 4, 4))


def test_slob_pad_aware_admits_similar_prompt_lengths_together():
    sched, clock = setup("slob", num_blocks=512, budget=512, max_seqs=4)
    mixed(sched, clock)
    assert ids(step(sched, clock)) == ["r0", "r2", "r4", "r6"]     # the 40-token prompts wait
    assert sched.policy.padded_tokens == 0


@pytest.mark.parametrize("pad_aware", [True, False])
def test_slob_reports_padding_waste(pad_aware):
    sched, clock = setup("slob", num_blocks=512, budget=512, max_seqs=4, pad_aware=pad_aware)
    mixed(sched, clock)
    drain(sched, clock)
    policy = sched.policy
    assert policy.useful_tokens == 8 * 4 + 8 * 40
    if pad_aware:
        assert policy.padding_waste == 0.0
    else:   # each step of 2 short + 2 long pads the short ones by 36 tokens
        assert policy.padded_tokens == 4 * 2 * 36
        assert policy.padding_waste == pytest.approx(288 / (288 + 352))
