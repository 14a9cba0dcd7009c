"""One trace per request across the gateway, balancer and worker processes, received over OTLP/gRPC."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest

from services.rpc import gateway_pb2, gateway_pb2_grpc
from tests.helpers import OtlpReceiver, cluster, start_stack, wait_until

pytestmark = pytest.mark.slow

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def test_one_trace_spans_three_processes_with_worker_phases(tmp_path):
    with OtlpReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
        stack = start_stack(cluster("A100-80G", "A10"), tmp_path, env)
        try:
            async def main():
                async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
                    stub = gateway_pb2_grpc.GatewayStub(channel)
                    md = (("traceparent", f"00-{TRACE_ID}-{CLIENT_SPAN}-01"),)
                    return [r async for r in stub.Generate(gateway_pb2.GenerateRequest(prompt="trace me please",
                                                                                       max_tokens=6), metadata=md)]
            replies = asyncio.run(main())
            assert replies[-1].finish_reason == "length"
            trace_id = bytes.fromhex(TRACE_ID)
            wanted = {"gateway.generate", "balancer.route", "worker.generate", "worker.queued", "worker.prefill",
                      "worker.decode"}
            wait_until(lambda: wanted <= {s.name for _, s in receiver.of_trace(trace_id)}, 10, 0.1)
        finally:
            stack.stop()
        spans = receiver.of_trace(trace_id)

    by_name = {s.name: (svc, s) for svc, s in spans}
    by_id = {s.span_id: s for _, s in spans}
    assert {svc for svc, _ in spans} >= {"tandem-gateway", "tandem-balancer", "tandem-worker"}
    assert by_name["gateway.generate"][0] == "tandem-gateway"
    assert by_name["balancer.route"][0] == "tandem-balancer"
    assert by_name["worker.generate"][0] == "tandem-worker"

    def ancestors(span):
        chain = []
        while span.parent_span_id in by_id:
            span = by_id[span.parent_span_id]
            chain.append(span.name)
        return chain, span.parent_span_id

    gateway = by_name["gateway.generate"][1]
    assert gateway.parent_span_id == bytes.fromhex(CLIENT_SPAN)     # continues the client's traceparent
    for name in ("balancer.route", "worker.generate"):
        chain, root_parent = ancestors(by_name[name][1])
        assert "gateway.generate" in chain, (name, chain)
        assert root_parent == bytes.fromhex(CLIENT_SPAN)
    worker = by_name["worker.generate"][1]
    phases = [by_name[n][1] for n in ("worker.queued", "worker.prefill", "worker.decode")]
    assert all(p.parent_span_id == worker.span_id for p in phases)
    assert phases[0].start_time_unix_nano <= phases[1].start_time_unix_nano <= phases[2].start_time_unix_nano
    assert phases[2].end_time_unix_nano <= worker.end_time_unix_nano + 5_000_000
    attrs = {a.key: a.value for a in worker.attributes}
    assert attrs["tandem.completion_tokens"].int_value == 6 and attrs["tandem.gpu_type"].string_value
    # batch-level work: engine steps are spans linked to the request they ran
    steps = [s for _, s in receiver.spans if s.name == "engine.step" and any(l.span_id == worker.span_id for l in s.links)]
    assert steps, "no engine.step span links to the request"


def test_nothing_is_exported_without_an_endpoint(monkeypatch):
    from services.telemetry import Telemetry, exporting_configured

    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    assert not Telemetry("test").exporting
    assert exporting_configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"})
    assert not exporting_configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317", "OTEL_SDK_DISABLED": "true"})
    assert os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") is None
