"""Whole-stack simulator fidelity: the default local stack (gateway, balancer, profiler and three sim workers of
uneven speed) against the simulator, on the Azure conversation trace at x1, x2 and x4 of its rate.

``python -m bench.stack_fidelity`` starts one local stack of the embedded default cluster file and reuses it for
everything:

1. **Idle probes** measure what the serving stack costs beyond the latency model's prediction, never fitted to the
   comparison runs:

   - *per step* (each worker, straight to its ``Worker/Generate``): single requests one at a time, prompts spread
     over 100-2,000 tokens; their TPOT beyond ``decode_time(1, context)``. The spread matters: the engine loop
     sleeps through asyncio, whose epoll timeout is rounded up to the next millisecond, so the overshoot depends on
     the step time's fraction of a millisecond, which one prompt length would pin;
   - *per further sequence in a step*: bursts of 8 at once to each worker; TPOT beyond ``decode_time(8, context)``
     and the per-step cost, over 7;
   - *per request* (through the gateway): single requests one at a time; TTFT beyond ``prefill_time(prompt)`` and
     one step's cost. That is the request's way in (gateway, length prediction, balancer, worker intake) and the
     first token's way out (worker, gateway relay, client). Each probe goes twice with the same key, so the
     gateway's length-prediction cache misses the first time (a Profiler round trip) and hits the second;
   - *delivery*: bursts of 16 through the gateway; a step's tokens reach the client one stream after another (the
     worker writes them, the gateway relays them, one at a time); the spread of one step's tokens at the client,
     per further stream.

2. **Live replays** of each rate scale through the gateway, open loop, with a pause between them so the workers are
   idle and the gateway's prediction cache has expired.

3. **Simulations** of the same workloads, with the measured overheads and with none (the simulator as it was), from
   the state the live stack had: the stack is reused, so the Profiler's length history already holds the earlier
   scales' completions, and each simulation's predictor is warmed with those same completions. The gateway's
   prediction cache is replayed over each workload with the gateway's own key and lifetime, and the request
   overhead is the cache-hit cost plus the miss share times the extra cost of a miss (the simulator's request
   overhead is one figure a run).

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
from typing import Callable, Sequence

import grpc
from rich.console import Console
from rich.table import Table

from bench.metrics import RequestRecord, summarize
from bench.replay import ReplayItem, prompt_of, replay
from bench.report import write_json
from bench.scenario import Scenario, Source, build_workload
from bench.simulator import Simulator
from gateway.service import PREDICTION_TTL_S, prompt_tokens_estimate
from profiler.predictor import length_bucket, prompt_feature
from services.catalog import model as model_spec
from services.cluster import ClusterSpec, load_cluster
from services.latency import LatencyModel
from services.rpc import (balancer_pb2, balancer_pb2_grpc, common_pb2, gateway_pb2, gateway_pb2_grpc, worker_pb2,
                          worker_pb2_grpc)

METRICS = ("ttft_ms_p50", "ttft_ms_p90", "tpot_ms_p50", "e2e_ms_p50")
LABELS = {"ttft_ms_p50": "TTFT p50 ms", "ttft_ms_p90": "TTFT p90 ms", "tpot_ms_p50": "TPOT p50 ms",
          "e2e_ms_p50": "E2E p50 ms"}
TOLERANCE = 0.10
PROBE_CLASS = "code"               # idle probes stay out of the interactive class's length history
PROBE_OUTPUT = 32
BURST_PROMPT = 200


@dataclass
class ProbeSizes:
    singles: int = 10              # sequential single requests, per worker and through the gateway (pairs there)
    bursts: int = 3                # bursts per worker, and through the gateway
    burst_size: int = 8            # per worker (per-sequence step cost)
    gateway_burst_size: int = 16   # through the gateway (delivery spread)


# ----- idle probes -------------------------------------------------------------------------------------------
@dataclass
class Timing:
    sent: float
    prompt: int
    token_times: list[float]

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.sent

    @property
    def tpot(self) -> float:
        t = self.token_times
        return (t[-1] - t[0]) / (len(t) - 1)


async def _direct(address: str, prompts: Sequence[int], offsets: Sequence[float], n_out: int = PROBE_OUTPUT
                  ) -> list[Timing]:
    """Requests straight to a worker's Generate, each sent at its offset; token times on this client."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        start = time.perf_counter()

        async def one(k: int, n_in: int, offset: float) -> Timing:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            request = worker_pb2.WorkerGenerateRequest(
                request_id=f"probe-{os.getpid()}-{time.monotonic_ns()}-{k}", prompt=prompt_of(n_in),
                sampling=common_pb2.SamplingParams(max_tokens=n_out, temperature=0.0, top_p=1.0),
                slo=common_pb2.SloSpec(slo_class=PROBE_CLASS, e2e_ms=2000),
                replay_truth=common_pb2.ReplayTruth(output_tokens=n_out))
            sent, times = time.perf_counter(), []
            async for reply in stub.Generate(request, timeout=60):
                times.extend([time.perf_counter()] * len(reply.token_ids))
            return Timing(sent, n_in, times)

        return list(await asyncio.gather(*(one(k, n, t) for k, (n, t) in enumerate(zip(prompts, offsets)))))


async def _through_gateway(address: str, prompts: Sequence[int], caps: Sequence[int], offsets: Sequence[float] | None,
                           n_out: int = PROBE_OUTPUT) -> list[tuple[Timing, str]]:
    """Requests through the gateway: one after another (``offsets`` None) or each at its offset."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def one(k: int) -> tuple[Timing, str]:
            request = gateway_pb2.GenerateRequest(
                prompt=prompt_of(prompts[k]), max_tokens=caps[k], slo_class=PROBE_CLASS, temperature=0.0,
                request_id=f"probe-{os.getpid()}-{time.monotonic_ns()}-{k}",
                replay_truth=common_pb2.ReplayTruth(output_tokens=n_out))
            sent, times, worker = time.perf_counter(), [], ""
            async for reply in stub.Generate(request, timeout=60):
                times.extend([time.perf_counter()] * len(reply.token_ids))
                if reply.finish_reason:
                    worker = reply.metrics.worker_id
            return Timing(sent, prompts[k], times), worker

        if offsets is None:                  # one at a time, a moment apart (the balancer hears of each end)
            done = []
            for k in range(len(prompts)):
                done.append(await one(k))
                await asyncio.sleep(0.05)
            return done
        start = time.perf_counter()

        async def later(k: int) -> tuple[Timing, str]:
            await asyncio.sleep(max(0.0, start + offsets[k] - time.perf_counter()))
            return await one(k)

        return list(await asyncio.gather(*(later(k) for k in range(len(prompts)))))


def spread_prompts(n: int, lo: int = 100, hi: int = 2000) -> list[int]:
    """``n`` prompt lengths evenly over [lo, hi] (one engine step of prefill each)."""
    return [lo + (hi - lo) * k // max(1, n - 1) for k in range(n)]


def _decode_pred(lm: LatencyModel, batch: int, n_in: int, n_out: int) -> float:
    """Predicted mean gap between tokens 2..n: decode is linear in context, so its value at the mean context."""
    return lm.decode_time(batch, n_in + n_out // 2)


def _idle_gap(lms: Sequence[LatencyModel], n_in: int, n_out: int) -> float:
    """A pause after which a probe of the slowest worker has surely ended."""
    return max(lm.prefill_time(n_in) + n_out * lm.decode_time(1, n_in + n_out) for lm in lms) * 1.5 + 0.1


def step_clusters(token_times: Sequence[Sequence[float]], gap_s: float = 0.003) -> list[list[float]]:
    """Token arrival times of concurrent streams (first tokens left out) grouped by engine step: a gap longer than
    ``gap_s`` starts the next step's group."""
    times = sorted(t for stream in token_times for t in stream[1:])
    groups: list[list[float]] = []
    for t in times:
        if groups and t - groups[-1][-1] <= gap_s:
            groups[-1].append(t)
        else:
            groups.append([t])
    return groups


def delivery_spreads(token_times: Sequence[Sequence[float]]) -> list[float]:
    """Per further stream, the spread of each step's token arrivals (steps where every stream got its token)."""
    n = len(token_times)
    return [(g[-1] - g[0]) / (n - 1) for g in step_clusters(token_times) if len(g) == n] if n > 1 else []


def measure_overheads(stack: object, cluster: ClusterSpec, sizes: ProbeSizes | None = None,
                      console: Console | None = None) -> dict:
    """The stack's costs beyond the latency model, from idle probes only (see the module docstring)."""
    console = console or Console(stderr=True)
    sizes = sizes or ProbeSizes()
    lms = {w.id: LatencyModel.from_names(w.gpu_type, w.model) for w in cluster.workers}
    per_worker: dict[str, dict[str, float | str]] = {}
    prompts = spread_prompts(sizes.singles)
    for spec in cluster.workers:
        lm, address = lms[spec.id], stack.worker_address(spec.id)
        gap = _idle_gap([lm], max(prompts), PROBE_OUTPUT)
        with console.status(f"probing {spec.id} at idle ..."):
            asyncio.run(_direct(address, [BURST_PROMPT], [0.0]))                      # warm the channel
            singles = asyncio.run(_direct(address, prompts, [gap * k for k in range(len(prompts))]))
            bursts: list[Timing] = []
            for _ in range(sizes.bursts):
                bursts += asyncio.run(_direct(address, [BURST_PROMPT] * sizes.burst_size, [0.0] * sizes.burst_size))
        step = statistics.median(t.tpot - _decode_pred(lm, 1, t.prompt, PROBE_OUTPUT) for t in singles)
        burst_tpot = statistics.median(t.tpot for t in bursts)
        burst_pred = _decode_pred(lm, sizes.burst_size, BURST_PROMPT, PROBE_OUTPUT)
        per_seq = (burst_tpot - burst_pred - step) / (sizes.burst_size - 1)
        intake = statistics.median(t.ttft - lm.prefill_time(t.prompt) - step for t in singles)
        per_worker[spec.id] = {"gpu_type": spec.gpu_type, "step_ms": step * 1000, "per_seq_ms": per_seq * 1000,
                               "burst_tpot_ms": burst_tpot * 1000, "burst_decode_pred_ms": burst_pred * 1000,
                               "direct_ttft_excess_ms": intake * 1000}
    step_s = max(0.0, statistics.median(w["step_ms"] for w in per_worker.values()) / 1000)
    per_seq_s = max(0.0, statistics.median(w["per_seq_ms"] for w in per_worker.values()) / 1000)

    # through the gateway: each probe twice with one key (prediction cache miss, then hit), one at a time
    gateway = stack.gateway_address
    pair_prompts = [n for n in prompts for _ in range(2)]
    caps = [1000 + k for k in range(len(prompts)) for _ in range(2)]          # a fresh cache key per pair
    with console.status("probing through the gateway at idle ..."):
        asyncio.run(_through_gateway(gateway, [BURST_PROMPT], [999], None))  # warm the path
        singles_gw = asyncio.run(_through_gateway(gateway, pair_prompts, caps, None))
    steps = {wid: max(0.0, w["step_ms"] / 1000) for wid, w in per_worker.items()}
    excess = [t.ttft - lms[w].prefill_time(t.prompt) - steps[w] for t, w in singles_gw]
    miss, hit = statistics.median(excess[0::2]), statistics.median(excess[1::2])

    with console.status("measuring token delivery through the gateway at idle ..."):
        spreads: list[float] = []
        for _ in range(sizes.bursts):
            n = sizes.gateway_burst_size
            burst = asyncio.run(_through_gateway(gateway, [BURST_PROMPT] * n, [2048] * n, [0.0] * n))
            for wid in lms:
                streams = [t.token_times for t, w in burst if w == wid]
                if len(streams) >= 3:
                    spreads += delivery_spreads(streams)
            time.sleep(_idle_gap(list(lms.values()), BURST_PROMPT, PROBE_OUTPUT))
    delivery_s = max(0.0, statistics.median(spreads)) if spreads else 0.0
    return {"request_hit_s": max(0.0, hit), "request_miss_extra_s": max(0.0, miss - hit), "step_s": step_s,
            "step_per_seq_s": per_seq_s, "delivery_per_seq_s": delivery_s, "per_worker": per_worker,
            "gateway_probe_workers": sorted({w for _, w in singles_gw}), "delivery_steps_seen": len(spreads),
            "probe_sizes": sizes.__dict__, "probe_output_tokens": PROBE_OUTPUT}


def prediction_miss_share(items: Sequence[ReplayItem], prompt_for: Callable[[int], str] = prompt_of) -> float:
    """Share of ``items`` whose length prediction the gateway must ask the Profiler for: its cache, keyed by class,
    cap, prompt-length bucket and prompt feature, keeps an answer ``PREDICTION_TTL_S`` (the gateway's own
    functions; arrival times stand for the gateway's clock, the workload's prompts for the replayed text)."""
    fetched: dict[tuple, float] = {}
    misses = 0
    for item in sorted(items, key=lambda i: i.arrival_s):
        prompt = prompt_for(item.input_tokens)
        key = (item.slo_class, item.cap, length_bucket(prompt_tokens_estimate(prompt)), prompt_feature(prompt))
        at = fetched.get(key)
        if at is None or item.arrival_s - at >= PREDICTION_TTL_S:
            fetched[key] = item.arrival_s
            misses += 1
    return misses / len(items) if items else 0.0


def simulator_options(overheads: dict, items: Sequence[ReplayItem]) -> dict[str, float]:
    """The measured overheads as Simulator options for this workload."""
    miss = prediction_miss_share(items)
    return {"request_overhead_s": overheads["request_hit_s"] + miss * overheads["request_miss_extra_s"],
            "step_overhead_s": overheads["step_s"], "step_overhead_per_seq_s": overheads["step_per_seq_s"],
            "delivery_per_seq_s": overheads["delivery_per_seq_s"]}


ZERO_OPTIONS = {"request_overhead_s": 0.0, "step_overhead_s": 0.0, "step_overhead_per_seq_s": 0.0,
                "delivery_per_seq_s": 0.0}


# ----- the live stack ----------------------------------------------------------------------------------------
def _workers(stack: object) -> list[balancer_pb2.WorkerStatus]:
    with grpc.insecure_channel(stack.balancer_address) as channel:
        return list(balancer_pb2_grpc.BalancerStub(channel).ListWorkers(balancer_pb2.ListWorkersRequest(),
                                                                         timeout=5).workers)


def wait_until(stack: object, ready: Callable[[list[balancer_pb2.WorkerStatus]], bool], timeout_s: float,
               what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready(_workers(stack)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the stack did not become {what} within {timeout_s:.0f} s")
        time.sleep(0.05)


def idle(workers: list[balancer_pb2.WorkerStatus]) -> bool:
    return all(w.load.running == 0 and w.load.waiting == 0 and w.outstanding == 0 for w in workers)


def profiled(workers: list[balancer_pb2.WorkerStatus]) -> bool:
    """Every worker priced by its latency profile at the balancer, as the simulator's are."""
    return bool(workers) and all(w.capacity_tok_s > 0 for w in workers)


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) a process has used; None where /proc is not there."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def stack_cpu_s(stack: object) -> dict[str, float | None]:
    cpu = {name: process_cpu_s(p.popen.pid) for name, p in stack.processes.items()}
    cpu["client"] = time.process_time()
    return cpu


# ----- comparison --------------------------------------------------------------------------------------------
def difference(live: float, simulated: float) -> float:
    return (simulated - live) / live if live else float("nan")


def compare(live: dict, simulated: dict, zero: dict) -> list[dict]:
    rows = []
    for metric in METRICS:
        a, b, z = live[metric], simulated[metric], zero[metric]
        rows.append({"metric": metric, "live": a, "simulated": b, "difference": difference(a, b),
                     "simulated_zero_overhead": z, "difference_zero_overhead": difference(a, z),
                     "within_tolerance": abs(difference(a, b)) <= TOLERANCE})
    return rows


def table_of(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for col in ("scale", "metric", "live", "simulated", "diff", "sim, 0 overhead", "diff "):
        table.add_column(col, justify="right", no_wrap=True)
    last = None
    for r in rows:
        mark = "" if r["within_tolerance"] else " !"
        table.add_row(f"x{r['scale']:g}" if r["scale"] != last else "", LABELS[r["metric"]], f"{r['live']:,.1f}",
                      f"{r['simulated']:,.1f}", f"{r['difference']:+.1%}{mark}", f"{r['simulated_zero_overhead']:,.1f}",
                      f"{r['difference_zero_overhead']:+.1%}", end_section=r is not rows[-1] and
                      rows[rows.index(r) + 1]["scale"] != r["scale"])
        last = r["scale"]
    return table


def scenario_of(duration_s: float, scale: float) -> Scenario:
    return Scenario(name=f"azure-conv-{duration_s:g}s", duration_s=duration_s, rate_scale=scale,
                    sources=[Source(trace="azure-conv", slo_class="interactive")])


def simulate(cluster: ClusterSpec, items: Sequence[ReplayItem], options: dict[str, float],
             history: Sequence[tuple[str, int, int]]) -> tuple[list[RequestRecord], float]:
    """One simulation, its length predictor holding the completions the live Profiler had seen."""
    sim = Simulator(cluster, **options)
    for slo_class, prompt_tokens, output_tokens in history:
        sim.predictor.observe(slo_class, prompt_tokens, "", output_tokens)
    result = sim.run(items)
    return result.records, result.duration_s


def run(duration_s: float = 60.0, scales: Sequence[float] = (1.0, 2.0, 4.0),
        out: Path | None = Path("bench/results/stack_fidelity.json"), pause_s: float = 6.0, repeats: int = 1,
        probes: ProbeSizes | None = None, console: Console | None = None) -> dict:
    """Probe, replay live, simulate, compare; returns the JSON payload (also written to ``out`` unless None)."""
    from tandem.launcher import LocalStack

    console = console or Console(stderr=True)
    started = time.perf_counter()
    cluster = load_cluster(None)
    window = min(model_spec(w.model).max_model_len for w in cluster.workers)
    workloads = {scale: build_workload(scenario_of(duration_s, scale), window) for scale in scales}
    with console.status("starting the default local stack ..."):
        stack = LocalStack(cluster, gateway_port=0).start()
    live: dict[float, list[tuple[list[RequestRecord], float, list[tuple[str, int, int]]]]] = {s: [] for s in scales}
    cpu: dict[str, dict[str, float | None]] = {}
    history: list[tuple[str, int, int]] = []        # what the live Profiler's length predictor has observed
    try:
        wait_until(stack, profiled, 30, "profiled")
        overheads = measure_overheads(stack, cluster, probes, console)
        for scale in scales:
            for k in range(repeats):
                wait_until(stack, idle, 120, "idle")
                time.sleep(pause_s)                 # workers idle, the gateway's prediction cache expired
                items = workloads[scale]
                with console.status(f"replaying x{scale:g} live ({len(items)} requests, run {k + 1}/{repeats}) ..."):
                    before, wall0 = stack_cpu_s(stack), time.perf_counter()
                    records, duration = asyncio.run(replay(stack.gateway_address, items))
                    wall, after = time.perf_counter() - wall0, stack_cpu_s(stack)
                cpu[f"x{scale:g}#{k + 1}"] = {name: (after[name] - before[name]) / wall
                                             if after[name] is not None and before[name] is not None else None
                                             for name in before}
                live[scale].append((records, duration, list(history)))
                history += [(r.slo_class, r.prompt_tokens, r.completion_tokens) for r in records if r.ok]
    finally:
        stack.stop()
    live_wall = time.perf_counter() - started

    rows: list[dict] = []
    per_scale: dict[str, dict] = {}
    with console.status("simulating ..."):
        for scale in scales:
            items = workloads[scale]
            options = simulator_options(overheads, items)
            live_records, sim_records, zero_records = [], [], []
            live_duration = sim_duration = zero_duration = 0.0
            for records, duration, seen in live[scale]:
                live_records += records
                live_duration += duration
                recs, d = simulate(cluster, items, options, seen)
                sim_records += recs
                sim_duration += d
                recs, d = simulate(cluster, items, ZERO_OPTIONS, seen)
                zero_records += recs
                zero_duration += d
            summaries = {"live": summarize(live_records, live_duration)["all"],
                         "simulated": summarize(sim_records, sim_duration)["all"],
                         "simulated_zero_overhead": summarize(zero_records, zero_duration)["all"]}
            scale_rows = [{"scale": scale, **r} for r in compare(summaries["live"], summaries["simulated"],
                                                                summaries["simulated_zero_overhead"])]
            rows += scale_rows
            per_run = [summarize(records, duration)["all"] for records, duration, _ in live[scale]]
            per_scale[f"x{scale:g}"] = {
                "requests": len(items), "live_requests": len(live_records), "simulated_requests": len(sim_records),
                "live_failed": sum(not r.ok for r in live_records),
                "live_errors": sorted({r.error for r in live_records if r.error})[:5],
                "simulated_failed": sum(not r.ok for r in sim_records),
                "simulator_options": options, "prediction_miss_share": prediction_miss_share(items),
                "summaries": summaries, "live_runs": [{m: s[m] for m in METRICS} for s in per_run],
                "live_workers": _count(r.worker_id for r in live_records),
                "simulated_workers": _count(r.worker_id for r in sim_records)}
    o = overheads
    console.print(table_of(rows, f"stack fidelity: first {duration_s:g} s of Azure conv ({len(workloads[scales[0]])} "
                                 f"requests) on the default stack (A100-80G, L40S, A10), live vs simulated"))
    console.print(f"overheads measured at idle: request {o['request_hit_s'] * 1000:.2f} ms "
                  f"(+{o['request_miss_extra_s'] * 1000:.2f} ms on a length-prediction cache miss), "
                  f"step {o['step_s'] * 1000:.3f} ms + {o['step_per_seq_s'] * 1000:.4f} ms per further sequence, "
                  f"delivery {o['delivery_per_seq_s'] * 1000:.3f} ms per further stream of a step")
    within = all(r["within_tolerance"] for r in rows)
    console.print(f"{'all' if within else 'not all'} metrics within {TOLERANCE:.0%}; "
                  f"run time {time.perf_counter() - started:.0f} s")
    payload = {"duration_s": duration_s, "scales": list(scales), "repeats": repeats, "tolerance": TOLERANCE,
               "cluster": cluster.model_dump(), "overheads": overheads, "table": rows, "per_scale": per_scale,
               "cpu_cores": cpu, "all_within_tolerance": within, "live_wall_s": live_wall,
               "wall_s": time.perf_counter() - started, "load_average": _loadavg()}
    if out is not None:
        console.print(f"results: {write_json(out, payload)}")
    return payload


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return dict(sorted(counts.items()))


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.stack_fidelity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of the trace (default 60)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 4.0], help="rate scales (1 2 4)")
    parser.add_argument("--repeats", type=int, default=1, help="live runs per scale, pooled (default 1)")
    parser.add_argument("--pause", type=float, default=6.0, help="idle seconds before each live run (default 6)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/stack_fidelity.json"))
    args = parser.parse_args(argv)
    return run(args.duration, args.scales, args.out, args.pause, args.repeats)


if __name__ == "__main__":
    main()
