"""A worker's saturated throughput for a length mix, measured by running the real engine in virtual time.

The real ``Scheduler`` and ``BlockManager`` with the sim executor's latency model, driven closed loop so the
engine always has more work than it can admit; time only moves by predicted step times, so a minute of
engine time takes a fraction of a second. This is the "profiled saturated throughput" behind the cluster
capacity bound: what one worker of that type does at best with these requests, including the chunked
prefill and KV limits a roofline formula ignores.
"""

from __future__ import annotations

from typing import Sequence

from services.latency import BatchShape, LatencyModel
from workers.block_manager import BlockManager
from workers.clock import VirtualClock
from workers.policies import make_policy
from workers.request import Request, SamplingParams
from workers.scheduler import Scheduler, SchedulerConfig


def engine_saturated_throughput(latency: LatencyModel, mix: Sequence[tuple[int, int]], *, max_num_seqs: int = 256,
                                max_num_batched_tokens: int = 2048, block_size: int = 16,
                                warmup_s: float = 30.0, window_s: float = 120.0, policy: str = "fcfs") -> float:
    """Output tokens per engine-second over ``window_s`` after ``warmup_s``, closed loop over ``mix``."""
    clock = VirtualClock()
    blocks = max(1, latency.kv_capacity_tokens() // block_size)
    sched = Scheduler(SchedulerConfig(max_num_seqs, max_num_batched_tokens, latency.model.max_model_len),
                      BlockManager(blocks, block_size), make_policy(policy), clock)
    fitting = [(i, o) for i, o in mix if -(-(i + o) // block_size) <= blocks and i + o < latency.model.max_model_len]
    if not fitting:
        return 0.0
    k = 0

    def submit() -> None:
        nonlocal k
        n_in, n_out = fitting[k % len(fitting)]
        sched.add_request(Request(f"p{k}", [1] * n_in, SamplingParams(max_tokens=n_out, ignore_eos=True), clock.now()))
        k += 1

    for _ in range(max_num_seqs + 8):
        submit()
    counted = 0
    while clock.now() < warmup_s + window_s:
        out = sched.schedule()
        if not out.scheduled:
            break
        step = latency.step_time(BatchShape.of((s.num_new_tokens, s.context_before) for s in out.scheduled))
        clock.advance(step)
        results = sched.update(out, {s.request.request_id: 7 for s in out.scheduled if s.samples})
        if clock.now() > warmup_s:
            counted += len(results)
        for r in results:
            if r.finished:
                submit()
    return counted / window_s
