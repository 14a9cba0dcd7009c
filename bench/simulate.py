"""``tandem bench simulate`` and ``tandem bench goodput``: policies compared in the simulator on a scenario.

Goodput is the highest rate scale at which overall SLO attainment stays >= 90% (DESIGN.md), found by
bisection on the scenario's rate scale, per policy pair.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table

from bench.metrics import summarize
from bench.report import summary_table, write_json
from bench.scenario import Scenario, build_workload, load_scenario
from bench.simulator import Simulator
from services.cluster import ClusterSpec, load_cluster
from services.catalog import model as model_spec

#: What users would pick instead, in every comparison: llm-d's default profile in front of vLLM-style fcfs engines
#: (what teams run today), SGLang's cache-aware gateway, and round robin as the floor; SLoB's rtc and orca.
BASELINES = ("round_robin/fcfs", "llmd/fcfs", "sglang_cache_aware/fcfs", "round_robin/rtc", "round_robin/orca")
TANDEM_DEFAULT = "token_aware/sage"
CLAIRVOYANT = "token_aware/sage:clairvoyant"   # sage given true lengths (named path): prices prediction error
DEFAULT_POLICIES = (*BASELINES, TANDEM_DEFAULT, CLAIRVOYANT)


def default_cluster_path() -> Path:
    return Path(str(resources.files("services.data").joinpath("sim_cluster.yaml")))


def split(pair: str) -> tuple[str, str]:
    """"route/engine" (engine fcfs when left out); an engine may carry ``:clairvoyant``, see ``engine_options``."""
    route, _, engine = pair.partition("/")
    return route, (engine or "fcfs").partition(":")[0]


def engine_options(pair: str) -> dict[str, object] | None:
    """``route/sage:clairvoyant`` is sage's clairvoyant twin (true lengths through the named option); None
    keeps the cluster file's options."""
    flag = pair.partition("/")[2].partition(":")[2]
    if not flag:
        return None
    if flag != "clairvoyant":
        raise ValueError(f"{pair!r}: the only engine flag is ':clairvoyant'")
    return {"clairvoyant": True}


def simulate_once(cluster: ClusterSpec, scenario: Scenario, pair: str, report_interval_s: float | None = None) -> dict:
    """One policy pair on a scenario; ``report_interval_s`` None takes the cluster file's (the live default)."""
    route, engine = split(pair)
    window = min(model_spec(w.model).max_model_len for w in cluster.workers)
    items = build_workload(scenario, window)
    started = time.perf_counter()
    result = Simulator(cluster, route, engine, seed=scenario.seed, report_interval_s=report_interval_s,
                       engine_options=engine_options(pair)).run(items)
    return {"policy": pair, "requests": len(items), "wall_s": time.perf_counter() - started,
            "sim_duration_s": result.duration_s, "summary": summarize(result.records, result.duration_s),
            "utilization": result.utilization, "bin_s": result.bin_s, "shed": result.shed,
            "records": result.records}


def capacity_bound(cluster: ClusterSpec, items: Sequence) -> float:
    """Sum of each worker's saturated throughput for the workload's length mix (engine run alone, virtual time)."""
    from profiler.capacity import engine_saturated_throughput
    from services.latency import LatencyModel

    mix = [(i.input_tokens, i.output_tokens) for i in items[:2000]]
    per_kind: dict[tuple[str, str], float] = {}
    for w in cluster.workers:
        key = (w.gpu_type, w.model)
        if key not in per_kind:
            per_kind[key] = engine_saturated_throughput(LatencyModel.from_names(w.gpu_type, w.model), mix,
                                                        max_num_seqs=w.max_num_seqs, warmup_s=20, window_s=60)
    return sum(per_kind[(w.gpu_type, w.model)] for w in cluster.workers)


def run_simulate(cluster_path: Path | None = None, scenario_path: Path | None = None,
                 policies: Sequence[str] = DEFAULT_POLICIES, rate_scale: float | None = None,
                 out: Path | None = Path("bench/results/simulate.json"), console: Console | None = None,
                 report_interval_s: float | None = None) -> dict:
    console = console or Console(stderr=True)
    cluster = load_cluster(cluster_path or default_cluster_path())
    scenario = load_scenario(scenario_path)
    if rate_scale is not None:
        scenario = scenario.model_copy(update={"rate_scale": rate_scale})
    runs = []
    for pair in policies:
        with console.status(f"simulating {pair} ..."):
            run = simulate_once(cluster, scenario, pair, report_interval_s)
        runs.append(run)
        console.print(summary_table(run["summary"], f"{pair}: {run['requests']:,} requests of '{scenario.name}' "
                                                    f"x{scenario.rate_scale:g} on {len(cluster.workers)} workers "
                                                    f"(simulated in {run['wall_s']:.1f} s)"))
    window = min(model_spec(w.model).max_model_len for w in cluster.workers)
    bound = capacity_bound(cluster, build_workload(scenario, window))
    table = Table(title=f"scenario '{scenario.name}' x{scenario.rate_scale:g}, {len(cluster.workers)} workers, "
                        f"capacity bound {bound:,.0f} tok/s")
    for col in ("policy", "SLO met", "satisfaction", "TTFT p50/p99 ms", "E2E p50/p99 ms", "tok/s", "shed"):
        table.add_column(col, justify="right")
    for run in runs:
        a = run["summary"]["all"]
        table.add_row(run["policy"], f"{a['slo_attainment']:.1%}", f"{a['satisfaction']:.3f}",
                      f"{a['ttft_ms_p50']:,.0f}/{a['ttft_ms_p99']:,.0f}", f"{a['e2e_ms_p50']:,.0f}/{a['e2e_ms_p99']:,.0f}",
                      f"{a['throughput_tok_s']:,.0f}", str(run["shed"]))
    console.print(table)
    payload = {"scenario": scenario.model_dump(), "cluster": cluster.model_dump(), "capacity_bound_tok_s": bound,
               "report_interval_s": report_interval_s,
               "runs": [{k: v for k, v in r.items() if k != "records"} for r in runs]}
    if out is not None:
        console.print(f"results: {write_json(out, payload)}")
    return {**payload, "runs": runs}


def goodput(cluster: ClusterSpec, scenario: Scenario, pair: str, lo: float = 0.25, hi: float = 16.0,
            iterations: int = 7, target: float = 0.9, known: Sequence[tuple[float, float]] = ()
            ) -> tuple[float, list[tuple[float, float]]]:
    """The highest rate scale with attainment >= target (bisection in log space), and every point tried.
    ``known`` (scale, attainment) points already measured narrow the bracket before any new run."""
    points: list[tuple[float, float]] = list(known)

    def attainment(scale: float) -> float:
        run = simulate_once(cluster, scenario.model_copy(update={"rate_scale": scale}), pair)
        value = run["summary"]["all"]["slo_attainment"]
        points.append((scale, value))
        return value

    meeting = [s for s, v in known if v >= target]
    missing = [s for s, v in known if v < target]
    lo = max(meeting, default=lo)
    hi = min([s for s in missing if s > lo], default=hi)
    if not meeting and attainment(lo) < target:
        return 0.0, sorted(points)
    if not missing and attainment(hi) >= target:
        return hi, sorted(points)
    for _ in range(iterations):
        mid = (lo * hi) ** 0.5
        if attainment(mid) >= target:
            lo = mid
        else:
            hi = mid
    return lo, sorted(points)


def run_goodput(cluster_path: Path | None = None, scenario_path: Path | None = None,
                policies: Sequence[str] = DEFAULT_POLICIES, out: Path | None = Path("bench/results/goodput.json"),
                console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    cluster = load_cluster(cluster_path or default_cluster_path())
    scenario = load_scenario(scenario_path)
    rows = {}
    for pair in policies:
        with console.status(f"bisecting the rate scale for {pair} ..."):
            best, points = goodput(cluster, scenario, pair)
        rows[pair] = {"goodput_rate_scale": best, "points": points}
        console.print(f"{pair}: goodput x{best:.2f}")
    table = Table(title=f"goodput: highest rate scale of '{scenario.name}' with >= 90% SLO attainment")
    for col in ("policy", "goodput (rate scale)", "vs round_robin/fcfs"):
        table.add_column(col, justify="right")
    base = rows.get("round_robin/fcfs", {}).get("goodput_rate_scale") or 0.0
    for pair, r in rows.items():
        table.add_row(pair, f"x{r['goodput_rate_scale']:.2f}",
                      f"{r['goodput_rate_scale'] / base:.2f}x" if base else "-")
    console.print(table)
    payload = {"scenario": scenario.model_dump(), "policies": rows}
    if out is not None:
        console.print(f"results: {write_json(out, payload)}")
    return payload


def run_replay(address: str | None = None, scenario_path: Path | None = None, cluster_path: Path | None = None,
               rate_scale: float | None = None, out: Path | None = Path("bench/results/replay.json"),
               console: Console | None = None) -> dict:
    """Replay a scenario against a live gateway (or a local stack of the cluster file when no address is given),
    open loop with the trace's timing, and print the same table the simulator prints."""
    import asyncio

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from bench.replay import replay
    from tandem.launcher import LocalStack

    console = console or Console(stderr=True)
    scenario = load_scenario(scenario_path)
    if rate_scale is not None:
        scenario = scenario.model_copy(update={"rate_scale": rate_scale})
    cluster = load_cluster(cluster_path) if cluster_path or address is None else None
    window = min(model_spec(w.model).max_model_len for w in cluster.workers) if cluster else 4096
    items = build_workload(scenario, window)
    stack = None
    if address is None:
        with console.status("starting a local stack ..."):
            stack = LocalStack(cluster, gateway_port=0).start()
        address = stack.gateway_address
    try:
        with Progress(TextColumn("replaying {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task(f"'{scenario.name}' ({len(items)} requests)", total=len(items))
            classes = cluster.slo_classes if cluster and cluster.slo_classes else None
            records, duration = asyncio.run(replay(address, items, slo_classes=classes,
                                                   on_done=lambda _: progress.advance(task)))
    finally:
        if stack is not None:
            stack.stop()
    summary = summarize(records, duration)
    console.print(summary_table(summary, f"live replay of '{scenario.name}' x{scenario.rate_scale:g} on {address}"))
    payload = {"scenario": scenario.model_dump(), "address": address, "wall_s": duration, "summary": summary}
    if out is not None:
        console.print(f"results: {write_json(out, payload)}")
    return payload
