"""compose.yaml checked without a Docker engine: the compose specification's JSON schema, then our own settings.

The schema ships inside the docker-compose wheel, which scripts/dev downloads (without its dependencies) into
.venv/share/tandem.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from services import settings
from tandem.cli import SERVICES

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"gateway": settings.GatewaySettings, "balancer": settings.BalancerSettings,
            "worker": settings.WorkerSettings, "profiler": settings.ProfilerSettings}


def compose_schema() -> dict:
    wheels = sorted((Path(sys.prefix) / "share" / "tandem").glob("docker_compose-*.whl"))
    assert wheels, "compose schema missing: run `scripts/dev setup` (it downloads the docker-compose wheel)"
    with zipfile.ZipFile(wheels[-1]) as wheel:
        return json.loads(wheel.read("compose/config/compose_spec.json"))


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def validate(document: dict) -> None:
    jsonschema.Draft201909Validator(compose_schema()).validate(document)


def test_compose_file_matches_the_compose_specification(compose):
    validate(compose)


def test_the_schema_check_catches_mistakes(compose):
    broken = json.loads(json.dumps(compose))
    broken["services"]["gateway"]["ports"] = {"not": "a list"}
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def test_stack_has_every_service_three_gpu_types_jaeger_and_prometheus(compose):
    services = compose["services"]
    kinds = {name: svc["command"][1] for name, svc in services.items() if svc.get("command", [None])[0] == "serve"}
    assert set(kinds.values()) == set(SERVICES)
    workers = [svc for svc in services.values() if svc.get("command", [None])[:2] == ["serve", "worker"]]
    gpus = {svc["command"][svc["command"].index("--gpu-type") + 1] for svc in workers}
    assert len(workers) == 3 and len(gpus) == 3
    assert services["jaeger"]["image"].startswith("jaegertracing/")
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    for name, svc in services.items():
        if "command" in svc and svc["command"][0] == "serve":
            assert svc["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317", name


def test_every_service_command_and_environment_loads_as_settings(compose, monkeypatch):
    """What each container would run parses with our settings models, and points at real peers."""
    services = compose["services"]
    addresses = {}
    for name, svc in services.items():
        if svc.get("command", [None])[0] != "serve":
            continue
        kind, argv = svc["command"][1], svc["command"][2:]
        for var in list(__import__("os").environ):
            if var.startswith("TANDEM_"):
                monkeypatch.delenv(var)
        for key, value in svc.get("environment", {}).items():
            monkeypatch.setenv(key, str(value))
        cfg = settings.load(SETTINGS[kind], argv)
        assert cfg.host == "0.0.0.0"
        addresses[name] = cfg
    for name, cfg in addresses.items():
        for field in ("balancer_address", "profiler_address"):
            target = getattr(cfg, field, "")
            if target:
                host, port = target.split(":")
                assert host in services and addresses[host].port == int(port), (name, field, target)
    assert addresses["gateway"].port == 50051
    for name, cfg in addresses.items():
        if isinstance(cfg, settings.WorkerSettings):
            assert cfg.advertise_address == f"{name}:{cfg.port}"


def test_dockerfile_installs_the_project_and_runs_the_cli():
    text = (ROOT / "Dockerfile").read_text()
    assert "pip install ." in text and 'ENTRYPOINT ["tandem"]' in text
    for package in ("services", "gateway", "balancer", "workers", "bench"):
        assert f"COPY {package} {package}" in text


def test_prometheus_scrapes_every_service_on_its_metrics_port(compose, monkeypatch):
    """Prometheus's config lists each Tandem container at the port its settings serve /metrics on."""
    services = compose["services"]
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for group in job["static_configs"] for t in group["targets"]}
    mount = services["prometheus"]["volumes"][0].split(":")
    assert (ROOT / mount[0]).resolve() == (ROOT / "deploy" / "prometheus.yml").resolve()
    assert mount[1] == "/etc/prometheus/prometheus.yml"
    for var in list(__import__("os").environ):
        if var.startswith("TANDEM_"):
            monkeypatch.delenv(var)
    expected = set()
    for name, svc in services.items():
        if svc.get("command", [None])[0] != "serve":
            continue
        with monkeypatch.context() as env:
            for key, value in svc.get("environment", {}).items():
                env.setenv(key, str(value))
            cfg = settings.load(SETTINGS[svc["command"][1]], svc["command"][2:])
        assert cfg.metrics_port > 0, name
        expected.add(f"{name}:{cfg.metrics_port}")
    assert targets == expected
