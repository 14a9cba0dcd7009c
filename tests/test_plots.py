"""Result plots are written as real PNG images from simulator output."""

from __future__ import annotations

from bench import plots
from bench.scenario import Scenario, Source
from bench.simulate import simulate_once
from services.cluster import ClusterSpec, WorkerSpec


def test_plots_from_a_small_simulation(tmp_path):
    cluster = ClusterSpec(workers=[WorkerSpec(id="a", gpu_type="A100-80G"), WorkerSpec(id="b", gpu_type="A10")])
    scenario = Scenario(duration_s=30, sources=[Source(trace="azure-conv")])
    runs = {p: simulate_once(cluster, scenario, p) for p in ("round_robin/fcfs", "capacity/fcfs")}
    paths = [
        plots.ttft_cdf({p: r["records"] for p, r in runs.items()}, tmp_path / "cdf.png", "TTFT"),
        plots.attainment_vs_rate({p: [(1.0, r["summary"]["all"]["slo_attainment"]), (2.0, 0.5)]
                                  for p, r in runs.items()}, tmp_path / "att.png", "attainment"),
        plots.utilization(runs["capacity/fcfs"]["utilization"], runs["capacity/fcfs"]["bin_s"], tmp_path / "u.png",
                          "utilisation"),
    ]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
