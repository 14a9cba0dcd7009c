"""Whole-stack simulator fidelity: the default local stack (gateway, balancer, profiler and three sim workers of
uneven speed) against the simulator, on the Azure conversation trace at x1, x2 and x4 of its rate.

``python -m bench.stack_fidelity`` starts one local stack of the embedded default cluster file and reuses it for
everything. Before each live run, with every worker idle, it measures what the serving stack costs beyond the
latency model's prediction (idle probes only; nothing is fitted to the comparison runs):

- *per step*: single requests straight to each worker's ``Worker/Generate``, one at a time; their TPOT beyond
  ``decode_time(1, context)``. The engine loop sleeps through asyncio, whose epoll timeout is rounded up to the next
  millisecond, so a step overshoots by the part of a millisecond its predicted time leaves, which under load is as
  good as uniform. The probes' prompt lengths are therefore chosen so that their predicted decode steps leave
  fractions of a millisecond spread evenly over [0, 1): one prompt length would pin one overshoot;
- *per further sequence in a step*: bursts of 8 at once to each worker (prompt lengths chosen the same way for
  ``decode_time(8, context)``); TPOT beyond ``decode_time(8, context)`` and the per-step cost, over 7;
- *per request*: single requests through the gateway, one at a time; TTFT beyond ``prefill_time(prompt)`` and one
  step's cost. That is the request's way in (gateway, length prediction, balancer, worker intake) and the first
  token's way out (worker, gateway relay, client). Each probe goes twice with one key, so the gateway's
  length-prediction cache misses the first time (a Profiler round trip) and hits the second;
- *delivery*: bursts of 16 through the gateway. A step's tokens reach the client one stream after another (the
  worker writes them, the gateway relays them, one at a time); the spread of one step's tokens at the client, per
  further stream. It grows with CPU contention on the host (other processes on a shared machine), which is why the
  probes are taken again before every live run.

Worker figures are pooled (median over the workers) since the simulator takes one figure for all.

Then it replays the scale live through the gateway, open loop, and simulates it twice, with the measured overheads
and with none (the simulator as it was), from the state the live stack had: the stack is reused, so the Profiler's
length history already holds the earlier runs' completions, and each simulation's predictor is warmed with the same
completions. The gateway's prediction cache is replayed over the workload with the gateway's own key and lifetime:
the request overhead is the cache-hit cost plus the miss share times a miss's extra cost.

The table compares TTFT p50/p90, TPOT p50 and E2E p50 (``bench.metrics.summarize``). As a diagnostic it also
simulates each workload again with every arrival moved by up to 2 ms (the live client's own send jitter is about
1 ms): the range shows how far such a small perturbation moves each metric, i.e. how chaotic it is under that load
(routing is a chain of close calls). JSON goes to ``bench/results/stack_fidelity.json``.

Not modelled: the gateway reuses a length prediction for ``PREDICTION_TTL_S`` (the simulator predicts afresh for
every request, so its routing sees slightly fresher lengths), and CPU contention that other processes on the host
cause while a live run is under way (the probes see the contention of their own moment). At x4, TTFT p90 hangs on
where a burst's few 4,000-token prompts land, a close call between the A100 and the L40S, so it moves by tens of
percent between live runs of the same workload as much as between live and simulated.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import grpc
from rich.console import Console
from rich.table import Table

from bench.metrics import RequestRecord, summarize
from bench.replay import ReplayItem, replay, unique_prompt
from bench.report import write_json
from bench.scenario import Scenario, Source, build_workload
from bench.simulator import Simulator
from gateway.service import PREDICTION_TTL_S, prompt_tokens_estimate
from profiler.predictor import length_bucket, prompt_feature
from services.catalog import model as model_spec
from services.cluster import ClusterSpec, load_cluster
from services.latency import BatchShape, LatencyModel
from services.rpc import (balancer_pb2, balancer_pb2_grpc, common_pb2, gateway_pb2, gateway_pb2_grpc, worker_pb2,
                          worker_pb2_grpc)

METRICS = ("ttft_ms_p50", "ttft_ms_p90", "tpot_ms_p50", "e2e_ms_p50")
LABELS = {"ttft_ms_p50": "TTFT p50 ms", "ttft_ms_p90": "TTFT p90 ms", "tpot_ms_p50": "TPOT p50 ms",
          "e2e_ms_p50": "E2E p50 ms"}
TOLERANCE = 0.10
PROBE_CLASS = "code"               # idle probes stay out of the interactive class's length history
PROBE_OUTPUT = 32
BURST_PROMPT = 200
JITTER_S = 0.002


@dataclass
class ProbeSizes:
    singles: int = 6               # one at a time, per worker and through the gateway (pairs there)
    bursts: int = 4                # bursts per worker, and through the gateway
    burst_size: int = 8            # per worker (per-sequence step cost)
    gateway_burst_size: int = 16   # through the gateway (delivery spread)


# ----- idle probes -------------------------------------------------------------------------------------------
@dataclass
class Timing:
    sent: float
    prompt: int
    token_times: list[float]
    worker_id: str = ""

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.sent

    @property
    def tpot(self) -> float:
        t = self.token_times
        return (t[-1] - t[0]) / (len(t) - 1)


def _probe_id(k: int) -> str:
    return f"probe-{os.getpid()}-{time.monotonic_ns()}-{k}"


async def _probe(address: str, prompts: Sequence[int], *, gateway: bool, together: bool,
                 caps: Sequence[int] | None = None, n_out: int = PROBE_OUTPUT) -> list[Timing]:
    """Probe requests of ``prompts`` tokens, through the gateway or straight to a worker: all at once
    (``together``) or one after another, a moment apart. Token times are taken here, as the replay client does."""
    async with grpc.aio.insecure_channel(address) as channel:
        if gateway:
            stub = gateway_pb2_grpc.GatewayStub(channel)
        else:
            stub = worker_pb2_grpc.WorkerStub(channel)

        async def one(k: int) -> Timing:
            truth = common_pb2.ReplayTruth(output_tokens=n_out)
            if gateway:
                request = gateway_pb2.GenerateRequest(prompt=unique_prompt(prompts[k]), slo_class=PROBE_CLASS,
                                                      max_tokens=caps[k] if caps else 2048, temperature=0.0,
                                                      request_id=_probe_id(k), replay_truth=truth)
            else:
                request = worker_pb2.WorkerGenerateRequest(
                    request_id=_probe_id(k), prompt=unique_prompt(prompts[k]),
                    sampling=common_pb2.SamplingParams(max_tokens=n_out, temperature=0.0, top_p=1.0),
                    slo=common_pb2.SloSpec(slo_class=PROBE_CLASS, e2e_ms=2000), replay_truth=truth)
            timing = Timing(time.perf_counter(), prompts[k], [])
            async for reply in stub.Generate(request, timeout=60):
                timing.token_times.extend([time.perf_counter()] * len(reply.token_ids))
                if reply.finish_reason:
                    timing.worker_id = reply.metrics.worker_id
            return timing

        if together:
            return list(await asyncio.gather(*(one(k) for k in range(len(prompts)))))
        done = []
        for k in range(len(prompts)):
            done.append(await one(k))
            await asyncio.sleep(0.05)            # the balancer hears of the end before the next one
        return done


def full_batch_gaps(burst: Sequence[Timing]) -> list[float]:
    """Each stream's mean gap between tokens while every stream of the burst was decoding (the prefills of a burst
    may take several steps, mixed with the first streams' decodes; the last streams may run on alone)."""
    start = max(t.token_times[0] for t in burst)
    end = min(t.token_times[-1] for t in burst)
    gaps = []
    for t in burst:
        inside = [x for x in t.token_times if start < x <= end]
        if len(inside) > 2:
            gaps.append((inside[-1] - inside[0]) / (len(inside) - 1))
    return gaps or [t.tpot for t in burst]


def fraction_prompts(lm: LatencyModel, batch: int, n: int, lo: int = 100, hi: int = 3400) -> list[int]:
    """``n`` prompt lengths in [lo, hi] whose predicted decode steps at ``batch`` leave fractions of a millisecond
    spread evenly over [0, 1) (targets (k + 1/2) / n), so the probes see the epoll rounding's mean overshoot."""
    fractions = {c: (decode_prediction(lm, batch, c) * 1000) % 1.0 for c in range(lo, hi + 1, 10)}

    def off(c: int, target: float) -> float:
        d = abs(fractions[c] - target)
        return min(d, 1.0 - d)

    return [min(fractions, key=lambda c: off(c, (k + 0.5) / n)) for k in range(n)]


def prefill_prediction(lm: LatencyModel, prompt: int, budget: int) -> float:
    """Predicted prefill of ``prompt`` tokens alone on an idle engine, in chunks of the token budget."""
    return sum(lm.step_time(BatchShape((min(budget, prompt - done),), (done,))) for done in range(0, prompt, budget))


def spread_prompts(n: int, lo: int = 100, hi: int = 2000) -> list[int]:
    """``n`` prompt lengths evenly over [lo, hi] (one engine step of prefill each)."""
    return [lo + (hi - lo) * k // max(1, n - 1) for k in range(n)]


def decode_prediction(lm: LatencyModel, batch: int, n_in: int, n_out: int = PROBE_OUTPUT) -> float:
    """Predicted mean gap between tokens 2..n: decode is linear in context, so its value at the mean context."""
    return lm.decode_time(batch, n_in + n_out // 2)


def step_clusters(token_times: Iterable[Sequence[float]], gap_s: float = 0.003) -> list[list[float]]:
    """Token arrival times of concurrent streams (first tokens left out) grouped by engine step: a gap longer than
    ``gap_s`` starts the next step's group."""
    groups: list[list[float]] = []
    for t in sorted(t for stream in token_times for t in stream[1:]):
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
    per_worker: dict[str, dict] = {}
    b = sizes.burst_size
    for spec in cluster.workers:
        lm, address = lms[spec.id], stack.worker_address(spec.id)
        with console.status(f"probing {spec.id} at idle ..."):
            asyncio.run(_probe(address, [BURST_PROMPT], gateway=False, together=False))     # warm the channel
            singles = asyncio.run(_probe(address, fraction_prompts(lm, 1, sizes.singles), gateway=False,
                                         together=False))
            room = int(0.7 * lm.kv_capacity_tokens() / b) - PROBE_OUTPUT       # the whole burst fits the KV cache
            bursts = [asyncio.run(_probe(address, [n] * b, gateway=False, together=True))
                      for n in fraction_prompts(lm, b, sizes.bursts, hi=min(3400, room))]
        step = statistics.median(t.tpot - decode_prediction(lm, 1, t.prompt) for t in singles)
        burst_excess = statistics.median(statistics.median(full_batch_gaps(burst)) - decode_prediction(lm, b, n)
                                         for burst, n in ((burst, burst[0].prompt) for burst in bursts))
        ttft_excess = statistics.median(t.ttft - prefill_prediction(lm, t.prompt, spec.max_num_batched_tokens) - step
                                        for t in singles)
        per_worker[spec.id] = {"gpu_type": spec.gpu_type, "step_ms": step * 1000,
                               "per_seq_ms": (burst_excess - step) / (b - 1) * 1000,
                               "burst_excess_ms": burst_excess * 1000, "direct_ttft_excess_ms": ttft_excess * 1000}
    prompts = spread_prompts(sizes.singles)
    step_s = max(0.0, statistics.median(w["step_ms"] for w in per_worker.values()) / 1000)
    per_seq_s = max(0.0, statistics.median(w["per_seq_ms"] for w in per_worker.values()) / 1000)

    gateway = stack.gateway_address
    with console.status("probing through the gateway at idle ..."):
        asyncio.run(_probe(gateway, [BURST_PROMPT], gateway=True, together=False, caps=[999]))  # warm the path
        pairs = asyncio.run(_probe(gateway, [n for n in prompts for _ in range(2)], gateway=True, together=False,
                                   caps=[1000 + k for k in range(len(prompts)) for _ in range(2)]))
        spreads: list[float] = []
        for _ in range(sizes.bursts):
            n = sizes.gateway_burst_size
            burst = asyncio.run(_probe(gateway, [BURST_PROMPT] * n, gateway=True, together=True))
            for wid in lms:
                streams = [t.token_times for t in burst if t.worker_id == wid]
                if len(streams) >= 3:
                    spreads += delivery_spreads(streams)
            time.sleep(0.3)
    excess = [t.ttft - lms[t.worker_id].prefill_time(t.prompt) - step_s for t in pairs]   # as the simulator adds it
    miss, hit = statistics.median(excess[0::2]), statistics.median(excess[1::2])
    return {"request_hit_s": max(0.0, hit), "request_miss_extra_s": max(0.0, miss - hit),
            "step_s": step_s, "step_per_seq_s": per_seq_s,
            "delivery_per_seq_s": max(0.0, statistics.median(spreads)) if spreads else 0.0,
            "per_worker": per_worker, "gateway_probe_workers": sorted({t.worker_id for t in pairs}),
            "delivery_steps_seen": len(spreads), "probe_sizes": asdict(sizes), "probe_output_tokens": PROBE_OUTPUT,
            "load_average": loadavg()}


def prediction_miss_share(items: Sequence[ReplayItem], prompt_for: Callable[[int], str] = unique_prompt) -> float:
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


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ----- simulation and comparison -----------------------------------------------------------------------------
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


def jittered(items: Sequence[ReplayItem], seed: int, jitter_s: float = JITTER_S) -> list[ReplayItem]:
    rng = random.Random(seed)
    return sorted((replace(i, arrival_s=i.arrival_s + rng.uniform(0.0, jitter_s)) for i in items),
                  key=lambda i: i.arrival_s)


def difference(live: float, simulated: float) -> float:
    return (simulated - live) / live if live else float("nan")


def table_of(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for col in ("scale", "metric", "live", "simulated", "diff", "sim range (jitter)", "sim, 0 overhead", "diff "):
        table.add_column(col, justify="right", no_wrap=True)
    for k, r in enumerate(rows):
        first = k == 0 or rows[k - 1]["scale"] != r["scale"]
        last = k == len(rows) - 1 or rows[k + 1]["scale"] != r["scale"]
        lo, hi = r["simulated_range"]
        digits = 1 if hi < 100 else 0
        table.add_row(f"x{r['scale']:g}" if first else "", LABELS[r["metric"]], f"{r['live']:,.1f}",
                      f"{r['simulated']:,.1f}", f"{r['difference']:+.1%}" + ("" if r["within_tolerance"] else " !"),
                      f"{lo:,.{digits}f}-{hi:,.{digits}f}", f"{r['simulated_zero_overhead']:,.1f}",
                      f"{r['difference_zero_overhead']:+.1%}", end_section=last and k != len(rows) - 1)
    return table


def _count(values: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return dict(sorted(counts.items()))


@dataclass
class LiveRun:
    records: list[RequestRecord]
    duration_s: float
    history: list[tuple[str, int, int]]        # completions the live Profiler had observed before this run
    overheads: dict
    cpu_cores: dict[str, float | None]


def run(duration_s: float = 60.0, scales: Sequence[float] = (1.0, 2.0, 4.0),
        out: Path | None = Path("bench/results/stack_fidelity.json"), pause_s: float = 1.0, repeats: int = 1,
        probes: ProbeSizes | None = None, jitter_runs: int = 8, console: Console | None = None) -> dict:
    """Probe, replay live, simulate and compare each scale; returns the JSON payload (written to ``out`` unless
    None). ``repeats`` live runs per scale are pooled (each simulated from its own state)."""
    from tandem.launcher import LocalStack

    if console is None:
        console = Console(stderr=True)
        if not console.is_terminal:
            console.width = max(console.width, 120)
    started = time.perf_counter()
    cluster = load_cluster(None)
    window = min(model_spec(w.model).max_model_len for w in cluster.workers)
    workloads = {scale: build_workload(scenario_of(duration_s, scale), window) for scale in scales}
    live: dict[float, list[LiveRun]] = {scale: [] for scale in scales}
    history: list[tuple[str, int, int]] = []
    with console.status("starting the default local stack ..."):
        stack = LocalStack(cluster, gateway_port=0).start()
    try:
        wait_until(stack, profiled, 30, "profiled")
        for scale in scales:
            items = workloads[scale]
            for k in range(repeats):
                wait_until(stack, idle, 120, "idle")
                overheads = measure_overheads(stack, cluster, probes, console)
                wait_until(stack, idle, 120, "idle")
                time.sleep(pause_s)
                with console.status(f"replaying x{scale:g} live ({len(items)} requests, run {k + 1}/{repeats}) ..."):
                    before, wall0 = stack_cpu_s(stack), time.perf_counter()
                    records, duration = asyncio.run(replay(stack.gateway_address, items))
                    wall, after = time.perf_counter() - wall0, stack_cpu_s(stack)
                cpu = {name: (after[name] - before[name]) / wall if None not in (after[name], before[name]) else None
                       for name in before}
                live[scale].append(LiveRun(records, duration, list(history), overheads, cpu))
                history += [(r.slo_class, r.prompt_tokens, r.completion_tokens) for r in records if r.ok]
    finally:
        stack.stop()
    live_wall = time.perf_counter() - started

    rows: list[dict] = []
    per_scale: dict[str, dict] = {}
    with console.status("simulating ..."):
        for scale in scales:
            items = workloads[scale]
            pooled: dict[str, list[RequestRecord]] = {"live": [], "simulated": [], "simulated_zero_overhead": []}
            durations = dict.fromkeys(pooled, 0.0)
            jitter: dict[str, list[float]] = {m: [] for m in METRICS}
            options_used = []
            for lr in live[scale]:
                options = simulator_options(lr.overheads, items)
                options_used.append(options)
                runs = {"live": (lr.records, lr.duration_s),
                        "simulated": simulate(cluster, items, options, lr.history),
                        "simulated_zero_overhead": simulate(cluster, items, ZERO_OPTIONS, lr.history)}
                for name, (records, d) in runs.items():
                    pooled[name] += records
                    durations[name] += d
                for seed in range(jitter_runs):
                    s = summarize(*simulate(cluster, jittered(items, seed), options, lr.history))["all"]
                    for m in METRICS:
                        jitter[m].append(s[m])
            summaries = {name: summarize(records, durations[name])["all"] for name, records in pooled.items()}
            for m in METRICS:
                a, b, z = summaries["live"][m], summaries["simulated"][m], summaries["simulated_zero_overhead"][m]
                rows.append({"scale": scale, "metric": m, "live": a, "simulated": b, "difference": difference(a, b),
                             "within_tolerance": abs(difference(a, b)) <= TOLERANCE,
                             "simulated_range": [min(jitter[m] + [b]), max(jitter[m] + [b])],
                             "simulated_zero_overhead": z, "difference_zero_overhead": difference(a, z)})
            live_records = pooled["live"]
            per_scale[f"x{scale:g}"] = {
                "requests": len(items),                          # per run, as the two counts below
                "live_requests": len(live_records) // len(live[scale]),
                "simulated_requests": len(pooled["simulated"]) // len(live[scale]),
                "live_failed": sum(not r.ok for r in live_records),
                "live_errors": sorted({r.error for r in live_records if r.error})[:5],
                "simulated_failed": sum(not r.ok for r in pooled["simulated"]),
                "prediction_miss_share": prediction_miss_share(items), "simulator_options": options_used,
                "summaries": summaries,
                "live_runs": [{m: summarize(lr.records, lr.duration_s)["all"][m] for m in METRICS}
                              for lr in live[scale]],
                "overheads": [lr.overheads for lr in live[scale]], "cpu_cores": [lr.cpu_cores for lr in live[scale]],
                "live_workers": _count(r.worker_id for r in live_records),
                "simulated_workers": _count(r.worker_id for r in pooled["simulated"])}
    console.print(table_of(rows, f"stack fidelity: first {duration_s:g} s of Azure conv "
                                 f"({len(workloads[scales[0]])} requests) on the default stack (A100-80G, L40S, A10)"))
    for scale in scales:
        for lr in live[scale]:
            o = lr.overheads
            console.print(f"x{scale:g}: overheads at idle before the run: request {o['request_hit_s'] * 1000:.2f} ms "
                          f"(+{o['request_miss_extra_s'] * 1000:.2f} ms on a prediction-cache miss), step "
                          f"{o['step_s'] * 1000:.2f} ms + {o['step_per_seq_s'] * 1000:.3f} ms per further sequence, "
                          f"delivery {o['delivery_per_seq_s'] * 1000:.3f} ms per further stream")
    within = all(r["within_tolerance"] for r in rows)
    console.print(f"{'all' if within else 'not all'} metrics within {TOLERANCE:.0%}; "
                  f"run time {time.perf_counter() - started:.0f} s")
    payload = {"duration_s": duration_s, "scales": list(scales), "repeats": repeats, "tolerance": TOLERANCE,
               "jitter_s": JITTER_S, "jitter_runs": jitter_runs, "cluster": cluster.model_dump(), "table": rows,
               "per_scale": per_scale, "all_within_tolerance": within, "live_wall_s": live_wall,
               "wall_s": time.perf_counter() - started, "load_average": loadavg()}
    if out is not None:
        console.print(f"results: {write_json(out, payload)}")
    return payload


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.stack_fidelity",
                                     description="Live default stack vs the simulator on the Azure conversation trace.")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of the trace (default 60)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 4.0], help="rate scales (default 1 2 4)")
    parser.add_argument("--repeats", type=int, default=1, help="live runs per scale, pooled (default 1)")
    parser.add_argument("--jitter-runs", type=int, default=8, help="perturbed simulations per run (default 8)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/stack_fidelity.json"))
    args = parser.parse_args(argv)
    return run(args.duration, args.scales, args.out, repeats=args.repeats, jitter_runs=args.jitter_runs)


if __name__ == "__main__":
    main()
