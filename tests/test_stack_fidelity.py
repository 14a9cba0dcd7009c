"""Whole-stack fidelity on a tiny slice: the default local stack against the simulator, structure only.

No accuracy assertion: a few seconds of trace on a shared CI machine is too noisy for one (see
``python -m bench.stack_fidelity`` for the full comparison).
"""

from __future__ import annotations

import math

import pytest

from bench.stack_fidelity import LABELS, METRICS, ProbeSizes, delivery_spreads, fraction_prompts, run
from services.latency import LatencyModel

TINY = ProbeSizes(singles=2, bursts=1, burst_size=4, gateway_burst_size=8)


def test_probe_prompts_spread_the_millisecond_fractions():
    lm = LatencyModel.from_names("A100-80G", "llama-2-7b")
    prompts = fraction_prompts(lm, 1, 4)
    fractions = sorted((lm.decode_time(1, n + 16) * 1000) % 1 for n in prompts)
    assert len(set(prompts)) == 4 and fractions[-1] - fractions[0] > 0.5


def test_delivery_spread_per_further_stream():
    # three streams, two steps 20 ms apart; within a step the tokens arrive 0.1 ms after one another
    streams = [[0.0, 0.020 + 0.0001 * k, 0.040 + 0.0001 * k] for k in range(3)]
    assert [round(s, 6) for s in delivery_spreads(streams)] == [0.0001, 0.0001]


@pytest.mark.slow
def test_stack_fidelity_on_a_tiny_slice(tmp_path):
    out = tmp_path / "stack_fidelity.json"
    payload = run(duration_s=6, scales=(1.0,), out=out, probes=TINY, jitter_runs=1)
    assert out.exists()
    rows = payload["table"]
    assert [r["metric"] for r in rows] == list(METRICS) and set(METRICS) == set(LABELS)
    for r in rows:
        assert r["scale"] == 1.0
        for key in ("live", "simulated", "simulated_zero_overhead"):
            assert r[key] > 0 and not math.isnan(r[key])
        assert {"difference", "difference_zero_overhead", "within_tolerance", "simulated_range"} <= set(r)
    scale = payload["per_scale"]["x1"]
    assert scale["requests"] > 0
    assert scale["live_requests"] == scale["simulated_requests"] == scale["requests"]
    assert scale["live_failed"] == 0 and scale["simulated_failed"] == 0, scale["live_errors"]
    overheads = scale["overheads"][0]
    assert set(overheads["per_worker"]) == {"a100-0", "l40s-0", "a10-0"}
    assert all(overheads[k] >= 0 for k in ("request_hit_s", "request_miss_extra_s", "step_s", "step_per_seq_s",
                                           "delivery_per_seq_s"))
    assert 0 < overheads["request_hit_s"] < 0.2 and 0 < overheads["step_s"] < 0.05


def test_simulator_delivers_a_steps_tokens_one_stream_after_another():
    from bench.replay import ReplayItem
    from bench.simulator import Simulator
    from services.cluster import ClusterSpec, WorkerSpec

    cluster = ClusterSpec(workers=[WorkerSpec(id="a100-0", gpu_type="A100-80G")])
    items = [ReplayItem(0.0, 100, 5) for _ in range(4)]
    plain = Simulator(cluster).run(items).records
    assert [r.token_times for r in Simulator(cluster, delivery_per_seq_s=0.0).run(items).records] == \
        [r.token_times for r in plain]
    late = Simulator(cluster, delivery_per_seq_s=0.001).run(items).records
    for a, b in zip(sorted(plain, key=lambda r: r.request_id), sorted(late, key=lambda r: r.request_id)):
        shifts = {round(y - x, 9) for x, y in zip(a.token_times, b.token_times)}
        assert shifts <= {0, 0.001, 0.002, 0.003}                  # its place in each step, 1 ms a place
    pairs = zip(sorted(plain, key=lambda r: r.request_id), sorted(late, key=lambda r: r.request_id))
    assert sorted(round(b.token_times[0] - a.token_times[0], 9) for a, b in pairs) == [0, 0.001, 0.002, 0.003]
