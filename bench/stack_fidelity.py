"""Whole-stack simulator fidelity: the default local stack (gateway, balancer, profiler, three sim workers of
uneven speed) against the simulator, on the Azure conversation trace at x1, x2 and x4 of its rate.

``python -m bench.stack_fidelity`` starts one local stack of the embedded default cluster file and reuses it
for everything:

1. **Idle probes** measure what the serving stack costs beyond the latency model's predicted forward time, never
   fitted to the comparison runs. Per worker, straight to its ``Worker/Generate``: single requests one at a time
   (TPOT beyond ``decode_time(1, context)``: the engine loop's cost per step) and bursts of eight at once (TPOT
   beyond ``decode_time(8, context)``: the cost of each further sequence in a step). Through the gateway: single
   requests one at a time, whose TTFT beyond ``prefill_time(prompt)`` and one step's overhead is the request's way
   in and the first token's way out (gateway hop, length prediction, routing, worker intake, relays).
2. **Live replays** of each rate scale through the gateway, open loop, with a pause for the workers to go idle
   in between.
3. **Simulations** of the same workloads with the measured overheads, and with none (the simulator as it was),
   both from the same state the live stack had: the Profiler's length history holds the earlier scales'
   completions (the stack is reused), so each simulation's predictor is warmed with the same completions.

The table compares TTFT p50/p90, TPOT p50 and E2E p50 (``bench.metrics.summarize``); JSON goes to
``bench/results/stack_fidelity.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import grpc
from rich.console import Console
from rich.table import Table

from bench.metrics import RequestRecord, summarize
from bench.replay import ReplayItem, prompt_of, replay
from bench.report import write_json
from bench.scenario import Scenario, Source, build_workload
from bench.simulator import Simulator
from services.catalog import model as model_spec
from services.cluster import ClusterSpec, load_cluster
from services.latency import LatencyModel
from services.rpc import balancer_pb2, balancer_pb2_grpc, common_pb2, worker_pb2, worker_pb2_grpc

METRICS = ("ttft_ms_p50", "ttft_ms_p90", "tpot_ms_p50", "e2e_ms_p50")
TOLERANCE = 0.10
PROBE_CLASS = "code"            # idle probes stay out of the interactive class's length history
PROBE_PROMPT, PROBE_OUTPUT = 200, 32


# ----- idle probes -------------------------------------------------------------------------------------------
@dataclass
class Timing:
    sent: float
    token_times: list[float]

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.sent

    @property
    def tpot(self) -> float:
        t = self.token_times
        return (t[-1] - t[0]) / (len(t) - 1)


async def _direct(address: str, n_in: int, n_out: int, offsets: Sequence[float]) -> list[Timing]:
    """Requests straight to a worker's Generate, each sent at its offset; client-side token times."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        start = time.perf_counter()

        async def one(k: int, offset: float) -> Timing:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            request = worker_pb2.WorkerGenerateRequest(
                request_id=f"probe-{os.getpid()}-{time.monotonic_ns()}-{k}", prompt=prompt_of(n_in),
                sampling=common_pb2.SamplingParams(max_tokens=n_out, temperature=0.0, top_p=1.0),
                slo=common_pb2.SloSpec(slo_class=PROBE_CLASS, e2e_ms=2000),
                replay_truth=common_pb2.ReplayTruth(output_tokens=n_out))
            sent, times = time.perf_counter(), []
            async for reply in stub.Generate(request, timeout=60):
                times.extend([time.perf_counter()] * len(reply.token_ids))
            return Timing(sent, times)

        return list(await asyncio.gather(*(one(k, t) for k, t in enumerate(offsets))))


def _spacing(lm: LatencyModel, n_in: int, n_out: int) -> float:
    """Time between sequential probes: the answer's predicted time, doubled, plus a margin (never overlapping)."""
    return 2 * (lm.prefill_time(n_in) + n_out * lm.decode_time(1, n_in + n_out)) + 0.1


def _decode_pred(lm: LatencyModel, batch: int, n_in: int, n_out: int) -> float:
    """Predicted mean gap between tokens 2..n (decode time is linear in context: its value at the mean context)."""
    return lm.decode_time(batch, n_in + n_out // 2)


def measure_overheads(stack: object, cluster: ClusterSpec, singles: int = 10, bursts: int = 3,
                      burst_size: int = 8, console: Console | None = None) -> dict:
    """The stack's costs beyond the latency model, from idle probes only (see the module docstring)."""
    console = console or Console(stderr=True)
    n_in, n_out = PROBE_PROMPT, PROBE_OUTPUT
    per_worker: dict[str, dict[str, float]] = {}
    for spec in cluster.workers:
        lm = LatencyModel.from_names(spec.gpu_type, spec.model)
        gap = _spacing(lm, n_in, n_out)
        address = stack.worker_address(spec.id)
        with console.status(f"probing {spec.id} at idle ..."):
            asyncio.run(_direct(address, n_in, n_out, [0.0]))                     # warm the channel and loop
            single = asyncio.run(_direct(address, n_in, n_out, [gap * k for k in range(singles)]))
            burst: list[Timing] = []
            for _ in range(bursts):
                burst += asyncio.run(_direct(address, n_in, n_out, [0.0] * burst_size))
                time.sleep(0.2)
        step = statistics.median(t.tpot for t in single) - _decode_pred(lm, 1, n_in, n_out)
        burst_tpot = statistics.median(t.tpot for t in burst)
        per_seq = (burst_tpot - _decode_pred(lm, burst_size, n_in, n_out) - step) / (burst_size - 1)
        per_worker[spec.id] = {
            "gpu_type": spec.gpu_type, "ttft_ms": statistics.median(t.ttft for t in single) * 1000,
            "prefill_pred_ms": lm.prefill_time(n_in) * 1000, "tpot_ms": statistics.median(t.tpot for t in single) * 1000,
            "decode_pred_ms": _decode_pred(lm, 1, n_in, n_out) * 1000, "burst_tpot_ms": burst_tpot * 1000,
            "burst_decode_pred_ms": _decode_pred(lm, burst_size, n_in, n_out) * 1000,
            "step_s": step, "per_seq_s": per_seq,
            "worker_ttft_overhead_s": statistics.median(t.ttft for t in single) - lm.prefill_time(n_in) - step}
    # through the gateway: where an idle cluster routes a single request (the fastest worker)
    lms = {w.id: LatencyModel.from_names(w.gpu_type, w.model) for w in cluster.workers}
    gap = max(_spacing(lm, n_in, n_out) for lm in lms.values())
    with console.status("probing through the gateway at idle ..."):
        items = [ReplayItem(0.0, n_in, n_out, PROBE_CLASS)]
        asyncio.run(replay(stack.gateway_address, items))                              # warm the path
        items = [ReplayItem(gap * k, n_in, n_out, PROBE_CLASS) for k in range(singles)]
        records, _ = asyncio.run(replay(stack.gateway_address, items))
    failed = [r.error for r in records if not r.ok]
    if failed:
        raise RuntimeError(f"gateway probes failed: {failed[:3]}")
    excess = [r.token_times[0] - r.arrival - lms[r.worker_id].prefill_time(n_in) - per_worker[r.worker_id]["step_s"]
              for r in records]
    step = statistics.median(w["step_s"] for w in per_worker.values())
    per_seq = statistics.median(w["per_seq_s"] for w in per_worker.values())
    return {"request_s": max(0.0, statistics.median(excess)), "step_s": max(0.0, step),
            "step_per_seq_s": max(0.0, per_seq), "per_worker": per_worker,
            "gateway_probe_workers": sorted({r.worker_id for r in records}),
            "probe": {"prompt_tokens": n_in, "output_tokens": n_out, "singles": singles, "bursts": bursts,
                      "burst_size": burst_size}}
