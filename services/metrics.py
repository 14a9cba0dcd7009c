"""Prometheus metrics: a meter provider per process, read by OpenTelemetry's Prometheus exporter.

Each service makes its instruments from ``ServiceMetrics.meter`` (the OpenTelemetry metrics API) and, when its
``metrics_port`` is set, serves them as Prometheus text on ``http://host:port/metrics`` (prometheus_client's
server, in a thread of its own, so a scrape never waits on the event loop). The registry is the process's own,
not prometheus_client's global one, and with no port nothing is served and recording costs next to nothing.
Names follow Prometheus conventions: ``tandem_<service>_<what>[_<unit>]``; counters gain ``_total``.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Mapping

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)

# Latency buckets in milliseconds, from a fast token gap to a long batch answer.
LATENCY_MS_BUCKETS = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 250, 500, 750, 1000, 1500, 2000, 3000, 5000, 7500,
                      10_000, 20_000, 30_000, 60_000, 120_000, 300_000)
STEP_MS_BUCKETS = (0.5, 1, 2, 5, 10, 15, 20, 30, 50, 75, 100, 150, 250, 500, 1000, 2500)


Reading = Callable[[], Iterable[tuple[float, Mapping[str, str]]]]


def _observer(read: Reading) -> Callable[[CallbackOptions], list[Observation]]:
    """An OpenTelemetry callback over ``read``'s (value, labels) pairs."""
    return lambda _: [Observation(value, dict(labels)) for value, labels in read()]


class ServiceMetrics:
    """The process's meter and, when asked, its /metrics endpoint."""

    def __init__(self, service: str, host: str = "127.0.0.1", port: int = -1) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        reader = PrometheusMetricReader(registry=self.registry, scope_info_enabled=False)
        self.provider = MeterProvider(metric_readers=[reader],
                                      resource=Resource.create({"service.name": f"tandem-{service}"}))
        self.meter: Meter = self.provider.get_meter("tandem")
        self._server = None
        self.port = 0
        if port >= 0:
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)
            self.port = self._server.server_port

    @property
    def url(self) -> str:
        host = self._server.server_address[0] if self._server else ""
        return f"http://{host}:{self.port}/metrics" if self._server else ""

    def gauges(self, name: str, description: str, read: Reading,
               unit: str = "") -> None:
        """An observable gauge: ``read`` returns (value, labels) pairs at each scrape."""
        self.meter.create_observable_gauge(name, [_observer(read)], unit=unit, description=description)

    def counters(self, name: str, description: str, read: Reading,
                 unit: str = "") -> None:
        """An observable counter over totals the service already keeps (read at each scrape)."""
        self.meter.create_observable_counter(name, [_observer(read)], unit=unit, description=description)

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self.provider.shutdown()
