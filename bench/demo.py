"""The main job on the embedded default: a local stack on loopback replays a slice of a real trace."""

from __future__ import annotations

import asyncio
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.metrics import summarize
from bench.replay import fit_to_window, replay
from bench.report import summary_table, write_json
from bench.traces import default_trace_path, load_azure
from services.cluster import ClusterSpec
from tandem.launcher import LocalStack
from services.catalog import model


def run_demo(cluster: ClusterSpec, *, trace: str = "conv", trace_path: Path | None = None, start_s: float = 0.0,
             duration_s: float = 30.0, rate_scale: float = 1.0, out: Path | None = None,
             log_dir: Path | None = None, console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    slo_class = "code" if trace == "code" else "interactive"
    rows = load_azure(trace_path or default_trace_path(trace), start_s=start_s, duration_s=duration_s)
    window = min(model(w.model).max_model_len for w in cluster.workers if w.executor == "sim")
    items = fit_to_window(rows, window, slo_class, rate_scale)
    with console.status("starting the stack ..."):
        stack = LocalStack(cluster, gateway_port=0, log_dir=log_dir).start()
    try:
        with Progress(TextColumn("replaying {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task(f"{len(items)} requests of the Azure {trace} trace", total=len(items))
            records, duration = asyncio.run(replay(stack.gateway_address, items,
                                                   on_done=lambda _: progress.advance(task)))
    finally:
        with console.status("stopping the stack ..."):
            stack.stop()
    summary = summarize(records, duration)
    workers = ", ".join(f"{w.id} ({w.gpu_type})" for w in cluster.workers)
    console.print(summary_table(summary, f"Azure {trace} trace, {duration_s:.0f} s from {start_s:.0f} s, "
                                         f"rate x{rate_scale:g}, routing {cluster.routing_policy}/"
                                         f"{cluster.engine_policy} on {workers}"))
    per_worker: dict[str, int] = {}
    for r in records:
        per_worker[r.worker_id or "(none)"] = per_worker.get(r.worker_id or "(none)", 0) + 1
    console.print("requests per worker: " + ", ".join(f"{k} {v}" for k, v in sorted(per_worker.items())))
    payload = {"trace": trace, "start_s": start_s, "duration_s": duration_s, "rate_scale": rate_scale,
               "cluster": cluster.model_dump(), "wall_s": duration, "summary": summary, "per_worker": per_worker}
    if out is not None:
        console.print(f"results: {write_json(out, payload)}")
    return payload
