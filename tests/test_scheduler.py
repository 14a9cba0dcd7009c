"""Scheduler tests in vLLM's style: a small fake block budget, stepped by hand with fake model outputs."""

from __future__ import annotations

import asyncio
import random

import pytest

from services.latency import LatencyModel
from workers.block_manager import BlockManager
from workers.clock import VirtualClock
from workers.engine import Engine
from workers.executors.sim import SimExecutor
from workers.policies import make_policy
from workers.request import Request, RequestStatus, SamplingParams
from workers.scheduler import Scheduler, SchedulerConfig
from workers.tokenizer import Detokenizer, SimTokenizer

EOS = 0


def make_scheduler(num_blocks=64, block_size=4, budget=32, max_seqs=8, max_model_len=256, watermark=0.0):
    clock = VirtualClock()
    sched = Scheduler(SchedulerConfig(max_seqs, budget, max_model_len), BlockManager(num_blocks, block_size, watermark),
                      make_policy("fcfs"), clock)
    return sched, clock


def req(rid, prompt_len, clock, max_tokens=8, **kw):
    return Request(rid, list(range(10, 10 + prompt_len)), SamplingParams(max_tokens=max_tokens, **kw), clock.now(),
                   eos_token_id=EOS)


def step(sched, token=7):
    out = sched.schedule()
    results = sched.update(out, {s.request.request_id: token for s in out.scheduled if s.samples})
    return out, results


def test_batch_composition_decodes_first_then_chunked_prefill():
    sched, clock = make_scheduler(budget=32)
    for rid, n in (("a", 10), ("b", 20), ("c", 30)):
        sched.add_request(req(rid, n, clock))
        clock.advance(0.001)
    out, results = step(sched)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 10), ("b", 20), ("c", 2)]
    assert {r.request.request_id for r in results} == {"a", "b"}          # c's chunk samples nothing yet
    out, _ = step(sched)
    # running decodes first (a, b: one token each), then the rest of c's prompt fills the budget
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 1), ("c", 28)]
    assert out.num_decode_tokens == 2 and out.num_prefill_tokens == 28


def test_admission_stops_at_max_num_seqs():
    sched, clock = make_scheduler(max_seqs=2)
    for i in range(4):
        sched.add_request(req(f"r{i}", 4, clock))
    out, _ = step(sched)
    assert len(out.scheduled) == 2 and sched.num_waiting == 2


def test_preempts_latest_arrival_when_blocks_run_out():
    sched, clock = make_scheduler(num_blocks=10, block_size=4, max_seqs=4)
    first, second = req("first", 16, clock, max_tokens=100), None
    sched.add_request(first)
    clock.advance(0.01)
    second = req("second", 16, clock, max_tokens=100)
    sched.add_request(second)
    step(sched)                                   # both prefill: 4 blocks each, 8 of 10 used
    assert sched.blocks.num_used_blocks == 8
    preempted = []
    for _ in range(8):
        out, _ = step(sched)
        preempted += out.preempted
        if preempted:
            break
    assert preempted == [second]
    assert second.status is RequestStatus.PREEMPTED and second.num_computed_tokens == 0
    assert second.num_preemptions == 1 and sched.waiting == [second]
    assert sched.blocks.block_table("second") == []
    # the survivor keeps running and the victim resumes (recomputing prompt and outputs) once room returns
    assert first.status is RequestStatus.RUNNING


def test_stop_conditions():
    sched, clock = make_scheduler()
    sched.add_request(req("eos", 4, clock))
    sched.add_request(req("len", 4, clock, max_tokens=2))
    sched.add_request(req("stoptok", 4, clock, stop_token_ids=(9,)))
    sched.add_request(req("ignore", 4, clock, max_tokens=3, ignore_eos=True))
    out = sched.schedule()
    sched.update(out, {"eos": EOS, "len": 5, "stoptok": 9, "ignore": EOS})
    assert sched.get("eos") is None and sched.get("stoptok") is None
    out = sched.schedule()
    results = sched.update(out, {"len": 5, "ignore": EOS})
    reasons = {r.request.request_id: r.finish_reason for r in results}
    assert reasons["len"] == "length" and reasons["ignore"] is None
    out = sched.schedule()
    results = sched.update(out, {"ignore": EOS})
    assert results[0].finish_reason == "length" and results[0].request.num_output_tokens == 3


def test_abort_during_a_step_frees_blocks_and_is_skipped_by_update():
    sched, clock = make_scheduler()
    r = req("x", 12, clock)
    sched.add_request(r)
    out = sched.schedule()
    assert sched.blocks.num_used_blocks == 3
    assert sched.abort_request("x") is r
    assert sched.blocks.num_used_blocks == 0 and r.status is RequestStatus.FINISHED_ABORTED
    assert sched.update(out, {"x": 3}) == []
    assert sched.abort_request("x") is None


@pytest.mark.parametrize("seed", range(5))
def test_blocks_never_leak_under_random_arrivals_aborts_and_preemption(seed):
    rng = random.Random(seed)
    sched, clock = make_scheduler(num_blocks=40, block_size=4, budget=24, max_seqs=6)
    live: list[str] = []
    for i in range(60):
        sched.add_request(req(f"r{i}", rng.randint(1, 30), clock, max_tokens=rng.randint(1, 20)))
        live.append(f"r{i}")
        for _ in range(rng.randint(0, 3)):
            step(sched, token=rng.randint(1, 99))
            assert 0 <= sched.blocks.num_used_blocks <= sched.blocks.num_blocks
        if rng.random() < 0.2:
            sched.abort_request(rng.choice(live))
        clock.advance(0.01)
    while sched.has_work():
        step(sched, token=rng.randint(1, 99))
    assert sched.blocks.num_used_blocks == 0
    assert sched.num_finished + sched.num_aborted == 60


def test_request_larger_than_the_window_is_refused():
    sched, clock = make_scheduler(max_model_len=16)
    with pytest.raises(ValueError, match="context window"):
        sched.add_request(req("big", 16, clock))


def test_detokenizer_cuts_text_at_a_stop_string():
    tok = SimTokenizer()
    words = [tok.placeholder_token(3, k) for k in range(12)]
    full = tok.decode(words)
    stop_word = full.split()[4]
    det = Detokenizer(tok, stop=(stop_word,))
    text, stopped = "", False
    for k in range(1, len(words) + 1):
        new, stopped = det.add(words[:k])
        text += new
        if stopped:
            break
    assert stopped and stop_word not in text and full.startswith(text)


def test_engine_runs_many_requests_on_virtual_time_without_leaks():
    async def main():
        clock = VirtualClock()
        executor = SimExecutor(LatencyModel.from_names("A10", "llama-2-7b"), clock)
        sched = Scheduler(SchedulerConfig(16, 256, 4096), BlockManager(60, 16), make_policy("fcfs"), clock)
        engine = Engine(sched, executor, clock)
        task = asyncio.create_task(engine.run())

        async def one(i):
            r = Request(f"r{i}", executor.tokenizer.encode("w " * (20 + 7 * i)), SamplingParams(max_tokens=30),
                        clock.now(), eos_token_id=executor.tokenizer.eos_token_id)
            stream = engine.add_request(r)
            tokens = []
            while True:
                chunk = await stream.next_chunk()
                tokens += chunk.token_ids
                if chunk.finished:
                    return r, tokens, chunk.finish_reason

        results = await asyncio.gather(*(one(i) for i in range(24)))
        engine.stop()
        await task
        return sched, results

    sched, results = asyncio.run(main())
    assert all(reason == "length" and len(tokens) == 30 for _, tokens, reason in results)
    assert all(r.arrival_time <= r.first_scheduled_time <= r.first_token_time <= r.finished_time for r, *_ in results)
    assert sum(r.num_preemptions for r, *_ in results) > 0     # 60 blocks of 16 cannot hold 24 requests at once
    assert sched.blocks.num_used_blocks == 0
