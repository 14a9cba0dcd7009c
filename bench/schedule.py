"""``schedule()`` time with 256 running and 1,000 waiting requests, per policy (target: under 0.5 ms median,
and sa_slo's annealing search under 1 ms at the 99th percentile).

Steady decode: every running request gets one token per iteration and none finishes, so the scheduler does
the work of a full batch every time; the waiting queue is full but there is no free sequence slot. Waiting
requests carry SLOs (a third each of the default classes' targets; the running batch, batch-class ones that
stay on time) and predicted lengths, so the SLO-aware policies triage and rank as they would in service. ``tandem bench schedule`` prints a table and writes JSON.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.report import write_json
from workers.block_manager import BlockManager
from workers.clock import VirtualClock
from workers.policies import make_policy
from services.latency import LatencyModel
from workers.request import Request, SamplingParams, SloTarget
from workers.scheduler import Scheduler, SchedulerConfig


SLOS = (SloTarget("interactive", ttft_s=1.0, tpot_s=0.1), SloTarget("code", e2e_s=2.0),
        SloTarget("batch", e2e_s=60.0))
LENGTHS = ((20.0, 129.0, 450.0), (3.0, 13.0, 80.0), (120.0, 415.0, 850.0))
POLICIES = ("fcfs", "priority", "rtc", "orca", "edf", "sage", "sa_slo", "larry", "slob", "adaptive")


def measure(policy: str, running: int = 256, waiting: int = 1000, iterations: int = 300) -> dict[str, float]:
    clock = VirtualClock()
    latency = LatencyModel.from_names("A100-80G", "llama-2-7b")
    # the budget admits all `running` in one step (rtc forms one batch); orca reserves 64 + 4,096 tokens each
    sched = Scheduler(SchedulerConfig(max_num_seqs=running, max_num_batched_tokens=64 * running,
                                      max_model_len=1 << 20),
                      BlockManager(200_000, 16, 0.0),
                      make_policy(policy, latency=latency, kv_tokens=200_000 * 16), clock)
    for i in range(running + waiting):
        sched.add_request(Request(f"r{i}", [1] * 64, SamplingParams(max_tokens=4096), clock.now(),
                                  priority=0 if i < running else -1, slo=SLOS[2 if i < running else i % 3],
                                  predicted_lengths=LENGTHS[2 if i < running else i % 3]))
        clock.advance(0.0001)
    for _ in range(running):                   # admit and prefill the first `running` (policies may chunk it)
        out = sched.schedule()
        sched.update(out, {s.request.request_id: 7 for s in out.scheduled if s.samples})
        if sched.num_running == running and not any(r.num_pending_tokens > 1 for r in sched.running):
            break
    times: list[float] = []
    searches: list[float] = []
    search = getattr(sched.policy, "search", None)
    if search is not None:                     # time sa_slo's annealing search on its own, where it runs

        def timed_search(*args: object) -> None:
            start = time.perf_counter()
            search(*args)
            searches.append(time.perf_counter() - start)

        sched.policy.search = timed_search  # type: ignore[attr-defined]
    for _ in range(iterations):
        start = time.perf_counter()
        out = sched.schedule()
        times.append(time.perf_counter() - start)
        sched.update(out, {s.request.request_id: 7 for s in out.scheduled if s.samples})
        clock.advance(0.01)
    assert sched.num_running == running and sched.num_waiting == waiting
    ms = sorted(t * 1000 for t in times)
    row = {"median_ms": statistics.median(ms), "p90_ms": ms[int(0.9 * len(ms))], "p99_ms": ms[int(0.99 * len(ms))],
           "mean_ms": statistics.fmean(ms)}
    if searches:
        s_ms = sorted(t * 1000 for t in searches)
        row.update(searches=len(s_ms), search_median_ms=statistics.median(s_ms),
                   search_p99_ms=s_ms[min(len(s_ms) - 1, int(0.99 * len(s_ms)))])
    return row


def run(policies: tuple[str, ...] = POLICIES,
        out: Path | None = Path("bench/results/schedule.json")) -> dict:
    console = Console(stderr=True)
    rows = {p: measure(p) for p in policies}
    table = Table(title="schedule() with 256 running and 1,000 waiting (target: median < 0.5 ms; search p99 < 1 ms)")
    for col in ("policy", "median ms", "p90 ms", "p99 ms", "searches", "search p99 ms"):
        table.add_column(col, justify="right")
    for p, r in rows.items():
        table.add_row(p, f"{r['median_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}",
                      str(r.get("searches", "-")), f"{r['search_p99_ms']:.3f}" if "search_p99_ms" in r else "-")
    console.print(table)
    if out is not None:
        console.print(f"results: {write_json(out, {'running': 256, 'waiting': 1000, 'policies': rows})}")
    return rows


if __name__ == "__main__":
    run()
