"""The Balancer service: registration and load streams from workers, Route and Release from gateways."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Callable, Sequence

import grpc

from balancer.admission import AdmissionControl
from balancer.queue import Admission, GlobalQueue, QueueFull, admit, bind, drain, report_interval
from balancer.registry import INFO_FIELDS, LOAD_FIELDS, Registry, WorkerState
from balancer.route_context import RouteContext
from balancer.routing import make_policy
from services import settings as settings_mod
from services import profiles
from services.rpc import balancer_pb2, balancer_pb2_grpc
from services.metrics import ServiceMetrics
from services.server import ServiceHost, run_service
from services.telemetry import Telemetry
from services.tls import Tls

log = logging.getLogger(__name__)


def worker_status(state: WorkerState, now: float) -> balancer_pb2.WorkerStatus:
    info = balancer_pb2.WorkerInfo(worker_id=state.worker_id, **{k: getattr(state, k) for k in INFO_FIELDS})
    load = balancer_pb2.LoadReport(worker_id=state.worker_id, **{k: getattr(state, k) for k in LOAD_FIELDS})
    return balancer_pb2.WorkerStatus(info=info, load=load, outstanding=state.outstanding,
                                     last_report_age_s=max(0.0, now - state.last_seen),
                                     state="draining" if state.draining else "serving",
                                     capacity_tok_s=state.capacity_tok_s, profile_source=state.profile_source)


class BalancerServicer(balancer_pb2_grpc.BalancerServicer):
    def __init__(self, cfg: settings_mod.BalancerSettings, telemetry: Telemetry,
                 clock: Callable[[], float] = time.monotonic, tls: Tls | None = None) -> None:
        """``clock`` is injected so a test can drive the servicer on virtual time."""
        self.cfg = cfg
        self.tls = tls
        self.tracer = telemetry.tracer
        self.clock = clock
        self.registry = Registry(clock, cfg.worker_timeout_s)
        self.policy = make_policy(cfg.routing_policy, **cfg.routing_options)
        admission = AdmissionControl(cfg.admission_busy_s, cfg.admission_slack) if cfg.admission == "slo" else None
        self.queue = GlobalQueue(cfg.queue_limit, cfg.shed_at, cfg.queue_order, clock, admission)
        self._background: set[asyncio.Task] = set()
        self.lease_released = 0
        self.routed: dict[str, int] = {}          # requests bound per worker since start

    async def reap(self) -> None:
        """Take silent workers out of rotation and bind queued requests; runs for the life of the service."""
        while True:
            self.registry.expire()
            self.lease_released += self.registry.expire_leases(self.cfg.gateway_lease_s)
            self._dispatch()
            await asyncio.sleep(min(0.05, self.cfg.worker_timeout_s / 4))

    async def Register(self, request: balancer_pb2.RegisterWorkerRequest, context: grpc.aio.ServicerContext
                       ) -> balancer_pb2.RegisterWorkerResponse:
        w = request.worker
        if not w.worker_id or not w.address:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "worker.worker_id and worker.address are required")
        state = self.registry.register(w.worker_id, **{k: getattr(w, k) for k in INFO_FIELDS})
        if self.cfg.profiler_address:
            task = asyncio.create_task(self._learn_capacity(state))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return balancer_pb2.RegisterWorkerResponse(
            report_interval_s=report_interval(self.policy, self.cfg.report_interval_s))

    async def _learn_capacity(self, state: WorkerState) -> None:
        """Ask the Profiler how fast this worker is; off the registration path, best effort."""
        try:
            profile = await profiles.fetch(self.cfg.profiler_address, state.model, state.gpu_type, state.executor,
                                           tls=self.tls)
        except grpc.aio.AioRpcError as e:
            log.warning("no profile for worker", extra={"fields": {"worker_id": state.worker_id, "code": e.code().name}})
            return
        if profile is not None:
            try:
                state.latency = profiles.latency_model(profile)
            except KeyError:      # a checkpoint outside the catalog: routed by its reports alone
                return
            state.capacity_tok_s = state.latency.saturated_decode_tok_s()
            state.profile_source = profile.source

    async def ReportLoad(self, request_iterator: AsyncIterator[balancer_pb2.LoadReport],
                         context: grpc.aio.ServicerContext) -> balancer_pb2.ReportLoadAck:
        worker_id, generation = "", None
        try:
            async for report in request_iterator:
                if not worker_id:
                    worker_id = report.worker_id
                    state = self.registry.workers.get(worker_id)
                    generation = state.generation if state else None
                if not self.registry.report(report.worker_id, **{k: getattr(report, k) for k in LOAD_FIELDS}):
                    await context.abort(grpc.StatusCode.NOT_FOUND, f"worker {report.worker_id!r} is not registered")
                self._dispatch()
        finally:
            # the stream ending (the worker died or closed it) takes the worker out at once
            if worker_id:
                self.registry.remove(worker_id, "load stream ended", generation)
        return balancer_pb2.ReportLoadAck()

    async def Deregister(self, request: balancer_pb2.DeregisterWorkerRequest, context: grpc.aio.ServicerContext
                         ) -> balancer_pb2.DeregisterWorkerResponse:
        self.registry.remove(request.worker_id, "deregistered")
        return balancer_pb2.DeregisterWorkerResponse()

    async def Route(self, request: balancer_pb2.RouteRequest, context: grpc.aio.ServicerContext
                    ) -> balancer_pb2.RouteResponse:
        with self.tracer.start_as_current_span("balancer.route") as span:
            r = route_context(request)
            span.set_attributes({"tandem.request_id": r.request_id, "tandem.slo_class": r.slo_class,
                                 "tandem.tenant": r.tenant})
            exclude = frozenset(request.exclude_workers)
            candidates = self.registry.routable(exclude)
            if not candidates:
                span.set_attribute("tandem.outcome", "no_worker")
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"no worker available ({len(self.registry.workers)} registered, "
                                    f"{len(exclude)} excluded)")
            try:
                admission = admit(self.policy, self.registry, self.queue, r, candidates, self.clock(), exclude,
                                  asyncio.get_running_loop().create_future())
            except QueueFull as e:
                await self._shed(context, str(e), e.retry_s)
            choice = admission.worker or await self._wait_in_queue(admission, r, context, span)
            span.set_attributes({"tandem.worker_id": choice.worker_id, "tandem.gpu_type": choice.gpu_type})
            self.routed[choice.worker_id] = self.routed.get(choice.worker_id, 0) + 1
            return balancer_pb2.RouteResponse(worker_id=choice.worker_id, address=choice.address)

    async def _wait_in_queue(self, admission: Admission, r: RouteContext, context: grpc.aio.ServicerContext,
                             span: object) -> WorkerState:
        waiter = admission.waiter
        for victim in admission.evicted:
            victim.future.set_exception(QueueFull("evicted from the queue by a more important request"))
        span.add_event("queued", {"tandem.queue_length": len(self.queue)})
        self._dispatch()
        try:
            return await waiter.future
        except QueueFull as e:
            await self._shed(context, str(e))
        except asyncio.CancelledError:   # the caller gave up (deadline, cancel): undo a binding it never used
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self.registry.release(r.request_id)
            raise
        finally:
            self.queue.remove(waiter)

    def _bind(self, r: RouteContext, roomy: list[WorkerState]) -> WorkerState:
        return bind(self.policy, self.registry, self.queue, r, roomy)

    def _dispatch(self) -> None:
        """Bind queued requests, in queue order, while some worker has room for the head."""
        for waiter, roomy in drain(self.queue, lambda w: self.registry.routable(w.exclude)):
            if not waiter.future.done():         # a caller that gave up has already left the queue
                waiter.future.set_result(self._bind(waiter.request, roomy))

    async def _shed(self, context: grpc.aio.ServicerContext, why: str, retry_s: float | None = None) -> None:
        if retry_s is None:
            workers = list(self.registry.workers.values())
            retry_s = sum(w.assigned_work_s for w in workers) / max(1, len(workers))
        retry_ms = int(min(30_000, max(100, retry_s * 1000)))
        context.set_trailing_metadata((("retry-after-ms", str(retry_ms)),))
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{why}; retry in about {retry_ms} ms")

    async def Release(self, request: balancer_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
                      ) -> balancer_pb2.ReleaseResponse:
        self.registry.release(request.request_id)
        self._dispatch()
        return balancer_pb2.ReleaseResponse()

    async def ListWorkers(self, request: balancer_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
                          ) -> balancer_pb2.ListWorkersResponse:
        now = self.clock()
        workers = sorted(self.registry.workers.values(), key=lambda s: s.worker_id)
        return balancer_pb2.ListWorkersResponse(workers=[worker_status(s, now) for s in workers],
                                                routing_policy=self.cfg.routing_policy, queue_length=len(self.queue),
                                                queue_limit=self.queue.limit, shed_total=self.queue.shed,
                                                evicted_total=self.queue.evicted,
                                                lease_released_total=self.lease_released)

    async def RenewLease(self, request: balancer_pb2.RenewLeaseRequest, context: grpc.aio.ServicerContext
                         ) -> balancer_pb2.RenewLeaseResponse:
        if not request.gateway_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "gateway_id is required")
        bindings = self.registry.renew(request.gateway_id)
        return balancer_pb2.RenewLeaseResponse(lease_s=self.cfg.gateway_lease_s, bindings=bindings)


def expose_metrics(servicer: BalancerServicer, metrics: ServiceMetrics) -> None:
    """The balancer's state for Prometheus, read at each scrape."""
    def per_worker(field: str) -> list[tuple[float, dict[str, str]]]:
        return [(getattr(s, field), {"worker_id": w}) for w, s in sorted(servicer.registry.workers.items())]

    metrics.gauges("tandem_balancer_queue_length", "requests waiting at the balancer for a worker with room",
                   lambda: [(len(servicer.queue), {})])
    metrics.gauges("tandem_balancer_workers", "workers registered, by state",
                   lambda: [(sum(1 for s in servicer.registry.workers.values() if s.draining == d),
                             {"state": "draining" if d else "serving"}) for d in (False, True)])
    metrics.gauges("tandem_balancer_outstanding", "requests routed to a worker and not yet released",
                   lambda: per_worker("outstanding"))
    metrics.gauges("tandem_balancer_assigned_work", "predicted worker-seconds of the outstanding requests",
                   lambda: per_worker("assigned_work_s"), unit="s")
    metrics.counters("tandem_balancer_routed", "requests bound to each worker",
                     lambda: [(n, {"worker_id": w}) for w, n in sorted(servicer.routed.items())])
    metrics.counters("tandem_balancer_shed", "requests refused with RESOURCE_EXHAUSTED (evicted ones included)",
                     lambda: [(servicer.queue.shed, {})])
    metrics.counters("tandem_balancer_evicted", "queued sheddable requests pushed out by more important ones",
                     lambda: [(servicer.queue.evicted, {})])
    metrics.counters("tandem_balancer_lease_released", "bindings released because their gateway's lease lapsed",
                     lambda: [(servicer.lease_released, {})])


def route_context(request: balancer_pb2.RouteRequest) -> RouteContext:
    lengths = list(request.predicted_length.lengths)
    slo = request.slo
    return RouteContext(
        request_id=request.request_id, slo_class=request.slo_class,
        prompt_tokens=request.prompt_tokens_estimate or max(1, request.prompt_chars // 4),
        max_tokens=request.max_tokens, predicted_output=lengths[len(lengths) // 2] if lengths else 0.0,
        priority=request.priority, tenant=request.tenant, ttft_ms=slo.ttft_ms, tpot_ms=slo.tpot_ms,
        e2e_ms=slo.e2e_ms, sheddable=request.sheddable or slo.sheddable, prefix_hashes=tuple(request.prefix_hashes),
        predicted_lengths=tuple(lengths), gateway_id=request.gateway_id)


def main(argv: Sequence[str] = ()) -> None:
    cfg = settings_mod.load(settings_mod.BalancerSettings, argv, prog="tandem serve balancer")

    async def build() -> ServiceHost:
        host = ServiceHost("balancer", cfg)
        servicer = BalancerServicer(cfg, host.telemetry, tls=host.tls)
        expose_metrics(servicer, host.metrics)
        host.add_service(balancer_pb2_grpc.add_BalancerServicer_to_server, servicer,
                         balancer_pb2.DESCRIPTOR.services_by_name["Balancer"].full_name)
        reaper: list[asyncio.Task] = []

        async def start() -> None:
            reaper.append(asyncio.create_task(servicer.reap()))

        async def drain() -> None:
            for task in reaper:
                task.cancel()

        host.on_start(start)
        host.on_drain(drain)
        return host

    run_service(build)
