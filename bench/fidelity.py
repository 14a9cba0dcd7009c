"""Simulator fidelity: one workload slice through the live stack with a torch worker, and through the simulator
with that worker's calibrated profile; median TTFT and E2E compared (target: within 15%).

The worker runs a random Llama checkpoint on CPU (one intra-op thread, so steps are steady), is calibrated by
the Profiler first (forward passes through its executor), then the serving stack's fixed costs are measured at
idle: a few sequential requests, whose TTFT and TPOT beyond the fitted model's own prediction give the
per-request and per-step overheads. Then it serves a slice of the Azure conversation trace with lengths
scaled to its 2,048-token window, and the simulator, given the profile and the overheads, predicts that run. ``python -m bench.fidelity`` prints a table and writes JSON.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
from pathlib import Path
from typing import Callable

import grpc
from rich.console import Console
from rich.table import Table

from bench.engine import bench_checkpoint, prompt_text
from bench.live_slo import one_token_words
from bench.metrics import e2e, ttft
from bench.replay import ReplayItem, replay
from bench.report import write_json
from bench.simulator import Simulator
from bench.traces import default_trace_path, load_azure
from services.cluster import ClusterSpec, WorkerSpec
from tandem.launcher import LocalStack
from services.profiles import ProfiledLatency, from_profile
from services.rpc import profiler_pb2, profiler_pb2_grpc


def text_maker(folder: Path) -> Callable[[ReplayItem], str]:
    """Prompts of exactly the item's tokens that share no prefix (a live prefix cache would otherwise serve most
    of every prompt, which the simulator, fed the trace's unshared prompts, does not)."""
    words = one_token_words(folder)
    serial = itertools.count()
    return lambda item: prompt_text(item.input_tokens, words, seed=next(serial))


def workload(duration_s: float, scale: float, context: int, rate_scale: float) -> list[ReplayItem]:
    rows = load_azure(default_trace_path("conv"), duration_s=duration_s)
    items = []
    for r in rows:
        out = max(1, min(round(r.output_tokens * scale), 128))
        inp = max(2, min(round(r.input_tokens * scale), 1024, context - out - 1))
        # a client's cap (prompts here stay within half the window); the true length reaches only the stop rule
        items.append(ReplayItem(r.arrival_s / rate_scale, inp, out, "interactive", max_tokens=min(512, context // 4)))
    return items


def run(duration_s: float = 40.0, length_scale: float = 0.25, rate_scale: float = 1.0,
        out: Path | None = Path("bench/results/fidelity.json")) -> dict:
    console = Console(stderr=True)
    folder = bench_checkpoint().resolve()
    context = json.loads((folder / "config.json").read_text())["max_position_embeddings"]
    spec = ClusterSpec(routing_policy="capacity", workers=[WorkerSpec(
        id="torch-0", executor="torch", model=str(folder), kv_blocks=8192, torch_threads=1,
        max_num_batched_tokens=512)])
    items = workload(duration_s, length_scale, context, rate_scale)
    text_of = text_maker(folder)
    with console.status("starting a torch worker ..."):
        stack = LocalStack(spec, gateway_port=0).start()
    try:
        with console.status("calibrating it ..."), grpc.insecure_channel(stack.profiler_address) as channel:
            calibration = profiler_pb2_grpc.ProfilerStub(channel).Calibrate(
                profiler_pb2.CalibrateRequest(worker_address=stack.worker_address("torch-0"), repeats=7), timeout=900)
        profile = calibration.profile
        latency = ProfiledLatency(from_profile(profile), profile.kv_capacity_tokens, context)
        with console.status("measuring the stack's overheads at idle ..."):
            idle = [ReplayItem(0.5 * k, 200, 30, max_tokens=512) for k in range(8)]   # one at a time: 30 < 0.5 s
            idle_records, _ = asyncio.run(replay(stack.gateway_address, idle, prompt_for=text_of))
        live_idle_ttft = statistics.median(ttft(r) for r in idle_records if r.ok)
        live_idle_tpot = statistics.median(((r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1))
                                           for r in idle_records if r.ok)
        request_overhead = max(0.0, live_idle_ttft - latency.prefill_time(200))
        step_overhead = max(0.0, live_idle_tpot - latency.decode_time(1, 215))
        with console.status("measuring the per-sequence step overhead at batch 8 ..."):
            burst = [ReplayItem(0.0, 200, 30, max_tokens=512) for _ in range(8)]     # eight at once: batch 8
            burst_records, _ = asyncio.run(replay(stack.gateway_address, burst, prompt_for=text_of))
        burst_tpot = statistics.median(((r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1))
                                       for r in burst_records if r.ok)
        per_seq = max(0.0, (burst_tpot - latency.decode_time(8, 215) - step_overhead) / 7)
        with console.status(f"replaying {len(items)} requests live ..."):
            live, _ = asyncio.run(replay(stack.gateway_address, items, prompt_for=text_of))
    finally:
        stack.stop()
    sim = Simulator(spec, latency={"torch-0": latency}, request_overhead_s=request_overhead,
                    step_overhead_s=step_overhead, step_overhead_per_seq_s=per_seq).run(items)

    def medians(records):
        return (statistics.median(ttft(r) * 1000 for r in records if r.ok),
                statistics.median(e2e(r) * 1000 for r in records if r.ok))

    (live_ttft, live_e2e), (sim_ttft, sim_e2e) = medians(live), medians(sim.records)
    rows = {"ttft_p50_ms": (live_ttft, sim_ttft), "e2e_p50_ms": (live_e2e, sim_e2e)}
    table = Table(title=f"simulator fidelity: {len(items)} Azure-conv requests (lengths x{length_scale:g}) on one "
                        f"calibrated CPU torch worker")
    for col in ("metric", "live", "simulated", "difference"):
        table.add_column(col, justify="right")
    for name, (a, b) in rows.items():
        table.add_row(name, f"{a:,.1f}", f"{b:,.1f}", f"{(b - a) / a:+.1%}")
    console.print(table)
    console.print(f"overheads measured at idle: {request_overhead * 1000:.2f} ms a request, "
                  f"{step_overhead * 1000:.2f} ms a step plus {per_seq * 1000:.3f} ms for each further sequence")
    payload = {"requests": len(items), "live_failed": sum(not r.ok for r in live),
               "metrics": {k: {"live": a, "simulated": b, "relative_difference": (b - a) / a}
                           for k, (a, b) in rows.items()},
               "calibration": {"prefill_error": calibration.prefill_median_error,
                               "decode_error": calibration.decode_median_error},
               "overheads_ms": {"request": request_overhead * 1000, "step": step_overhead * 1000,
                                "step_per_extra_sequence": per_seq * 1000}}
    if out is not None:
        console.print(f"results: {write_json(out, payload)}")
    return payload


if __name__ == "__main__":
    run()
