import pytest

from services.cluster import ClusterFileError, load_cluster
from services.settings import GatewaySettings, WorkerSettings, load


def test_flags_override_environment_over_defaults(monkeypatch):
    monkeypatch.setenv("TANDEM_GPU_TYPE", "A10")
    monkeypatch.setenv("TANDEM_KV_BLOCKS", "77")
    cfg = load(WorkerSettings, ["--gpu-type", "T4"])
    assert cfg.gpu_type == "T4" and cfg.kv_blocks == 77 and cfg.block_size == 16


def test_bad_setting_is_a_clear_error():
    with pytest.raises(ValueError, match="executor"):
        load(WorkerSettings, ["--executor", "tpu"])
    with pytest.raises(ValueError, match="max_num_seqs"):
        WorkerSettings(max_num_seqs=0)


def test_slo_classes_from_environment(monkeypatch):
    monkeypatch.setenv("TANDEM_SLO_CLASSES", '{"gold": {"ttft_ms": 200, "tpot_ms": 20}}')
    cfg = load(GatewaySettings, [])
    assert set(cfg.slo_classes) == {"gold"} and cfg.slo_classes["gold"].ttft_ms == 200


def test_default_cluster_has_three_gpu_types():
    spec = load_cluster()
    assert len({w.gpu_type for w in spec.workers}) == 3


@pytest.mark.parametrize("text,problem", [
    ("workers: []", "workers"),
    ("workers: [{id: a, gpu_type: B300}]", "unknown GPU type"),
    ("workers: [{id: a}, {id: a}]", "unique"),
    ("workers: [{id: a, colour: red}]", "colour"),
    ("- just a list", "mapping"),
    ("workers: [{id: a\n", "YAML"),
])
def test_bad_cluster_files_name_the_problem(tmp_path, text, problem):
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    with pytest.raises(ClusterFileError, match=problem):
        load_cluster(path)


def test_missing_cluster_file(tmp_path):
    with pytest.raises(ClusterFileError, match="cannot read"):
        load_cluster(tmp_path / "nope.yaml")


def test_policy_options_come_from_the_cluster_file_to_both_the_simulator_and_the_services(tmp_path):
    from bench.simulator import Simulator
    from services.settings import BalancerSettings

    path = tmp_path / "cluster.yaml"
    path.write_text("routing: {name: prefix_affinity, slack: 2.5, margin: 1}\nengine: {name: priority, aging_per_s: 0.5}\n"
                    "report_interval_s: 0.1\nworkers:\n  - {id: a, gpu_type: A10}\n")
    spec = load_cluster(path)
    assert (spec.routing_policy, spec.routing_options) == ("prefix_affinity", {"slack": 2.5, "margin": 1})
    assert (spec.engine_policy, spec.engine_options) == ("priority", {"aging_per_s": 0.5})
    sim = Simulator(spec)
    assert sim.policy.slack == 2.5 and sim.report_interval_s == 0.1
    assert sim.workers["a"].engine.scheduler.policy.aging_per_s == 0.5
    # the launcher hands them to the services as JSON flags
    assert load(BalancerSettings, ["--routing-options", '{"slack": 2.5}']).routing_options == {"slack": 2.5}
    assert load(WorkerSettings, ["--engine-options", '{"aging_per_s": 0.5}']).engine_options == {"aging_per_s": 0.5}


def test_bad_policy_options_are_clear_errors(tmp_path):
    from bench.simulator import Simulator

    path = tmp_path / "cluster.yaml"
    path.write_text("routing: {name: capacity, wobble: 3}\nworkers:\n  - {id: a, gpu_type: A10}\n")
    with pytest.raises(ValueError, match="capacity.*wobble"):
        Simulator(load_cluster(path))
    path.write_text("routing: {slack: 3}\nworkers:\n  - {id: a, gpu_type: A10}\n")
    with pytest.raises(ClusterFileError, match="routing"):
        load_cluster(path)
