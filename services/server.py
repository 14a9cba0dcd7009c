"""Bootstrap shared by every service: a grpc.aio server with health, reflection, tracing and graceful drain.

On SIGTERM or SIGINT a service turns its health to NOT_SERVING, runs its drain hooks (a worker stops
accepting and lets open streams finish), then stops the server with a grace period, so open streams either
finish or end with a clean status. Once listening it prints ``READY <service> <host:port>`` on stdout, which
is how launchers learn a port that was picked by the OS.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from typing import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from services import logs
from services.metrics import ServiceMetrics
from services.settings import ServiceSettings
from services.telemetry import Telemetry
from services.tls import Tls, TlsError

log = logging.getLogger(__name__)

Hook = Callable[[], Awaitable[None]]


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


#: How many calls gRPC core may hold for us before our loop asks for them, and for how long. A grpc.aio server
#: asks core for one call at a time (one or two event-loop turns each), so a burst of new streams, or a steady
#: stream of them while the loop is busy relaying tokens, waits in core's pending queue. Past
#: ``grpc.server.max_pending_requests`` (default 1000) core drops new calls at random, past its hard limit
#: (default 3000) all of them, and it drops any call left there longer than
#: ``grpc.server_max_unrequested_time_in_server`` (default 30 s); a dropped call ends CANCELLED, details
#: "CANCELLED", before any handler, interceptor or log line of ours runs (issue 10). Overload is ours to answer
#: with a documented status (RESOURCE_EXHAUSTED with a retry hint), and a client's deadline still ends a call
#: waiting there (DEADLINE_EXCEEDED), so core's backlog is made too large and too patient ever to decide.
MAX_PENDING_CALLS = 1 << 16      # bounded all the same: memory under a flood stays finite
MAX_UNREQUESTED_S = 3600


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [*channel_options(max_message_bytes),
            ("grpc.so_reuseport", 0),     # a port already taken must fail loudly, not be shared with a stale server
            ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
            ("grpc.server_max_unrequested_time_in_server", MAX_UNREQUESTED_S)]


class ServiceHost:
    def __init__(self, name: str, settings: ServiceSettings) -> None:
        logs.setup(name, settings.log_level)
        self.name = name
        self.settings = settings
        self.telemetry = Telemetry(name)
        try:
            self.tls = Tls.from_settings(settings)
        except TlsError as e:
            raise SystemExit(f"{name}: {e}") from None
        self.metrics = ServiceMetrics(name, settings.host, settings.metrics_port)
        self.server = grpc.aio.server(interceptors=[self.telemetry.server_interceptor()],
                                      options=server_options(settings.max_message_bytes))
        self.health = HealthServicer()
        self._service_names: list[str] = []
        self._start_hooks: list[Hook] = []
        self._drain_hooks: list[Hook] = []
        self._stop = asyncio.Event()
        self.port = 0

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    def add_service(self, add_to_server: Callable[[object, grpc.aio.Server], None], servicer: object,
                    full_name: str) -> None:
        add_to_server(servicer, self.server)
        self._service_names.append(full_name)

    def on_start(self, hook: Hook) -> None:
        self._start_hooks.append(hook)

    def on_drain(self, hook: Hook) -> None:
        self._drain_hooks.append(hook)

    def announce(self, kind: str, url: str) -> None:
        """Tell launchers about another endpoint of this service (``ENDPOINT <service> <kind> <url>``)."""
        log.info("endpoint", extra={"fields": {"kind": kind, "url": url}})
        print(f"ENDPOINT {self.name} {kind} {url}", flush=True)

    def bind(self) -> int:
        """Listen before start, so services can learn their own address (workers advertise it)."""
        address = f"{self.settings.host}:{self.settings.port}"
        credentials = self.tls.server_credentials() if self.tls is not None else None
        self.port = (self.server.add_secure_port(address, credentials) if credentials is not None
                     else self.server.add_insecure_port(address))
        if self.port == 0:
            raise SystemExit(f"{self.name}: cannot listen on {self.settings.host}:{self.settings.port}")
        return self.port

    async def run(self) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [*self._service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.server)
        if not self.port:
            self.bind()
        await self.server.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        for hook in self._start_hooks:
            await hook()
        for name in ["", *self._service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.metrics.url:
            self.announce("metrics", self.metrics.url)
        log.info("listening", extra={"fields": {"address": self.address}})
        print(f"READY {self.name} {self.address}", flush=True)
        await self._stop.wait()
        log.info("draining", extra={"fields": {"grace_s": self.settings.drain_grace_s}})
        deadline = time.monotonic() + self.settings.drain_grace_s
        await self.health.enter_graceful_shutdown()
        for hook in self._drain_hooks:
            try:
                await hook()
            except Exception:
                log.exception("drain hook failed")
        await self.server.stop(max(0.0, deadline - time.monotonic()))     # one grace in all, hooks included
        self.telemetry.shutdown()
        self.metrics.shutdown()
        log.info("stopped")


def run_service(factory: Callable[[], Awaitable[ServiceHost]]) -> None:
    """Build a service inside its event loop (gRPC and engine objects belong to it) and run it to the end."""

    async def main() -> None:
        host = await factory()
        await host.run()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    sys.stdout.flush()
