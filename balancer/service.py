"""The Balancer service: registration and load streams from workers, Route and Release from gateways."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Sequence

import grpc

from balancer.registry import INFO_FIELDS, LOAD_FIELDS, Registry, WorkerState
from balancer.routing import RouteContext, make_policy
from services import settings as settings_mod
from services.profiler import profiles
from services.rpc import balancer_pb2, balancer_pb2_grpc
from services.server import ServiceHost, run_service
from services.telemetry import Telemetry

log = logging.getLogger(__name__)


def worker_status(state: WorkerState, now: float) -> balancer_pb2.WorkerStatus:
    info = balancer_pb2.WorkerInfo(worker_id=state.worker_id, **{k: getattr(state, k) for k in INFO_FIELDS})
    load = balancer_pb2.LoadReport(worker_id=state.worker_id, **{k: getattr(state, k) for k in LOAD_FIELDS})
    return balancer_pb2.WorkerStatus(info=info, load=load, outstanding=state.outstanding,
                                     last_report_age_s=max(0.0, now - state.last_seen),
                                     state="draining" if state.draining else "serving",
                                     capacity_tok_s=state.capacity_tok_s, profile_source=state.profile_source)


class BalancerServicer(balancer_pb2_grpc.BalancerServicer):
    def __init__(self, cfg: settings_mod.BalancerSettings, telemetry: Telemetry) -> None:
        self.cfg = cfg
        self.tracer = telemetry.tracer
        self.registry = Registry(time.monotonic, cfg.worker_timeout_s)
        self.policy = make_policy(cfg.routing_policy)
        self._background: set[asyncio.Task] = set()

    async def reap(self) -> None:
        """Take silent workers out of rotation; runs for the life of the service."""
        while True:
            self.registry.expire()
            await asyncio.sleep(min(0.1, self.cfg.worker_timeout_s / 4))

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
        return balancer_pb2.RegisterWorkerResponse(report_interval_s=self.cfg.report_interval_s)

    async def _learn_capacity(self, state: WorkerState) -> None:
        """Ask the Profiler how fast this worker is; off the registration path, best effort."""
        try:
            profile = await profiles.fetch(self.cfg.profiler_address, state.model, state.gpu_type, state.executor)
        except grpc.aio.AioRpcError as e:
            log.warning("no profile for worker", extra={"fields": {"worker_id": state.worker_id, "code": e.code().name}})
            return
        if profile is not None:
            state.capacity_tok_s = profiles.latency_model(profile).saturated_decode_tok_s()
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
            span.set_attribute("tandem.request_id", request.request_id)
            span.set_attribute("tandem.slo_class", request.slo_class)
            candidates = self.registry.routable(frozenset(request.exclude_workers))
            if not candidates:
                span.set_attribute("tandem.outcome", "no_worker")
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"no worker available ({len(self.registry.workers)} registered, "
                                    f"{len(request.exclude_workers)} excluded)")
            choice = self.policy.pick(RouteContext(request.request_id, request.slo_class, request.prompt_chars,
                                                   request.max_tokens, request.priority, request.tenant),
                                      candidates)
            self.registry.acquire(choice.worker_id)
            span.set_attribute("tandem.worker_id", choice.worker_id)
            span.set_attribute("tandem.gpu_type", choice.gpu_type)
            return balancer_pb2.RouteResponse(worker_id=choice.worker_id, address=choice.address)

    async def Release(self, request: balancer_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
                      ) -> balancer_pb2.ReleaseResponse:
        self.registry.release(request.worker_id)
        return balancer_pb2.ReleaseResponse()

    async def ListWorkers(self, request: balancer_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
                          ) -> balancer_pb2.ListWorkersResponse:
        now = time.monotonic()
        workers = sorted(self.registry.workers.values(), key=lambda s: s.worker_id)
        return balancer_pb2.ListWorkersResponse(workers=[worker_status(s, now) for s in workers],
                                                routing_policy=self.cfg.routing_policy)


def main(argv: Sequence[str] = ()) -> None:
    cfg = settings_mod.load(settings_mod.BalancerSettings, argv, prog="tandem serve balancer")

    async def build() -> ServiceHost:
        host = ServiceHost("balancer", cfg)
        servicer = BalancerServicer(cfg, host.telemetry)
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
