"""The Worker service: runs one engine, streams each request's tokens, registers and reports to the balancer."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from typing import AsyncIterator, Sequence

import grpc
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from services import rpc
from services import settings as settings_mod
from services.rpc import balancer_pb2, balancer_pb2_grpc, common_pb2, worker_pb2
from services.rpc import worker_pb2_grpc
from services.engine_traits import REFUSED_KEY
from services.metrics import STEP_MS_BUCKETS, ServiceMetrics
from services.server import ServiceHost, run_service
from services.telemetry import Telemetry
from services.tls import Tls
from services.validation import Invalid, check_lengths, check_sampling
from services import profiles
from workers.build import build_engine
from workers.clock import RealClock
from workers.engine import Engine, IterationStats
from services.fit import Probe
from workers.probe import ProbeError, run_probes
from workers.request import Request, RequestStatus, SamplingParams, SloTarget
from workers.scheduler import SchedulerOutput

log = logging.getLogger(__name__)



ANSWER_STEPS = 128           # steps a typical answer takes, for the retry hint of a refused request

class TooLarge(Exception):
    """A request this worker's KV cache can never hold, however empty."""


class WallTime:
    """Maps the engine's monotonic times to epoch nanoseconds for span timestamps."""

    def __init__(self, clock: RealClock) -> None:
        self.clock = clock
        self.wall0 = time.time_ns()
        self.mono0 = clock.now()

    def ns(self, t: float) -> int:
        return self.wall0 + int((t - self.mono0) * 1e9)


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, cfg: settings_mod.WorkerSettings, engine: Engine, clock: RealClock,
                 telemetry: Telemetry) -> None:
        self.cfg = cfg
        self.engine = engine
        self.clock = clock
        self.telemetry = telemetry
        self.tracer = telemetry.tracer
        self.wall = WallTime(clock)
        self._span_contexts: dict[str, SpanContext] = {}
        self.open_streams = 0
        if telemetry.exporting:
            engine.on_iteration = self._trace_iteration

    # ----- RPCs --------------------------------------------------------------------------------------
    async def Generate(self, request: worker_pb2.WorkerGenerateRequest, context: grpc.aio.ServicerContext) -> None:
        arrival = self.clock.now()
        try:
            engine_request = self._to_engine_request(request, arrival)
        except Invalid as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except TooLarge as e:     # valid, but not for this worker's KV cache: the gateway tries another worker
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        rid = engine_request.request_id
        with self.telemetry.server_span("worker.generate", context.invocation_metadata()) as span:
            span.set_attributes({"tandem.request_id": rid, "tandem.worker_id": self.cfg.worker_id,
                                 "tandem.gpu_type": self.cfg.gpu_type, "tandem.slo_class": request.slo.slo_class,
                                 "tandem.prompt_tokens": engine_request.num_prompt_tokens,
                                 "tandem.upstream_ms": engine_request.upstream_s * 1000,
                                 "tandem.slo_ttft_ms": engine_request.slo.ttft_s * 1000,
                                 "tandem.slo_tpot_ms": engine_request.slo.tpot_s * 1000,
                                 "tandem.slo_e2e_ms": engine_request.slo.e2e_s * 1000})
            try:
                stream = self.engine.add_request(engine_request, request.replay_truth.output_tokens)
            except RuntimeError as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {self.cfg.worker_id}: {e}")
            except ValueError as e:      # a duplicate id (another request in flight here has it) or a long prompt
                field = "request_id" if "duplicate request id" in str(e) else "prompt"
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {e}")
            self._span_contexts[rid] = span.get_span_context()
            done = False
            pace = self.cfg.stream_interval_ms / 1000
            self.open_streams += 1
            try:
                while not done:
                    chunk = await stream.next_chunk()
                    if chunk.finish_reason == RequestStatus.FINISHED_REFUSED.finish_reason:
                        done = True
                        span.set_attribute("tandem.outcome", "refused")
                        context.set_trailing_metadata((("retry-after-ms", str(self._retry_hint_ms())),
                                                       (REFUSED_KEY, "slo")))
                        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                            f"worker {self.cfg.worker_id}: refused, it can no longer meet its SLO "
                                            "under the current load")
                    reply = worker_pb2.WorkerGenerateResponse(text=chunk.text, token_ids=chunk.token_ids)
                    if chunk.finished:
                        done = True
                        reply.finish_reason = chunk.finish_reason or "abort"
                        reply.metrics.CopyFrom(self._metrics(engine_request))
                    await context.write(reply)
                    if pace and not done:
                        await asyncio.sleep(pace)      # the tokens of the steps meanwhile go in one message
            finally:
                self.open_streams -= 1
                if not done:
                    self.engine.abort(rid)      # the client went away: free the blocks now
                self._span_contexts.pop(rid, None)
                self._record_phases(span, engine_request)

    def _retry_hint_ms(self) -> int:
        """When a refused request might be taken: about the time the waiting queue takes to move up a batch."""
        s = self.engine.scheduler
        batches_ahead = max(1, s.num_waiting) / max(1, s.num_running)
        return int(min(60_000, max(100, batches_ahead * ANSWER_STEPS * (self.engine.step_time_ms or 30.0))))

    async def GetStats(self, request: worker_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
                       ) -> worker_pb2.WorkerStats:
        s = self.engine.scheduler
        recent = list(self.engine.recent)

        def mean(values: list[int]) -> float:
            return sum(values) / len(values) if values else 0.0

        return worker_pb2.WorkerStats(
            recent_batch_size=mean([i.batch_size for i in recent]),
            recent_prefill_tokens=mean([i.num_prefill_tokens for i in recent]),
            recent_decode_tokens=mean([i.num_decode_tokens for i in recent]), preemptions=self.engine.preemptions,
            worker_id=self.cfg.worker_id, gpu_type=self.cfg.gpu_type, model=self.cfg.model,
            executor=self.cfg.executor, running=s.num_running, waiting=s.num_waiting,
            kv_blocks_total=s.blocks.num_blocks, kv_blocks_used=s.blocks.num_used_blocks,
            block_size=s.blocks.block_size, iterations=self.engine.iterations,
            step_time_ms=self.engine.step_time_ms, finished=s.num_finished, aborted=s.num_aborted,
            max_model_len=s.config.max_model_len, engine_policy=self.cfg.engine_policy,
            max_num_batched_tokens=s.config.max_num_batched_tokens, max_num_seqs=s.config.max_num_seqs,
            open_streams=self.open_streams, asyncio_tasks=len(asyncio.all_tasks()),
            kv_blocks_cached=s.blocks.num_cached_blocks, prefix_hit_tokens=s.blocks.hit_tokens,
            prefix_queried_tokens=s.blocks.queried_tokens)

    async def Abort(self, request: worker_pb2.AbortRequest, context: grpc.aio.ServicerContext
                    ) -> worker_pb2.AbortResponse:
        return worker_pb2.AbortResponse(found=self.engine.abort(request.request_id))

    async def Profile(self, request: worker_pb2.ProfileRequest, context: grpc.aio.ServicerContext
                      ) -> worker_pb2.ProfileResponse:
        probes = [Probe(p.prefill_tokens, p.batch, p.context) for p in request.probes]
        if not probes:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "probes: at least one probe is needed")
        try:
            seconds = await run_probes(self.engine, probes, request.repeats or 5)
        except ProbeError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        blocks = self.engine.scheduler.blocks
        return worker_pb2.ProfileResponse(
            results=[worker_pb2.ProbeResult(probe=spec, step_ms=t * 1000) for spec, t in zip(request.probes, seconds)],
            worker_id=self.cfg.worker_id, model=self.cfg.model, gpu_type=self.cfg.gpu_type, executor=self.cfg.executor,
            kv_capacity_tokens=blocks.num_blocks * blocks.block_size)

    # ----- helpers -----------------------------------------------------------------------------------
    def _to_engine_request(self, request: worker_pb2.WorkerGenerateRequest, arrival: float) -> Request:
        sp = request.sampling
        check_sampling(max_tokens=sp.max_tokens, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                       stop=list(sp.stop))
        if not request.prompt.strip():
            raise Invalid("prompt", "must not be empty")
        tokenizer = self.engine.executor.tokenizer
        prompt_ids = tokenizer.encode(request.prompt)
        blocks = self.engine.scheduler.blocks
        check_lengths(len(prompt_ids), sp.max_tokens, self.engine.scheduler.config.max_model_len)
        need = -(-(len(prompt_ids) + sp.max_tokens) // blocks.block_size)
        if need > blocks.num_blocks:
            raise TooLarge(f"prompt and max_tokens need {need} KV blocks; worker {self.cfg.worker_id} has "
                           f"{blocks.num_blocks}")
        slo = request.slo
        lengths = list(request.predicted_length.lengths)
        upstream_ms = request.upstream_ms if math.isfinite(request.upstream_ms) and request.upstream_ms > 0 else 0.0
        return Request(
            request_id=request.request_id or uuid.uuid4().hex,
            prompt_token_ids=prompt_ids,
            sampling=SamplingParams(max_tokens=sp.max_tokens, temperature=sp.temperature, top_p=sp.top_p or 1.0,
                                    top_k=sp.top_k, seed=sp.seed if sp.HasField("seed") else None,
                                    stop=tuple(sp.stop), ignore_eos=sp.ignore_eos),
            arrival_time=arrival, priority=request.priority, tenant=request.tenant,
            slo=SloTarget(slo.slo_class, slo.ttft_ms / 1000, slo.tpot_ms / 1000, slo.e2e_ms / 1000, slo.sheddable),
            eos_token_id=tokenizer.eos_token_id,
            predicted_output_len=lengths[len(lengths) // 2] if lengths else None,
            predicted_lengths=tuple(lengths),
            upstream_s=upstream_ms / 1000)

    def _metrics(self, r: Request) -> common_pb2.RequestMetrics:
        end = r.finished_time or self.clock.now()
        queue = (r.first_scheduled_time - r.arrival_time) if r.first_scheduled_time is not None else end - r.arrival_time
        ttft = (r.first_token_time - r.arrival_time) if r.first_token_time is not None else 0.0
        n = r.num_output_tokens
        tpot = (end - r.first_token_time) / (n - 1) if n > 1 and r.first_token_time is not None else 0.0
        return common_pb2.RequestMetrics(
            prompt_tokens=r.num_prompt_tokens, completion_tokens=n, queue_ms=queue * 1000, ttft_ms=ttft * 1000,
            tpot_ms=tpot * 1000, e2e_ms=(end - r.arrival_time) * 1000, worker_id=self.cfg.worker_id,
            preemptions=r.num_preemptions)

    def _record_phases(self, span: trace.Span, r: Request) -> None:
        """The request's queued, prefill and decode phases as child spans with their real times."""
        end = r.finished_time or self.clock.now()
        phases = [("worker.queued", r.arrival_time, r.first_scheduled_time or end),
                  ("worker.prefill", r.first_scheduled_time, r.first_token_time or end),
                  ("worker.decode", r.first_token_time, end)]
        parent = trace.set_span_in_context(span)
        for name, start, stop in phases:
            if start is None:
                continue
            child = self.tracer.start_span(name, context=parent, start_time=self.wall.ns(start))
            child.end(end_time=self.wall.ns(max(start, stop)))
        for t in r.preemption_times:
            span.add_event("preempted", timestamp=self.wall.ns(t))
        span.set_attributes({"tandem.completion_tokens": r.num_output_tokens, "tandem.preemptions": r.num_preemptions,
                             "tandem.finish_reason": r.status.finish_reason or "abort"})
        if r.first_token_time is not None:
            span.set_attribute("tandem.ttft_ms", (r.first_token_time - r.arrival_time) * 1000)

    def _trace_iteration(self, stats: IterationStats, out: SchedulerOutput) -> None:
        """One span per engine step, linked to the requests it ran."""
        links = [Link(ctx) for s in out.scheduled if (ctx := self._span_contexts.get(s.request.request_id))]
        span = self.tracer.start_span("engine.step", context=trace.set_span_in_context(trace.INVALID_SPAN),
                                      links=links, start_time=self.wall.ns(stats.start))
        span.set_attributes({"tandem.batch_size": stats.batch_size, "tandem.prefill_tokens": stats.num_prefill_tokens,
                             "tandem.decode_tokens": stats.num_decode_tokens, "tandem.preempted": stats.num_preempted,
                             "tandem.blocks_used": stats.blocks_used})
        span.end(end_time=self.wall.ns(stats.start + stats.step_time))


def expose_metrics(servicer: WorkerServicer, metrics: ServiceMetrics) -> None:
    """The engine's state for Prometheus: gauges read at each scrape, and every step's time."""
    engine, labels = servicer.engine, {"worker_id": servicer.cfg.worker_id}
    s = engine.scheduler
    for name, description, read in (
            ("running", "requests in the running batch", lambda: s.num_running),
            ("waiting", "requests waiting in the engine", lambda: s.num_waiting),
            ("kv_blocks_used", "KV cache blocks in use", lambda: s.blocks.num_used_blocks),
            ("kv_blocks_total", "KV cache blocks in all", lambda: s.blocks.num_blocks),
            ("kv_blocks_cached", "KV blocks in the prefix cache, held or evictable", lambda: s.blocks.num_cached_blocks),
            ("open_streams", "Generate calls in progress", lambda: servicer.open_streams)):
        metrics.gauges(f"tandem_worker_{name}", description, lambda read=read: [(read(), labels)])
    for name, description, read in (
            ("preemptions", "running requests preempted to make room", lambda: engine.preemptions),
            ("iterations", "engine steps", lambda: engine.iterations),
            ("finished", "requests finished", lambda: s.num_finished),
            ("aborted", "requests aborted (the caller went away)", lambda: s.num_aborted),
            ("prefix_hit_tokens", "prompt tokens taken from the prefix cache", lambda: s.blocks.hit_tokens),
            ("prefix_queried_tokens", "prompt tokens looked up in the prefix cache", lambda: s.blocks.queried_tokens)):
        metrics.counters(f"tandem_worker_{name}", description, lambda read=read: [(read(), labels)])
    if not metrics.url:
        return
    step = metrics.meter.create_histogram("tandem_worker_step", unit="ms", description="engine step time",
                                          explicit_bucket_boundaries_advisory=STEP_MS_BUCKETS)
    previous = engine.on_iteration

    def observe(stats: IterationStats, out: SchedulerOutput) -> None:
        step.record(stats.step_time * 1000, labels)
        if previous is not None:
            previous(stats, out)

    engine.on_iteration = observe


class BalancerLink:
    """Registers the worker and streams load reports; re-registers after a balancer restart."""

    def __init__(self, cfg: settings_mod.WorkerSettings, engine: Engine, info: balancer_pb2.WorkerInfo,
                 tls: Tls | None = None) -> None:
        self.cfg = cfg
        self.engine = engine
        self.info = info
        self._task: asyncio.Task | None = None
        self._channel = rpc.channel(cfg.balancer_address, tls)
        self._stub = balancer_pb2_grpc.BalancerStub(self._channel)

    def load_report(self) -> balancer_pb2.LoadReport:
        return balancer_pb2.LoadReport(worker_id=self.info.worker_id, **self.engine.load())

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        retrying = AsyncRetrying(wait=wait_exponential(multiplier=0.05, max=1.0),
                                 retry=retry_if_exception_type(grpc.aio.AioRpcError))
        async for attempt in retrying:
            with attempt:
                reply = await self._stub.Register(balancer_pb2.RegisterWorkerRequest(worker=self.info), timeout=2)
                log.info("registered with balancer", extra={"fields": {"balancer": self.cfg.balancer_address}})
                await self._stub.ReportLoad(self._reports(reply.report_interval_s or 0.2))
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, "load stream closed")

    async def _reports(self, interval: float) -> AsyncIterator[balancer_pb2.LoadReport]:
        while True:
            yield self.load_report()
            await asyncio.sleep(interval)

    async def close(self) -> None:
        """Stop reporting and leave rotation (the balancer also drops a worker whose stream ends)."""
        if self._task is not None:
            self._task.cancel()
        try:
            await self._stub.Deregister(balancer_pb2.DeregisterWorkerRequest(worker_id=self.info.worker_id),
                                        timeout=1)
        except grpc.aio.AioRpcError as e:
            log.warning("deregister failed", extra={"fields": {"code": e.code().name}})
        await self._channel.close()


def device_label(executor: object) -> str:
    """What a real executor runs on, for the cluster table: the CUDA device's name, or CPU."""
    device = getattr(executor, "device", None)
    if device is not None and device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return "CPU"


def main(argv: Sequence[str] = ()) -> None:
    cfg = settings_mod.load(settings_mod.WorkerSettings, argv, prog="tandem serve worker")
    run_service(lambda: build_worker(cfg))


async def build_worker(cfg: settings_mod.WorkerSettings) -> ServiceHost:
    host = ServiceHost("worker", cfg)
    host.bind()
    clock = RealClock()
    profile = (await profiles.fetch(cfg.profiler_address, cfg.model, cfg.gpu_type, cfg.executor, tls=host.tls)
               if cfg.profiler_address and cfg.executor == "sim" else None)
    engine = build_engine(cfg, clock, profiles.latency_model(profile) if profile else None)
    if cfg.executor != "sim" and "gpu_type" not in cfg.model_fields_set:
        cfg.gpu_type = device_label(engine.executor)
    cfg.worker_id = cfg.worker_id or f"{cfg.gpu_type.lower().replace(' ', '-')}-{host.port}"
    servicer = WorkerServicer(cfg, engine, clock, host.telemetry)
    expose_metrics(servicer, host.metrics)
    host.add_service(worker_pb2_grpc.add_WorkerServicer_to_server, servicer,
                     worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name)
    link = BalancerLink(cfg, engine, balancer_pb2.WorkerInfo(
        worker_id=cfg.worker_id, address=cfg.advertise_address or host.address, model=cfg.model,
        gpu_type=cfg.gpu_type, executor=cfg.executor, max_model_len=engine.scheduler.config.max_model_len,
        kv_blocks_total=engine.scheduler.blocks.num_blocks, block_size=cfg.block_size,
        engine_policy=cfg.engine_policy, max_num_seqs=cfg.max_num_seqs), host.tls) if cfg.balancer_address else None
    tasks: list[asyncio.Task] = []

    async def start() -> None:
        tasks.append(asyncio.create_task(engine.run()))
        if link is not None:
            link.start()

    async def drain() -> None:
        engine.stop_accepting()
        if link is not None:
            await link.close()
        finished = await engine.wait_idle(cfg.drain_grace_s)
        log.info("drained", extra={"fields": {"clean": finished}})
        engine.stop()

    host.on_start(start)
    host.on_drain(drain)
    return host
