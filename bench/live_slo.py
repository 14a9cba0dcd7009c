"""Live SLO check: does the SLO-aware engine policy ``sage`` behind ``token_aware`` routing attain more SLOs under
overload than plain ``fcfs`` engines on a real local stack, as the simulator says it does?

``python -m bench.live_slo`` (or ``tandem bench live-slo``) runs three CPU torch workers (a tiny random Llama
checkpoint, ``bench.engine.bench_checkpoint``: 256 hidden, 4 layers, 2,048-token window; one intra-op thread each,
so three workers share a small machine predictably) behind the gateway, balancer and profiler of
``tandem.launcher.LocalStack``, and compares four pairs, ``token_aware/sage`` (engine options at their defaults)
against ``token_aware/fcfs``, ``llmd/fcfs`` and the floor ``round_robin/fcfs``, each on a fresh stack, on the
same requests at one overload level.

Workload (our own, seeded, the same items for every pair and for the simulator): Poisson arrivals at ``rate``
requests/s for ``duration`` seconds; each request is an Azure conversation request (class ``interactive``) or an
Azure code request (class ``code``) in the traces' own proportion (4.8 : 2.5 requests/s over their first 600 s),
with the (prompt, answer) lengths of a random row of that trace times ``length_scale`` (0.25: a 2,048-token window
instead of a GPU model's 8k), prompts clipped to 768 tokens and answers to 128. Lengths are hidden: every request
sends a client cap of 256 tokens (``max_tokens``); the true length reaches only the executor's stop rule
(``replay_truth``). Prompts are seeded random words that the checkpoint's tokenizer reads as one token each, so a
prompt has exactly its item's token count and no two prompts share a prefix (``llmd``'s prefix scorer sees no false
sharing). SLO targets are the default classes' scaled to these CPU workers (``SLO_CLASSES``: interactive TTFT
500 ms and TPOT 50 ms, code E2E 1,000 ms, half the defaults), given to the stack as the cluster's classes.

First, on a stack of its own (``token_aware/fcfs``), the benchmark

- calibrates the three workers through the Profiler (``Calibrate``: probe batches through each worker's executor,
  least-squares latency fit), one at a time, each with a core to itself, and notes the share of a core each worker
  process had meanwhile;
- measures the serving stack's costs beyond the fitted forward pass at idle, as ``bench.fidelity`` does: sequential
  requests through the gateway (per request: TTFT beyond the predicted prefill; per step: TPOT beyond the predicted
  decode step), and a burst of 8 (per further sequence in a step);
- replays a light-load run (``light_rate``) of the same mix, to show the targets are met when the stack is not
  overloaded (``token_aware/fcfs`` there attains about 100%).

Then, per pair, a fresh stack: the workers are warmed with a few probe batches (no requests, so every pair's
length predictor starts from the same empty history), and the workload is replayed open loop through the gateway,
with every process's CPU time taken before and after.

The simulator (``bench.simulator.Simulator``) predicts each pair on the same items and cluster, with a
``services.profiles.ProfiledLatency`` per worker and the measured overheads, twice:

- *idle fit*: the calibrated profiles as they are. This is the simulator's blind prediction, and on a small shared
  machine it is far too optimistic: under load the three workers, the gateway, balancer, profiler and the replay
  client share the cores, so each worker gets about half the core it had while calibrated, and its steps take
  about twice as long. The simulator has no notion of CPU contention;
- *live CPU*: each worker's fitted step times (and the per-step overheads) multiplied by the share of a core it had
  while calibrated over the share it had when busy under load: the largest share of a core its process had in any
  overload run (CPU seconds over the run's wall seconds; the largest, because a worker that sometimes waits for
  work, as behind a balancer that holds requests back, uses less CPU without running slower). One factor per
  worker for every pair. It is measured on the live runs, so this column is not blind: it asks whether the
  simulator, told how much CPU a busy worker really gets, ranks the pairs as the live stack does. The light run
  keeps the idle fit (its workers idle much of the time).

Reported per pair: SLO attainment (overall and per class), the two simulated attainments, satisfaction (live and
simulated with live CPU), TTFT p50/p90, mean E2E, preemptions per request, the mean share of a core per worker, and
failed or refused requests. The check: ``sage``'s attainment above each fcfs pair's, live and simulated. JSON (with
per-process CPU, routing counts, calibration and overheads) goes to ``bench/results/live_slo.json``.

Overload level: 24 requests/s (about 1,120 output tokens/s offered, some 1.4 times what the stack serves at
saturation on an otherwise idle 2-core machine, 720-850 tokens/s); there ``token_aware/fcfs`` attains about 10%.
18 requests/s (840 tokens/s) sits on the knee, and results there were bimodal over four invocations: ``sage``
26 / 90 / 13 / 90%, ``token_aware/fcfs`` 2 / 28 / 4 / 93%, ``llmd/fcfs`` 48 / 56 / 91 / 96% (the last on a machine
nothing else used, where all three kept up; in the others the workers of some pairs got less CPU). Near the knee ``sage``
either keeps up (about 90%, no preemptions) or falls behind: the KV cache fills, ``sage`` preempts to admit the
requests it ranks first, steps stay filled to the 512-token budget with prefill (admissions and recomputes), such a
step takes 150-350 ms on half a CPU core, and every running interactive request misses its 50 ms TPOT target (10-25%
attained, 0.2-0.3 preemptions a request). ``fcfs`` never preempts to admit, so with a full cache its steps are short
decodes. The simulator, given the live CPU share, shows the same cliff at about the same load. The knee moves with
the machine's other load (in 15-second runs right after other benchmarks, ``token_aware/fcfs`` attained all at 6/s
and about two thirds at 12/s). Compare pairs within one invocation only, on a machine nothing else is using.

Not modelled by the simulator: CPU contention (the *live CPU* column stands in for it), and a live balancer that
knows no latency model for a checkpoint outside the catalog (it prices these workers from their reported step
times; the simulator's balancer is handed the fitted profile). With equal workers ``token_aware``'s ordering is the
same either way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.engine import bench_checkpoint
from bench.metrics import RequestRecord, summarize
from bench.replay import ReplayItem, replay
from bench.report import write_json
from bench.simulator import Simulator
from bench.stack_fidelity import loadavg, process_cpu_s, stack_cpu_s
from bench.traces import TraceError, default_trace_path, load_azure
from services.cluster import ClusterSpec, WorkerSpec
from services.fit import FittedLatency
from services.profiles import ProfiledLatency, from_profile
from services.rpc import profiler_pb2, profiler_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.slo import DEFAULT_SLO_CLASSES, SloClass

PAIRS = ("token_aware/sage", "token_aware/fcfs", "llmd/fcfs", "round_robin/fcfs")   # with the peer and the floor
OURS = "token_aware/sage"
LIGHT_PAIR = "token_aware/fcfs"
TARGET_SCALE = 0.5                     # the default classes' targets times this, for CPU workers
SLO_CLASSES: dict[str, SloClass] = {
    "interactive": SloClass(ttft_ms=DEFAULT_SLO_CLASSES["interactive"].ttft_ms * TARGET_SCALE,
                            tpot_ms=DEFAULT_SLO_CLASSES["interactive"].tpot_ms * TARGET_SCALE),
    "code": SloClass(e2e_ms=DEFAULT_SLO_CLASSES["code"].e2e_ms * TARGET_SCALE),
}
TRACE_RATES = {"interactive": 4.78, "code": 2.47}      # requests/s of Azure conv and code over their first 600 s
TRACES = {"interactive": "conv", "code": "code"}
MAX_PROMPT, MAX_ANSWER, CAP = 768, 128, 256


@dataclass
class Settings:
    rate: float = 24.0                 # requests/s of the overload run: ~1.4x the stack's token throughput
    duration_s: float = 60.0           # seconds of arrivals
    light_rate: float = 4.0            # requests/s of the light-load reference run (0: skip it)
    light_duration_s: float = 20.0
    length_scale: float = 0.25
    seed: int = 0
    workers: int = 3
    kv_blocks: int = 512               # x 16 tokens = 8,192 KV tokens a worker
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    torch_threads: int = 1
    calibrate: bool = True             # False: no simulator column
    pairs: tuple[str, ...] = PAIRS


# ----- workload --------------------------------------------------------------------------------------------
def workload(rate: float, duration_s: float, seed: int, length_scale: float, window: int) -> list[ReplayItem]:
    """Poisson arrivals at ``rate``; each an interactive (Azure conv) or code (Azure code) request in the traces'
    proportion, with a random row's lengths times ``length_scale``, clipped to fit the window."""
    rng = random.Random(seed)
    rows = {cls: load_azure(default_trace_path(name), duration_s=600) for cls, name in TRACES.items()}
    share = TRACE_RATES["interactive"] / sum(TRACE_RATES.values())
    items, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            return items
        cls = "interactive" if rng.random() < share else "code"
        row = rng.choice(rows[cls])
        n_out = max(1, min(MAX_ANSWER, round(row.output_tokens * length_scale)))
        n_in = max(2, min(MAX_PROMPT, round(row.input_tokens * length_scale), window - CAP - 1))
        items.append(ReplayItem(t, n_in, n_out, cls, max_tokens=CAP))


def one_token_words(folder: Path) -> list[str]:
    """Words the checkpoint's tokenizer reads as a single token after a space."""
    from transformers import AutoTokenizer

    from workers.executors.checkpoint import WORDS

    tok = AutoTokenizer.from_pretrained(str(folder))
    words = [w for w in WORDS if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    if len(words) < 16:
        raise RuntimeError(f"{folder}: its tokenizer reads too few words as one token ({len(words)})")
    return words


def prompt_maker(words: Sequence[str], seed: int) -> Callable[[ReplayItem], str]:
    """Exactly ``item.input_tokens`` tokens (BOS and one token a word, each after a space), seeded per item so the
    same item gets the same text in every pair's run and no two items share a prefix."""
    def prompt_for(item: ReplayItem) -> str:
        rng = random.Random(f"{seed}:{item.arrival_s!r}:{item.input_tokens}")
        return " " + " ".join(rng.choice(words) for _ in range(item.input_tokens - 1))
    return prompt_for


# ----- the stack -------------------------------------------------------------------------------------------
def cluster_of(folder: Path, pair: str, s: Settings) -> ClusterSpec:
    routing, _, engine = pair.partition("/")
    return ClusterSpec(routing_policy=routing, engine_policy=engine, slo_classes=SLO_CLASSES, workers=[
        WorkerSpec(id=f"cpu-{k}", executor="torch", model=str(folder), kv_blocks=s.kv_blocks,
                   max_num_seqs=s.max_num_seqs, max_num_batched_tokens=s.max_num_batched_tokens,
                   torch_threads=s.torch_threads) for k in range(s.workers)])


def _each_worker(stack: object, cluster: ClusterSpec, call: Callable[[str], object]) -> dict[str, object]:
    """``call(address)`` for every worker at once (threads), by worker id."""
    with ThreadPoolExecutor(len(cluster.workers)) as pool:
        futures = {w.id: pool.submit(call, stack.worker_address(w.id)) for w in cluster.workers}
        return {wid: f.result() for wid, f in futures.items()}


WARM_PROBES = [worker_pb2.ProbeSpec(prefill_tokens=p) for p in (64, 256, 512)] + \
    [worker_pb2.ProbeSpec(batch=b, context=c) for b, c in ((1, 128), (8, 256), (16, 256))]


def warm(stack: object, cluster: ClusterSpec) -> None:
    """A few probe batches through every worker's executor (one-time kernel set-up), no requests: nothing reaches
    the Profiler's length history."""
    def one(address: str) -> None:
        with grpc.insecure_channel(address) as channel:
            worker_pb2_grpc.WorkerStub(channel).Profile(worker_pb2.ProfileRequest(probes=WARM_PROBES, repeats=1),
                                                        timeout=120)
    _each_worker(stack, cluster, one)


def calibrate(stack: object, cluster: ClusterSpec, window: int) -> tuple[dict[str, ProfiledLatency], dict]:
    """Every worker calibrated by the Profiler, one at a time (each has a core to itself, the others idle); their
    latency for the simulator, the fit errors, and the share of a core each worker's process had meanwhile."""
    latency, info = {}, {}
    for spec in cluster.workers:
        address, pid = stack.worker_address(spec.id), stack.processes[f"worker-{spec.id}"].popen.pid
        cpu0, wall0 = process_cpu_s(pid), time.perf_counter()
        with grpc.insecure_channel(stack.profiler_address) as channel:
            r = profiler_pb2_grpc.ProfilerStub(channel).Calibrate(
                profiler_pb2.CalibrateRequest(worker_address=address, repeats=5), timeout=900)
        cpu1, wall = process_cpu_s(pid), time.perf_counter() - wall0
        latency[spec.id] = ProfiledLatency(from_profile(r.profile), r.profile.kv_capacity_tokens, window)
        info[spec.id] = {"prefill_median_error": r.prefill_median_error, "decode_median_error": r.decode_median_error,
                         "probes": r.probes, "wall_s": wall,
                         "cpu_share": (cpu1 - cpu0) / wall if None not in (cpu0, cpu1) else None,
                         "coefficients_ms": {k: getattr(r.profile, k) for k in (
                             "prefill_a0", "prefill_a1", "prefill_a2", "decode_c0", "decode_c1", "decode_c2")}}
    return latency, info


def slowed(latency: dict[str, ProfiledLatency], factors: dict[str, float]) -> dict[str, ProfiledLatency]:
    """Each worker's fitted step times times its factor."""
    out = {}
    for wid, lm in latency.items():
        f, k = lm.fitted, factors.get(wid, 1.0)
        out[wid] = ProfiledLatency(FittedLatency(f.a0 * k, f.a1 * k, f.c0 * k, f.c1 * k, f.c2 * k, f.a2 * k),
                                   lm.kv_capacity_tokens(), lm.max_model_len)
    return out


def _median_tpot(records: Sequence[RequestRecord]) -> float:
    return statistics.median((r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1)
                             for r in records if r.ok and len(r.token_times) > 1)


def measure_overheads(address: str, latency: ProfiledLatency, prompt_for: Callable[[ReplayItem], str]) -> dict:
    """The stack's costs beyond the fitted forward pass, at idle (as ``bench.fidelity``): per request, per step,
    per further sequence in a step."""
    n_in, n_out = 200, 30
    singles = [ReplayItem(0.5 * k, n_in, n_out, "code", max_tokens=CAP) for k in range(8)]  # one at a time
    records, _ = asyncio.run(replay(address, singles, slo_classes=SLO_CLASSES, prompt_for=prompt_for))
    ok = [r for r in records if r.ok]
    if len(ok) < len(records) // 2:
        raise RuntimeError(f"idle probes failed: {sorted({r.error for r in records if r.error})[:3]}")
    step = max(0.0, _median_tpot(ok) - latency.decode_time(1, n_in + n_out // 2))
    request = max(0.0, statistics.median(r.token_times[0] - r.arrival for r in ok) - latency.prefill_time(n_in) - step)
    burst = [ReplayItem(0.0, n_in, n_out, "code", max_tokens=CAP) for _ in range(8)]        # eight at once
    records, _ = asyncio.run(replay(address, burst, slo_classes=SLO_CLASSES, prompt_for=prompt_for))
    per_seq = max(0.0, (_median_tpot(records) - latency.decode_time(8, n_in + n_out // 2) - step) / 7)
    return {"request_overhead_s": request, "step_overhead_s": step, "step_overhead_per_seq_s": per_seq}


def replay_live(stack: object, items: Sequence[ReplayItem], prompt_for: Callable[[ReplayItem], str],
                progress: Progress, label: str) -> tuple[list[RequestRecord], float]:
    task = progress.add_task(label, total=len(items))
    records, duration = asyncio.run(replay(stack.gateway_address, items, slo_classes=SLO_CLASSES, timeout_s=600,
                                           prompt_for=prompt_for, on_done=lambda _: progress.advance(task)))
    progress.update(task, visible=False)
    return records, duration


def simulate(cluster: ClusterSpec, items: Sequence[ReplayItem], latency: dict[str, ProfiledLatency],
             overheads: dict) -> dict:
    result = Simulator(cluster, latency=latency, **overheads).run(items)
    return summarize(result.records, result.duration_s)


# ----- report ----------------------------------------------------------------------------------------------
def row_of(summary: dict) -> dict:
    a = summary["all"]
    return {"attainment": a["slo_attainment"], "satisfaction": a["satisfaction"],
            "attainment_by_class": {c: summary[c]["slo_attainment"] for c in SLO_CLASSES if c in summary},
            "ttft_ms_p50": a["ttft_ms_p50"], "ttft_ms_p90": a["ttft_ms_p90"], "e2e_ms_mean": a["e2e_ms_mean"],
            "preemptions": a["preemptions"], "preemptions_per_request": a["preemptions"] / max(1, a["offered"]),
            "offered": a["offered"], "failed": a["failed"], "throughput_tok_s": a["throughput_tok_s"]}


def _f(v: float, digits: int = 0) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.{digits}f}"


def _pct(v: float | None) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.1%}"


def table_of(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for col in ("run", "pair", "SLO met", "interactive / code", "sim: idle fit", "sim: live CPU", "satisfaction",
                "sim satisf.", "TTFT p50/p90 ms", "E2E mean ms", "preempt/req", "CPU/worker", "failed"):
        table.add_column(col, justify="left" if col in ("run", "pair") else "right", no_wrap=True)
    for k, r in enumerate(rows):
        live, idle_fit, loaded = r["live"], r.get("simulated"), r.get("simulated_live_cpu")
        by = live["attainment_by_class"]
        shares = [v for name, v in r["cpu_cores"].items() if name.startswith("worker-") and v is not None]
        table.add_row(r["run"], r["pair"], _pct(live["attainment"]),
                      " / ".join(_pct(by.get(c)) for c in SLO_CLASSES),
                      _pct(idle_fit["attainment"]) if idle_fit else "-", _pct(loaded["attainment"]) if loaded else "-",
                      _f(live["satisfaction"], 3), _f(loaded["satisfaction"], 3) if loaded else "-",
                      f"{_f(live['ttft_ms_p50'])} / {_f(live['ttft_ms_p90'])}", _f(live["e2e_ms_mean"]),
                      _f(live["preemptions_per_request"], 2), _f(statistics.mean(shares), 2) if shares else "-",
                      f"{live['failed']:.0f}/{live['offered']:.0f}",
                      end_section=r["run"] == "light" and k + 1 < len(rows))
    return table


@dataclass
class Run:
    run: str
    pair: str
    live: dict
    simulated: dict | None = None
    wall_s: float = 0.0
    duration_s: float = 0.0
    load_average: list[float] | None = None
    errors: list[str] = field(default_factory=list)
    workers_used: dict[str, int] = field(default_factory=dict)
    cpu_cores: dict[str, float | None] = field(default_factory=dict)     # per process: CPU seconds / wall second
    simulated_live_cpu: dict | None = None
    slowdown: dict[str, float] = field(default_factory=dict)            # per worker, for simulated_live_cpu


def run(settings: Settings | None = None, out: Path | None = Path("bench/results/live_slo.json"),
        console: Console | None = None) -> dict:
    """Calibrate, light-load reference, then each pair on a fresh stack, live and simulated; returns the JSON
    payload (written to ``out`` unless None)."""
    from tandem.launcher import LocalStack, StackError

    s = settings or Settings()
    for pair in s.pairs:
        if pair.count("/") != 1:
            raise ValueError(f"a pair is ROUTE/ENGINE, got {pair!r}")
    if console is None:
        console = Console(stderr=True)
        if not console.is_terminal:
            console.width = max(console.width, 200)
    started = time.perf_counter()
    with console.status("preparing the checkpoint and the workload ..."):
        folder = bench_checkpoint().resolve()
        window = json.loads((folder / "config.json").read_text())["max_position_embeddings"]
        prompt_for = prompt_maker(one_token_words(folder), s.seed)
        items = workload(s.rate, s.duration_s, s.seed, s.length_scale, window)
        light = workload(s.light_rate, s.light_duration_s, s.seed + 1, s.length_scale, window) if s.light_rate else []
    if not items:
        raise ValueError("the workload is empty: raise the rate or the duration")
    log_root = Path(tempfile.mkdtemp(prefix="tandem-live-slo-"))
    console.print(f"{len(items)} requests over {s.duration_s:g} s ({s.rate:g}/s) on {s.workers} CPU torch workers "
                  f"({folder.name}, {s.torch_threads} thread each); stack logs under {log_root}")

    latency: dict[str, ProfiledLatency] | None = None
    calibration: dict = {}
    overheads: dict = {}
    runs: list[Run] = []

    def stack_for(pair: str, name: str) -> "LocalStack":
        console.print(f"starting a {pair} stack ({name}) ...")
        return LocalStack(cluster_of(folder, pair, s), gateway_port=0, log_dir=log_root / name)

    def live_row(name: str, pair: str, stack: "LocalStack", work: list[ReplayItem], label: str) -> Run:
        t0, load, cpu0 = time.perf_counter(), loadavg(), stack_cpu_s(stack)
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, transient=True)
        with progress:
            records, duration = replay_live(stack, work, prompt_for, progress, label)
        wall, cpu1 = time.perf_counter() - t0, stack_cpu_s(stack)
        cores = {name: (cpu1[name] - cpu0[name]) / wall if None not in (cpu0[name], cpu1[name]) else None
                 for name in cpu0}
        workers: dict[str, int] = {}
        for r in records:
            workers[r.worker_id or "-"] = workers.get(r.worker_id or "-", 0) + 1
        done = Run(name, pair, row_of(summarize(records, duration)), wall_s=wall, duration_s=duration,
                   load_average=load, workers_used=dict(sorted(workers.items())), cpu_cores=cores,
                   errors=sorted({r.error for r in records if r.error})[:5])
        console.print(f"{name} {pair}: {done.live['attainment']:.1%} SLO met live, {done.live['failed']:.0f} failed, "
                      f"replay {done.wall_s:.0f} s" + (f"; errors: {done.errors}" if done.errors else ""))
        return done

    try:
        if s.calibrate or light:
            with stack_for(LIGHT_PAIR, "calibration") as stack:
                if s.calibrate:
                    with console.status("calibrating the workers (all at once) ..."):
                        latency, calibration = calibrate(stack, stack.cluster, window)
                    with console.status("measuring the stack's overheads at idle ..."):
                        overheads = measure_overheads(stack.gateway_address, median_worker(latency), prompt_for)
                    console.print("calibrated: " + ", ".join(
                        f"{wid} fit error prefill {c['prefill_median_error']:.0%} decode {c['decode_median_error']:.0%}"
                        for wid, c in calibration.items()) + "; overheads " + ", ".join(
                        f"{k.removesuffix('_s')} {v * 1000:.2f} ms" for k, v in overheads.items()))
                else:
                    warm(stack, stack.cluster)
                if light:
                    runs.append(live_row("light", LIGHT_PAIR, stack, light,
                                         f"light load {LIGHT_PAIR} ({s.light_rate:g}/s)"))
        for pair in s.pairs:
            with stack_for(pair, pair.replace("/", "_")) as stack:
                warm(stack, stack.cluster)
                runs.append(live_row("overload", pair, stack, items, f"{pair} ({s.rate:g}/s)"))
    except StackError as e:
        raise RuntimeError(f"the stack failed: {e} (logs under {log_root})") from e
    except grpc.RpcError as e:
        raise RuntimeError(f"a call to the stack failed: {e.code().name}: {e.details()} (logs under {log_root})") from e

    busiest: dict[str, float] = {}
    if latency is not None:
        # the CPU a busy worker gets on this machine under this load: the largest share each worker had in any
        # overload run (a worker that waits for work, as behind a balancer holding requests, shows less)
        for r in runs:
            if r.run != "light":
                for wid in latency:
                    share = r.cpu_cores.get(f"worker-{wid}")
                    if share:
                        busiest[wid] = max(busiest.get(wid, 0.0), share)
        factors = slowdown(calibration, busiest)
        mean = statistics.mean(factors.values()) if factors else 1.0
        loaded_overheads = {**overheads, **{k: v * mean for k, v in overheads.items() if k != "request_overhead_s"}}
        with console.status("simulating the same items ..."):
            for r in runs:
                work = light if r.run == "light" else items
                r.simulated = row_of(simulate(cluster_of(folder, r.pair, s), work, latency, overheads))
                if r.run != "light":         # a light run's workers idle much of the time: no contention to speak of
                    r.slowdown = factors
                    r.simulated_live_cpu = row_of(simulate(cluster_of(folder, r.pair, s), work,
                                                           slowed(latency, factors), loaded_overheads))

    rows = [asdict(r) for r in runs]
    over = {r.pair: r for r in runs if r.run == "overload"}
    checks = {}
    if OURS in over:
        for peer in (p for p in over if p != OURS):
            checks[f"{OURS} > {peer}"] = {
                "live": over[OURS].live["attainment"] > over[peer].live["attainment"],
                "simulated_idle_fit": (over[OURS].simulated["attainment"] > over[peer].simulated["attainment"])
                if latency is not None else None,
                "simulated_live_cpu": (over[OURS].simulated_live_cpu["attainment"]
                                       > over[peer].simulated_live_cpu["attainment"]) if latency is not None else None}
    title = (f"live SLO check: {len(items)} requests ({s.rate:g}/s for {s.duration_s:g} s, Azure conv as interactive "
             f"+ code, lengths x{s.length_scale:g}, hidden) on {s.workers} CPU torch workers; targets "
             f"interactive TTFT {SLO_CLASSES['interactive'].ttft_ms:g} ms / TPOT {SLO_CLASSES['interactive'].tpot_ms:g} ms, "
             f"code E2E {SLO_CLASSES['code'].e2e_ms:g} ms")
    width = console.width
    if not console.is_terminal:          # a log or a pipe: room for the whole table (rich prints at most its width)
        console.width = max(width, 200)
    try:
        console.print(table_of(rows, title))
    finally:
        console.width = width
    if latency is None:
        console.print("no simulator column: calibration was skipped (the simulator needs a fitted profile to model "
                      "CPU torch workers)")
    def said(v: bool | None) -> str:
        return "-" if v is None else ("yes" if v else "NO")

    for name, c in checks.items():
        console.print(f"{name}: live {said(c['live'])}; simulator, idle fit {said(c['simulated_idle_fit'])}, "
                      f"live CPU share {said(c['simulated_live_cpu'])}")
    wall = time.perf_counter() - started
    console.print(f"wall time {wall:.0f} s")
    payload = {"settings": asdict(s), "slo_classes": {k: v.model_dump() for k, v in SLO_CLASSES.items()},
               "checkpoint": str(folder), "window": window, "requests": len(items), "light_requests": len(light),
               "calibration": calibration, "overheads": overheads, "busy_cpu_share": busiest, "runs": rows,
               "checks": checks, "wall_s": wall, "load_average_end": loadavg(), "logs": str(log_root)}
    if out is not None:
        console.print(f"results: {write_json(out, payload)}")
    return payload


def slowdown(calibration: dict, busy_share: dict[str, float]) -> dict[str, float]:
    """Per worker: the share of a core it had while calibrated over the share it had when busy under load (>= 1),
    i.e. how much slower its steps ran for want of CPU."""
    out = {}
    for wid, c in calibration.items():
        live = busy_share.get(wid)
        if c.get("cpu_share") and live:
            out[wid] = max(1.0, c["cpu_share"] / live)
    return out


def median_worker(latency: dict[str, ProfiledLatency]) -> ProfiledLatency:
    """One worker's fit to price the idle probes with: the one whose prefill of 200 tokens is the median."""
    ranked = sorted(latency.values(), key=lambda lm: lm.prefill_time(200))
    return ranked[len(ranked) // 2]


def main(argv: Sequence[str] | None = None) -> dict:
    d = Settings()
    parser = argparse.ArgumentParser(prog="python -m bench.live_slo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=d.rate, help=f"requests/s of the overload run ({d.rate:g})")
    parser.add_argument("--duration", type=float, default=d.duration_s, help=f"seconds of arrivals ({d.duration_s:g})")
    parser.add_argument("--light-rate", type=float, default=d.light_rate,
                        help=f"requests/s of the light-load reference run, 0 to skip ({d.light_rate:g})")
    parser.add_argument("--light-duration", type=float, default=d.light_duration_s)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--pairs", nargs="+", default=list(d.pairs), help="ROUTE/ENGINE pairs")
    parser.add_argument("--no-simulator", action="store_true", help="skip calibration and the simulator column")
    parser.add_argument("--out", type=Path, default=Path("bench/results/live_slo.json"))
    args = parser.parse_args(argv)
    settings = Settings(rate=args.rate, duration_s=args.duration, light_rate=args.light_rate,
                        light_duration_s=args.light_duration, seed=args.seed, pairs=tuple(args.pairs),
                        calibrate=not args.no_simulator)
    try:
        return run(settings, args.out)
    except (RuntimeError, ValueError, TraceError) as e:
        Console(stderr=True).print(f"[red]live-slo: {e}[/red]")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
