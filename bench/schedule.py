"""``schedule()`` time with 256 running and 1,000 waiting requests, per policy (target: under 0.5 ms).

Steady decode: every running request gets one token per iteration and none finishes, so the scheduler does
the work of a full batch every time; the waiting queue is full but there is no free sequence slot.
``python -m bench.schedule`` prints a table and writes JSON.
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
from workers.request import Request, SamplingParams
from workers.scheduler import Scheduler, SchedulerConfig


def measure(policy: str, running: int = 256, waiting: int = 1000, iterations: int = 300) -> dict[str, float]:
    clock = VirtualClock()
    # the budget admits all `running` in one step (rtc forms one batch); orca reserves 64 + 4,096 tokens each
    sched = Scheduler(SchedulerConfig(max_num_seqs=running, max_num_batched_tokens=64 * running,
                                      max_model_len=1 << 20),
                      BlockManager(200_000, 16, 0.0), make_policy(policy), clock)
    for i in range(running + waiting):
        sched.add_request(Request(f"r{i}", [1] * 64, SamplingParams(max_tokens=4096), clock.now(),
                                  priority=0 if i < running else -1))
        clock.advance(0.0001)
    out = sched.schedule()                      # admit and prefill the first `running`
    sched.update(out, {s.request.request_id: 7 for s in out.scheduled if s.samples})
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        out = sched.schedule()
        times.append(time.perf_counter() - start)
        sched.update(out, {s.request.request_id: 7 for s in out.scheduled if s.samples})
        clock.advance(0.01)
    assert sched.num_running == running and sched.num_waiting == waiting
    ms = sorted(t * 1000 for t in times)
    return {"median_ms": statistics.median(ms), "p90_ms": ms[int(0.9 * len(ms))], "mean_ms": statistics.fmean(ms)}


def run(policies: tuple[str, ...] = ("fcfs", "priority", "rtc", "orca"),
        out: Path | None = Path("bench/results/schedule.json")) -> dict:
    console = Console(stderr=True)
    rows = {p: measure(p) for p in policies}
    table = Table(title="schedule() with 256 running and 1,000 waiting (target < 0.5 ms)")
    for col in ("policy", "median ms", "p90 ms", "mean ms"):
        table.add_column(col, justify="right")
    for p, r in rows.items():
        table.add_row(p, f"{r['median_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['mean_ms']:.3f}")
    console.print(table)
    if out is not None:
        console.print(f"results: {write_json(out, {'running': 256, 'waiting': 1000, 'policies': rows})}")
    return rows


if __name__ == "__main__":
    run()
