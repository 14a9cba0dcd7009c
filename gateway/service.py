"""The Gateway service: validates, classes and routes each request, then relays the worker's stream.

Retries happen only before the first token (another worker, bounded and jittered); after it, a failure ends
the stream with ABORTED and the tokens already sent stay sent. A client that cancels cancels the worker call,
which aborts the request on the worker at once. Every accepted request ends with a final message or a status.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import zlib
from typing import Sequence

import grpc
from opentelemetry import trace
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from gateway.auth import AuthError, authenticate
from gateway.coalesce import coalesced
from gateway.local_call import CallFailed
from gateway.metrics import GatewayMetrics
from services import rpc
from services import settings as settings_mod
from services.rpc import (balancer_pb2, balancer_pb2_grpc, common_pb2, gateway_pb2, gateway_pb2_grpc, profiler_pb2,
                          profiler_pb2_grpc, worker_pb2, worker_pb2_grpc)
from services.engine_traits import REFUSED_KEY
from services.server import ServiceHost, run_service
from profiler.predictor import length_bucket, prompt_feature
from services.slo import DEFAULT_CLASS, SloClass, resolve
from services.validation import Invalid, check_prompt_text, check_sampling, check_slo_target

log = logging.getLogger(__name__)

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL,
             grpc.StatusCode.UNKNOWN}


class WorkerFailedEarly(Exception):
    """The chosen worker failed before the first token: worth another worker."""

    def __init__(self, worker_id: str, error: grpc.aio.AioRpcError) -> None:
        super().__init__(f"{worker_id}: {error.code().name} {error.details()}")
        self.worker_id = worker_id
        self.error = error


PREDICTION_TTL_S = 5.0
PREFIX_BLOCK_CHARS = 64
PREFIX_BLOCKS = 256           # 16 KiB of prompt: enough for prefix scoring of whole prompts, bounded in cost


def prompt_tokens_estimate(prompt: str) -> int:
    """The gateway does not tokenize: about four characters a token."""
    return max(1, len(prompt) // 4)


def prefix_hashes(prompt: str) -> list[int]:
    """Chained CRC32s of the prompt's 64-character blocks (up to ``PREFIX_BLOCKS``), for prefix-aware routing:
    equal leading hashes mean equal prompt prefixes."""
    hashes, h = [], 0
    for i in range(0, min(len(prompt), PREFIX_BLOCK_CHARS * PREFIX_BLOCKS), PREFIX_BLOCK_CHARS):
        h = zlib.crc32(prompt[i:i + PREFIX_BLOCK_CHARS].encode(), h)
        hashes.append(h)
    return hashes


class Relay:
    """One request's way through the gateway: timings as the gateway sees them, tokens sent so far."""

    def __init__(self, arrival: float) -> None:
        self.arrival = arrival
        self.client_request_id = ""       # the id the client knows this request by (replies carry it)
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.tokens_sent = 0
        self.worker_id = ""

    def metrics(self, worker: common_pb2.RequestMetrics) -> common_pb2.RequestMetrics:
        ms = 1000.0
        first = self.first_token or time.perf_counter()
        last = self.last_token or first
        tpot = (last - first) / (self.tokens_sent - 1) * ms if self.tokens_sent > 1 else 0.0
        return common_pb2.RequestMetrics(
            prompt_tokens=worker.prompt_tokens, completion_tokens=self.tokens_sent, queue_ms=worker.queue_ms,
            ttft_ms=(first - self.arrival) * ms if self.tokens_sent else 0.0, tpot_ms=tpot,
            e2e_ms=(last - self.arrival) * ms, worker_id=self.worker_id, preemptions=worker.preemptions)


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, cfg: settings_mod.GatewaySettings, host: ServiceHost) -> None:
        self.cfg = cfg
        self.telemetry = host.telemetry
        self.tracer = host.telemetry.tracer
        self.tls = host.tls
        self._balancer_channel = rpc.channel(cfg.balancer_address, self.tls)
        self.balancer = balancer_pb2_grpc.BalancerStub(self._balancer_channel)
        self.profiler = (profiler_pb2_grpc.ProfilerStub(rpc.channel(cfg.profiler_address, self.tls))
                         if cfg.profiler_address else None)
        self._workers: dict[str, worker_pb2_grpc.WorkerStub] = {}
        self._predictions: dict[tuple[str, int, int, str], tuple[float, common_pb2.LengthPrediction]] = {}
        self._background: set[asyncio.Task] = set()
        self.metrics = GatewayMetrics(host.metrics.meter)
        self.gateway_id = cfg.gateway_id or f"gateway-{uuid.uuid4().hex[:12]}"
        self._draining = False
        self._open = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # ----- RPCs --------------------------------------------------------------------------------------
    async def Generate(self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        """Serve one request and count how it ended (the status a client sees, by class)."""
        slo_class = request.slo_class or DEFAULT_CLASS
        if self._draining:      # refused with a status clients retry elsewhere, not held or cut mid-handshake
            self.metrics.ended(slo_class if slo_class in self.cfg.slo_classes else "unknown", "UNAVAILABLE")
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "gateway is shutting down; send the request to another gateway")
        code = "UNKNOWN"
        self.metrics.in_flight.add(1)
        self._open += 1
        self._idle.clear()
        try:
            await self._generate(request, context)
            code = "OK"
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except CallFailed as e:
            code = e.code.name
            raise
        except grpc.aio.AbortError:
            code = getattr(context.code(), "name", "UNKNOWN")
            raise
        finally:
            self._open -= 1
            if self._open == 0:
                self._idle.set()
            self.metrics.in_flight.add(-1)
            self.metrics.ended(slo_class if slo_class in self.cfg.slo_classes else "unknown", code)

    async def drain(self, grace_s: float) -> bool:
        """Refuse new requests (UNAVAILABLE) while the open ones finish; True when they did within the grace.

        The server itself keeps accepting meanwhile: a gRPC server that is already stopping answers a call
        arriving on an open connection with a bare CANCELLED, which a client cannot tell from its own."""
        self._draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def _generate(self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        relay = Relay(time.perf_counter())
        slo_class = request.slo_class or DEFAULT_CLASS
        try:
            self._validate(request, slo_class)
            tenant = authenticate(context.invocation_metadata() or (), self.cfg.api_keys, request.tenant)
        except Invalid as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except AuthError as e:
            code = grpc.StatusCode.UNAUTHENTICATED if e.code == "unauthenticated" else grpc.StatusCode.PERMISSION_DENIED
            await context.abort(code, str(e))
        # Inside the cluster (worker engines, balancer bindings) a request's id must be unique, and a client's
        # own id need not be: two clients may both send "req-1" at once. A client's id gets a suffix of ours
        # there; the final reply carries the client's id, the gateway's span both.
        relay.client_request_id = request.request_id
        request_id = f"{request.request_id}~{uuid.uuid4().hex[:12]}" if request.request_id else uuid.uuid4().hex
        slo = self._slo(request, slo_class)
        max_tokens = request.max_tokens if request.HasField("max_tokens") else self.cfg.default_max_tokens
        with self.telemetry.server_span("gateway.generate", context.invocation_metadata()) as span:
            span.set_attributes({"tandem.request_id": request_id, "tandem.client_request_id": request.request_id,
                                 "tandem.slo_class": slo_class,
                                 "tandem.tenant": tenant, "tandem.max_tokens": max_tokens,
                                 "tandem.slo_ttft_ms": slo.ttft_ms, "tandem.slo_tpot_ms": slo.tpot_ms,
                                 "tandem.slo_e2e_ms": slo.e2e_ms})
            worker_request = worker_pb2.WorkerGenerateRequest(
                request_id=request_id, prompt=request.prompt, priority=request.priority, tenant=tenant,
                sampling=common_pb2.SamplingParams(
                    max_tokens=max_tokens,
                    temperature=request.temperature if request.HasField("temperature") else 1.0,
                    top_p=request.top_p if request.HasField("top_p") else 1.0, top_k=request.top_k,
                    seed=request.seed if request.HasField("seed") else None, stop=request.stop,
                    ignore_eos=request.ignore_eos),
                slo=common_pb2.SloSpec(slo_class=slo_class, ttft_ms=slo.ttft_ms, tpot_ms=slo.tpot_ms,
                                       e2e_ms=slo.e2e_ms, sheddable=slo.sheddable),
                predicted_length=await self._predict(slo_class, max_tokens, request.prompt),
                replay_truth=request.replay_truth)      # benchmark-only: passed on unread
            route = balancer_pb2.RouteRequest(request_id=request_id, slo_class=slo_class,
                                              prompt_chars=len(request.prompt), max_tokens=max_tokens,
                                              priority=request.priority, tenant=tenant,
                                              predicted_length=worker_request.predicted_length,
                                              prompt_tokens_estimate=prompt_tokens_estimate(request.prompt),
                                              slo=worker_request.slo, sheddable=slo.sheddable,
                                              prefix_hashes=prefix_hashes(request.prompt), gateway_id=self.gateway_id)
            await self._run(worker_request, route, relay, context, span)

    async def ClusterStatus(self, request: gateway_pb2.ClusterStatusRequest, context: grpc.aio.ServicerContext
                            ) -> gateway_pb2.ClusterStatusResponse:
        try:
            listing = await self.balancer.ListWorkers(balancer_pb2.ListWorkersRequest(), timeout=2)
        except grpc.aio.AioRpcError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"balancer: {e.details()}")
        return gateway_pb2.ClusterStatusResponse(workers=listing.workers, routing_policy=listing.routing_policy,
                                                 queue_length=listing.queue_length, queue_limit=listing.queue_limit,
                                                 shed_total=listing.shed_total)

    async def keep_lease(self) -> None:
        """Renew this gateway's lease at the balancer for the life of the process: if the process dies, the
        balancer stops counting its requests against their workers once the lease lapses."""
        interval = 1.0
        while True:
            try:
                reply = await self.balancer.RenewLease(balancer_pb2.RenewLeaseRequest(gateway_id=self.gateway_id),
                                                       timeout=2)
                interval = max(0.05, reply.lease_s / 3)
            except grpc.aio.AioRpcError as e:
                log.debug("lease renewal failed", extra={"fields": {"code": e.code().name}})
                interval = min(interval, 1.0)
            await asyncio.sleep(interval)

    # ----- the request's way -------------------------------------------------------------------------
    def _validate(self, request: gateway_pb2.GenerateRequest, slo_class: str) -> None:
        check_prompt_text(request.prompt, self.cfg.max_prompt_bytes)
        check_sampling(max_tokens=request.max_tokens if request.HasField("max_tokens") else None,
                       temperature=request.temperature if request.HasField("temperature") else None,
                       top_p=request.top_p if request.HasField("top_p") else None, top_k=request.top_k,
                       stop=list(request.stop), max_stop_strings=self.cfg.max_stop_strings)
        if slo_class not in self.cfg.slo_classes:
            raise Invalid("slo_class", f"unknown class {slo_class!r}; known: {', '.join(sorted(self.cfg.slo_classes))}")
        if len(request.request_id) > 128:
            raise Invalid("request_id", "at most 128 characters")
        for name in ("ttft_ms", "tpot_ms", "e2e_ms"):
            check_slo_target(name, getattr(request, name) if request.HasField(name) else None)

    def _slo(self, request: gateway_pb2.GenerateRequest, slo_class: str) -> SloClass:
        """The request's own targets: its class's, with any the request sets itself in their place."""
        return resolve(self.cfg.slo_classes[slo_class], request.ttft_ms, request.tpot_ms, request.e2e_ms)

    async def _predict(self, slo_class: str, max_tokens: int, prompt: str) -> common_pb2.LengthPrediction:
        """Cached for a few seconds per (class, limit, length bucket, feature), and bounded in time: a slow
        Profiler never holds a request up."""
        if self.profiler is None:
            return common_pb2.LengthPrediction()
        tokens, feature = prompt_tokens_estimate(prompt), prompt_feature(prompt)
        key = (slo_class, max_tokens, length_bucket(tokens), feature)
        now = time.monotonic()
        cached = self._predictions.get(key)
        if cached is not None and now - cached[0] < PREDICTION_TTL_S:
            return cached[1]
        try:
            prediction = await self.profiler.PredictLength(
                profiler_pb2.PredictLengthRequest(slo_class=slo_class, max_tokens=max_tokens, prompt_tokens=tokens,
                                                  prompt_feature=feature),
                timeout=self.cfg.predict_timeout_ms / 1000)
        except grpc.aio.AioRpcError:
            return cached[1] if cached else common_pb2.LengthPrediction()
        if len(self._predictions) > 4096:
            self._predictions.clear()
        self._predictions[key] = (now, prediction)
        return prediction

    async def _run(self, worker_request: worker_pb2.WorkerGenerateRequest, route: balancer_pb2.RouteRequest,
                   relay: Relay, context: grpc.aio.ServicerContext, span: trace.Span) -> None:
        retrying = AsyncRetrying(stop=stop_after_attempt(self.cfg.retry_attempts),
                                 wait=wait_random_exponential(multiplier=0.01, max=0.2),
                                 retry=retry_if_exception_type(WorkerFailedEarly), reraise=True)
        try:
            async for attempt in retrying:
                with attempt:
                    await self._attempt(worker_request, route, relay, context)
        except WorkerFailedEarly as e:
            span.set_attribute("tandem.outcome", "unavailable")
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"no worker could take the request after {len(route.exclude_workers)} tries: {e}")
        span.set_attributes({"tandem.worker_id": relay.worker_id, "tandem.completion_tokens": relay.tokens_sent})

    async def _attempt(self, worker_request: worker_pb2.WorkerGenerateRequest, route: balancer_pb2.RouteRequest,
                       relay: Relay, context: grpc.aio.ServicerContext) -> None:
        routed = False
        try:   # may wait in the balancer's queue until a worker has room
            choice = await self.balancer.Route(route, timeout=context.time_remaining() or self.cfg.queue_wait_s,
                                               metadata=self.telemetry.outgoing_metadata())
            routed = True
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE and route.exclude_workers:
                raise WorkerFailedEarly("balancer", e) from None
            hint = [(k, v) for k, v in (e.trailing_metadata() or ()) if k == "retry-after-ms"]
            if hint:
                context.set_trailing_metadata(tuple(hint))
            await context.abort(e.code(), f"balancer: {e.details()}")
        finally:
            # The call ended without an answer (the client cancelled, a deadline passed): the balancer may have
            # bound the request to a worker all the same, just before. Nobody else would release that binding,
            # and it would count against the worker for as long as this gateway renews its lease. Releasing an
            # id that was never bound is a no-op.
            if not routed:
                self._spawn(self.balancer.Release(balancer_pb2.ReleaseRequest(request_id=route.request_id),
                                                  timeout=2))
        relay.worker_id = choice.worker_id
        # the request's SLO clock started at the gateway: routing, the balancer's queue and any earlier
        # attempts count against its targets
        worker_request.upstream_ms = (time.perf_counter() - relay.arrival) * 1000
        call = self._worker(choice.address).Generate(worker_request, timeout=context.time_remaining(),
                                                     metadata=self.telemetry.outgoing_metadata())
        try:
            async for chunks in coalesced(call):     # what came while the last write was in flight: one message
                now = time.perf_counter()
                chunk = chunks[-1]
                if len(chunks) == 1:
                    reply = gateway_pb2.GenerateResponse(text=chunk.text, token_ids=chunk.token_ids)
                else:
                    reply = gateway_pb2.GenerateResponse(text="".join(c.text for c in chunks),
                                                         token_ids=[t for c in chunks for t in c.token_ids])
                if reply.token_ids:
                    relay.first_token = relay.first_token or now
                    relay.last_token = now
                    relay.tokens_sent += len(reply.token_ids)
                if chunk.finish_reason:
                    reply.finish_reason = chunk.finish_reason
                    reply.request_id = relay.client_request_id or worker_request.request_id
                    reply.metrics.CopyFrom(relay.metrics(chunk.metrics))
                    self._record(worker_request, reply.metrics, chunk.finish_reason)
                    slo = worker_request.slo
                    self.metrics.answered(slo.slo_class, SloClass(ttft_ms=slo.ttft_ms, tpot_ms=slo.tpot_ms,
                                                                  e2e_ms=slo.e2e_ms), reply.metrics,
                                          failed_over=bool(route.exclude_workers))
                await context.write(reply)
        except grpc.aio.AioRpcError as e:
            trailing = dict(e.trailing_metadata() or ())
            if relay.tokens_sent == 0 and REFUSED_KEY in trailing:      # the engine's triage: tell the client
                if "retry-after-ms" in trailing:
                    context.set_trailing_metadata((("retry-after-ms", trailing["retry-after-ms"]),))
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, e.details() or "refused")
            if relay.tokens_sent == 0 and e.code() in RETRYABLE:
                log.warning("worker failed before the first token; trying another",
                            extra={"fields": {"worker_id": choice.worker_id, "request_id": worker_request.request_id,
                                              "code": e.code().name}})
                route.exclude_workers.append(choice.worker_id)
                self.metrics.retries.add(1, {"slo_class": worker_request.slo.slo_class})
                raise WorkerFailedEarly(choice.worker_id, e) from None
            if relay.tokens_sent == 0:
                await context.abort(e.code(), e.details() or e.code().name)
            await context.abort(grpc.StatusCode.ABORTED, f"worker {choice.worker_id} failed after "
                                f"{relay.tokens_sent} tokens: {e.code().name} {e.details()}")
        finally:
            if not call.done():
                call.cancel()
            self._spawn(self.balancer.Release(balancer_pb2.ReleaseRequest(
                worker_id=choice.worker_id, request_id=worker_request.request_id), timeout=2))

    # ----- helpers -----------------------------------------------------------------------------------
    def _worker(self, address: str) -> worker_pb2_grpc.WorkerStub:
        stub = self._workers.get(address)
        if stub is None:
            stub = self._workers[address] = worker_pb2_grpc.WorkerStub(rpc.channel(
                address, self.tls, stream_window_bytes=self.cfg.worker_stream_window_bytes))
        return stub

    def _record(self, request: worker_pb2.WorkerGenerateRequest, metrics: common_pb2.RequestMetrics,
                finish_reason: str) -> None:
        if self.profiler is not None:
            self._spawn(self.profiler.RecordCompletion(profiler_pb2.CompletionRecord(
                request_id=request.request_id, slo_class=request.slo.slo_class, worker_id=metrics.worker_id,
                metrics=metrics, prompt_feature=prompt_feature(request.prompt), finish_reason=finish_reason,
                prompt_tokens_estimate=prompt_tokens_estimate(request.prompt)),
                timeout=2))

    def _spawn(self, call: object) -> None:
        """Fire and forget, off the token path; failures are logged, never raised."""

        async def run() -> None:
            try:
                await call  # type: ignore[misc]
            except grpc.aio.AioRpcError as e:
                log.debug("background call failed", extra={"fields": {"code": e.code().name}})

        task = asyncio.ensure_future(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def main(argv: Sequence[str] = ()) -> None:
    cfg = settings_mod.load(settings_mod.GatewaySettings, argv, prog="tandem serve gateway")
    if not cfg.balancer_address:
        raise SystemExit("gateway: --balancer-address (or TANDEM_BALANCER_ADDRESS) is required")

    async def build() -> ServiceHost:
        host = ServiceHost("gateway", cfg)
        servicer = GatewayServicer(cfg, host)
        host.add_service(gateway_pb2_grpc.add_GatewayServicer_to_server, servicer,
                         gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name)
        lease: list[asyncio.Task] = []

        async def start_lease() -> None:      # ends with the event loop
            lease.append(asyncio.create_task(servicer.keep_lease()))

        host.on_start(start_lease)

        async def drain() -> None:
            finished = await servicer.drain(cfg.drain_grace_s)
            log.info("drained", extra={"fields": {"clean": finished}})

        host.on_drain(drain)
        if cfg.http_port >= 0:     # the OpenAI-compatible front, on the same request path
            from gateway.openai_http import HttpFront

            front = HttpFront(servicer.Generate, cfg)

            async def start_http() -> None:
                await front.start()
                host.announce("openai", f"{front.url}/v1")

            host.on_start(start_http)
            host.on_drain(front.stop)
        return host

    run_service(build)
