"""Deployment planner: only configurations that fit, the best one by exhaustive search, clear errors."""

import pytest

from services.latency import LatencyModel
from profiler.planner import Inventory, Machine, candidates, load_inventory, plan


def test_only_fitting_configurations_are_tried():
    t4 = Machine(name="t4", gpu_type="T4", count=4)
    tps = {tp for tp, _, _ in candidates(t4, "llama-2-13b")}
    assert 1 not in tps and tps <= {2, 4}          # 26 GB of weights do not fit one 16 GB T4
    a100 = Machine(name="a", gpu_type="A100-80G", count=6)
    assert {(tp, n) for tp, n, _ in candidates(a100, "llama-2-7b")} == {(1, 6), (2, 3)}   # tp divides the count


def test_plan_picks_the_best_configuration_per_machine():
    inv = Inventory(machines=[Machine(name="a10s", gpu_type="A10", count=2)], mean_input=512, mean_output=128)
    results = plan(inv, "llama-2-7b")["a10s"]
    assert results and results[0].tok_s == max(c.tok_s for c in results)
    assert all(c.tp * c.instances == 2 for c in results)


def test_tensor_parallel_pays_for_communication():
    one = LatencyModel.from_names("L40S", "llama-2-7b")
    two = LatencyModel.from_names("L40S", "llama-2-7b", tp=2)
    assert two.allreduce_time(256) > 0 == one.allreduce_time(256)
    assert one.decode_time(8, 512) / 2 < two.decode_time(8, 512) < one.decode_time(8, 512)
    assert two.kv_capacity_tokens() > 2 * one.kv_capacity_tokens()


@pytest.mark.parametrize("text,problem", [
    ("machines: []", "machines"),
    ("machines: [{name: x, gpu_type: B300, count: 2}]", "unknown GPU type"),
    ("machines: [{name: x, gpu_type: A10, count: 0}]", "count"),
    ("machines: [{name: x, gpu_type: A10, count: 1, colour: red}]", "colour"),
])
def test_bad_inventories(tmp_path, text, problem):
    path = tmp_path / "inv.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem):
        load_inventory(path)
