"""A worker's saturated throughput for a length mix, measured by running the real engine in virtual time.

The worker's own ``Engine`` around the sim executor (its step time, its stop rule), driven closed loop so the
engine always has more work than it can admit; time only moves by predicted step times, so a minute of
engine time takes a fraction of a second. This is the "profiled saturated throughput" behind the cluster
capacity bound: what one worker of that type does at best with these requests, including the chunked
prefill and KV limits a roofline formula ignores.
"""

from __future__ import annotations

from typing import Sequence

from services.latency import LatencyModel
from workers.build import assemble_engine
from workers.clock import VirtualClock
from workers.executors.sim import SimExecutor
from workers.request import Request, SamplingParams


def engine_saturated_throughput(latency: LatencyModel, mix: Sequence[tuple[int, int]], *, max_num_seqs: int = 256,
                                max_num_batched_tokens: int = 2048, block_size: int = 16,
                                warmup_s: float = 30.0, window_s: float = 120.0, policy: str = "fcfs") -> float:
    """Output tokens per engine-second over ``window_s`` after ``warmup_s``, closed loop over ``mix``."""
    clock = VirtualClock()
    executor = SimExecutor(latency, clock)
    blocks = max(1, latency.kv_capacity_tokens() // block_size)
    fitting = [(i, o) for i, o in mix if -(-(i + o) // block_size) <= blocks and i + o < latency.max_model_len]
    if not fitting:
        return 0.0
    counted = 0
    k = 0

    def on_output(output: object) -> None:
        nonlocal counted
        if clock.now() > warmup_s:
            counted += 1
        if output.finished:  # type: ignore[attr-defined]
            submit()

    engine = assemble_engine(executor, blocks, block_size, max_num_seqs, max_num_batched_tokens, policy, {}, clock,
                             on_output=on_output, recent_steps=0)

    def submit() -> None:
        nonlocal k
        n_in, n_out = fitting[k % len(fitting)]
        engine.submit(Request(f"p{k}", [1] * n_in, SamplingParams(max_tokens=n_out, ignore_eos=True), clock.now()))
        k += 1

    for _ in range(max_num_seqs + 8):
        submit()
    while clock.now() < warmup_s + window_s:
        out = engine.begin_step()
        if out is None:
            break
        start = clock.now()
        clock.advance(executor.step_time(out))
        engine.end_step(out, executor.sample(out), start, clock.now() - start)
    return counted / window_s
