"""The discrete-event simulator and scenario files: determinism, accounting, load response, bad input."""

from __future__ import annotations

import pytest

from bench.scenario import Scenario, Source, build_workload, load_jsonl, load_scenario
from bench.simulate import BASELINES, simulate_once
from bench.simulator import Simulator
from bench.traces import TraceError
from services.cluster import ClusterSpec, WorkerSpec

CLUSTER = ClusterSpec(workers=[WorkerSpec(id="a100", gpu_type="A100-80G"), WorkerSpec(id="a10", gpu_type="A10"),
                               WorkerSpec(id="t4", gpu_type="T4")])
SCENARIO = Scenario(name="small", duration_s=60, sources=[Source(trace="azure-conv", slo_class="interactive"),
                                                          Source(trace="azure-code", slo_class="code")])


def summary(pair: str, scenario: Scenario = SCENARIO) -> dict:
    return simulate_once(CLUSTER, scenario, pair)["summary"]


def test_same_seed_same_result():
    a, b = summary("capacity/fcfs"), summary("capacity/fcfs")
    assert a == b


def test_every_request_is_accounted_for_and_nothing_leaks():
    items = build_workload(SCENARIO, 4096)
    sim = Simulator(CLUSTER, "capacity", "fcfs")
    result = sim.run(items)
    assert len(result.records) == len(items)
    done = [r for r in result.records if r.ok]
    assert len(done) == len(items) and all(r.completion_tokens == i.output_tokens
                                           for r, i in zip(sorted(result.records, key=lambda r: int(r.request_id[1:])),
                                                           items))
    assert all(w.engine.scheduler.blocks.num_used_blocks == 0 and not w.engine.scheduler.has_work() for w in sim.workers.values())
    assert not sim.registry.assignments and all(w.state.outstanding == 0 for w in sim.workers.values())
    assert all(0 <= u <= 1 for series in result.utilization.values() for u in series)


def test_more_load_never_helps_slo_attainment():
    values = [summary("capacity/fcfs", SCENARIO.model_copy(update={"rate_scale": s}))["all"]["slo_attainment"]
              for s in (1.0, 4.0, 16.0)]
    assert values[0] >= values[1] >= values[2] and values[0] > values[2]


@pytest.mark.parametrize("pair", [*BASELINES, "capacity/priority", "capacity/oracle", "token_aware/fcfs",
                                  "least_kv/fcfs", "adaptive/fcfs"])
def test_baselines_and_policies_run_by_name(pair):
    s = summary(pair, SCENARIO.model_copy(update={"duration_s": 20}))
    assert s["all"]["offered"] > 0 and s["all"]["completed"] + s["all"]["failed"] == s["all"]["offered"]


def test_capacity_routing_beats_round_robin_on_uneven_gpus():
    loaded = SCENARIO.model_copy(update={"rate_scale": 2.0})
    assert summary("capacity/fcfs", loaded)["all"]["e2e_ms_p90"] < summary("round_robin/fcfs", loaded)["all"]["e2e_ms_p90"]


def test_default_scenario_and_synthetic_arrivals():
    sc = load_scenario()
    items = build_workload(sc.model_copy(update={"duration_s": 120}), 4096)
    classes = {i.slo_class for i in items}
    assert classes == {"interactive", "code", "batch"}
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(items, items[1:]))
    doubled = build_workload(sc.model_copy(update={"duration_s": 120, "rate_scale": 2.0}), 4096)
    assert doubled[-1].arrival_s < 61


@pytest.mark.parametrize("text,problem", [
    ("sources: []", "sources"),
    ("sources: [{trace: azure-conv, colour: red}]", "colour"),
    ("sources: [{trace: sharegpt}]", "no arrival times"),
    ("sources: [{trace: azure-conv, arrival: weibull}]", "arrival"),
    ("name: [", "YAML"),
])
def test_bad_scenarios_are_clear_errors(tmp_path, text, problem):
    path = tmp_path / "scenario.yaml"
    path.write_text(text)
    with pytest.raises(TraceError, match=problem):
        build_workload(load_scenario(path), 4096)


def test_jsonl_traces(tmp_path):
    good = tmp_path / "t.jsonl"
    good.write_text('{"arrival_s": 1.5, "input_tokens": 10, "output_tokens": 5}\n'
                    '{"arrival_s": 0.5, "input_tokens": 20, "output_tokens": 3}\n')
    assert [r.arrival_s for r in load_jsonl(good)] == [0.5, 1.5]
    sc = Scenario(duration_s=10, sources=[Source(trace=str(good))])
    assert len(build_workload(sc, 4096)) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"arrival_s": 1, "input_tokens": 10}\n')
    with pytest.raises(TraceError, match="bad.jsonl:1"):
        load_jsonl(bad)


def test_goodput_bisects_between_known_points_and_meets_the_target():
    from bench.simulate import goodput

    scenario = Scenario(name="tiny", duration_s=20, sources=[Source(trace="azure-conv", slo_class="interactive")])
    best, points = goodput(CLUSTER, scenario, "capacity/fcfs", iterations=3, known=[(1.0, 1.0), (64.0, 0.0)])
    assert 1.0 <= best < 64.0 and (1.0, 1.0) in points and len(points) == 2 + 3
    at_best = simulate_once(CLUSTER, scenario.model_copy(update={"rate_scale": best}), "capacity/fcfs")
    assert at_best["summary"]["all"]["slo_attainment"] >= 0.9
    above = [v for s, v in points if s > best]
    assert above and all(v < 0.9 for v in above)          # every rate tried above the answer missed the target
