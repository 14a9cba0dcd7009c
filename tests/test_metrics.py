"""Prometheus metrics: every service of a live stack serves /metrics, and the text parses with Prometheus's own
parser into the families an operator would graph, with values that match what the stack did."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.rpc import gateway_pb2, gateway_pb2_grpc
from services.slo import DEFAULT_SLO_CLASSES, SloClass, met
from tests.helpers import cluster, start_stack

pytestmark = pytest.mark.slow


def scrape(url: str) -> dict[str, list]:
    """Family name -> its samples, as Prometheus would read them."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples: list, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = start_stack(cluster("A100-80G", "A10", routing="token_aware"), tmp_path_factory.mktemp("logs"))
    yield s
    s.stop()


async def send(address: str) -> list[grpc.StatusCode]:
    """Five good requests in two classes and one bad one."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def one(req: gateway_pb2.GenerateRequest) -> grpc.StatusCode:
            try:
                async for _ in stub.Generate(req, timeout=30):
                    pass
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as e:
                return e.code()

        reqs = [gateway_pb2.GenerateRequest(prompt=f"tell me about {i}", max_tokens=8, slo_class=c)
                for i, c in enumerate(["interactive"] * 3 + ["code"] * 2)]
        reqs.append(gateway_pb2.GenerateRequest(prompt="x", temperature=-1))
        return await asyncio.gather(*(one(r) for r in reqs))


def test_every_service_serves_metrics_that_prometheus_parses(stack):
    codes = asyncio.run(send(stack.gateway_address))
    assert codes.count(grpc.StatusCode.OK) == 5 and codes[-1] == grpc.StatusCode.INVALID_ARGUMENT
    urls = stack.metrics_urls()
    assert set(urls) == set(stack.processes), f"services without /metrics: {set(stack.processes) - set(urls)}"
    families = {name: scrape(url) for name, url in urls.items()}

    gw = families["gateway"]
    samples = [s for fam in gw.values() for s in fam]
    assert value(samples, "tandem_gateway_requests_total", code="OK", slo_class="interactive") == 3
    assert value(samples, "tandem_gateway_requests_total", code="OK", slo_class="code") == 2
    assert value(samples, "tandem_gateway_requests_total", code="INVALID_ARGUMENT") == 1
    assert value(samples, "tandem_gateway_ttft_milliseconds_count", slo_class="interactive") == 3
    assert value(samples, "tandem_gateway_e2e_milliseconds_count", slo_class="code") == 2
    met_and_missed = (value(samples, "tandem_gateway_slo_met_total") + value(samples, "tandem_gateway_slo_missed_total"))
    assert met_and_missed == 6             # five answers judged, the refused one counted as a miss
    assert value(samples, "tandem_gateway_in_flight") == 0

    balancer = [s for fam in families["balancer"].values() for s in fam]
    assert value(balancer, "tandem_balancer_routed_total") == 5
    assert value(balancer, "tandem_balancer_queue_length") == 0
    assert value(balancer, "tandem_balancer_workers", state="serving") == 2
    for spec in stack.cluster.workers:
        worker = [s for fam in families[f"worker-{spec.id}"].values() for s in fam]
        assert value(worker, "tandem_worker_kv_blocks_total", worker_id=spec.id) > 0
        assert value(worker, "tandem_worker_kv_blocks_used", worker_id=spec.id) == 0
        assert value(worker, "tandem_worker_running") == 0
    workers = [s for name, fams in families.items() if name.startswith("worker-") for fam in fams.values() for s in fam]
    assert value(workers, "tandem_worker_finished_total") == 5
    steps = value(workers, "tandem_worker_step_milliseconds_count")
    assert steps == value(workers, "tandem_worker_iterations_total") > 0
    profiler = [s for fam in families["profiler"].values() for s in fam]
    assert value(profiler, "tandem_profiler_predictions_total") >= 1


@pytest.mark.parametrize("slo,ttft,tpot,e2e,want", [
    (DEFAULT_SLO_CLASSES["interactive"], 900, 99, 20_000, True),
    (DEFAULT_SLO_CLASSES["interactive"], 1100, 50, 1200, False),
    (DEFAULT_SLO_CLASSES["interactive"], 500, 101, 2000, False),
    (DEFAULT_SLO_CLASSES["interactive"], 500, None, 500, True),       # one token: no pace to keep
    (DEFAULT_SLO_CLASSES["code"], 1900, 500, 1999, True),
    (DEFAULT_SLO_CLASSES["code"], 10, 1, 2001, False),
    (SloClass(ttft_ms=100, tpot_ms=10, e2e_ms=500), 50, 5, 600, False),  # an E2E target rules when set
])
def test_the_slo_rule_table(slo, ttft, tpot, e2e, want):
    assert met(slo, ttft, tpot, e2e) is want
