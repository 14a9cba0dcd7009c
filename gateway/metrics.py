"""What the gateway counts for Prometheus: every request's final status, its latencies and whether it met its
SLO, by class; requests in flight; retries before the first token and the requests they saved (failovers)."""

from __future__ import annotations

from opentelemetry.metrics import Meter

from services.metrics import LATENCY_MS_BUCKETS
from services.rpc import common_pb2
from services.slo import SloClass, met


class GatewayMetrics:
    def __init__(self, meter: Meter) -> None:
        self.requests = meter.create_counter(
            "tandem_gateway_requests", description="requests by final gRPC status code and SLO class")
        self.in_flight = meter.create_up_down_counter(
            "tandem_gateway_in_flight", description="requests accepted and not yet ended")
        self.ttft = meter.create_histogram("tandem_gateway_ttft", unit="ms", description="time to first token",
                                           explicit_bucket_boundaries_advisory=LATENCY_MS_BUCKETS)
        self.tpot = meter.create_histogram("tandem_gateway_tpot", unit="ms",
                                           description="mean time per output token after the first",
                                           explicit_bucket_boundaries_advisory=LATENCY_MS_BUCKETS)
        self.e2e = meter.create_histogram("tandem_gateway_e2e", unit="ms", description="arrival to last token",
                                          explicit_bucket_boundaries_advisory=LATENCY_MS_BUCKETS)
        self.slo_met = meter.create_counter("tandem_gateway_slo_met", description="answers that met their SLO")
        self.slo_missed = meter.create_counter(
            "tandem_gateway_slo_missed", description="answers that missed their SLO (failed requests count too)")
        self.retries = meter.create_counter(
            "tandem_gateway_retries", description="attempts on another worker after one failed before a token")
        self.failovers = meter.create_counter(
            "tandem_gateway_failovers", description="requests answered by another worker after one failed")

    def ended(self, slo_class: str, code: str) -> None:
        self.requests.add(1, {"code": code, "slo_class": slo_class})
        if code not in ("OK", "CANCELLED"):         # a client that hung up chose to; the rest are misses
            self.slo_missed.add(1, {"slo_class": slo_class})

    def answered(self, slo_class: str, slo: SloClass, m: common_pb2.RequestMetrics, failed_over: bool) -> None:
        labels = {"slo_class": slo_class}
        tpot = m.tpot_ms if m.completion_tokens > 1 else None
        self.ttft.record(m.ttft_ms, labels)
        if tpot is not None:
            self.tpot.record(tpot, labels)
        self.e2e.record(m.e2e_ms, labels)
        (self.slo_met if met(slo, m.ttft_ms, tpot, m.e2e_ms) else self.slo_missed).add(1, labels)
        if failed_over:
            self.failovers.add(1, labels)
