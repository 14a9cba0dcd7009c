"""The Profiler service: serves latency profiles and length predictions; learns lengths from finished requests."""

from __future__ import annotations

from typing import Sequence

import grpc

from services import settings as settings_mod
from profiler import priors
from services.catalog import GPUS, MODELS
from services import rpc
from services.fit import default_probes, fit
from profiler.predictor import LengthPredictor
from services.profiles import datasheet_profile
from profiler.store import ProfileStore
from services.rpc import common_pb2, profiler_pb2, profiler_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.server import ServiceHost, run_service
from services.tls import Tls


class ProfilerServicer(profiler_pb2_grpc.ProfilerServicer):
    def __init__(self, store: ProfileStore, tls: Tls | None = None) -> None:
        self.store = store
        self.tls = tls
        self.predictor = LengthPredictor()
        self.predictions: dict[str, int] = {}      # by source (prior, learned, ...)
        self.completions = 0
        self.calibrations = 0

    async def GetProfile(self, request: profiler_pb2.GetProfileRequest, context: grpc.aio.ServicerContext
                         ) -> profiler_pb2.LatencyProfile:
        """The calibrated profile when there is one, else the datasheet's; NOT_FOUND for an unknown pair."""
        stored = self.store.get(request.model, request.gpu_type, request.executor)
        if stored is not None:
            return stored
        try:
            return datasheet_profile(request.model, request.gpu_type, request.executor)
        except KeyError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e.args[0]))

    async def Calibrate(self, request: profiler_pb2.CalibrateRequest, context: grpc.aio.ServicerContext
                        ) -> profiler_pb2.CalibrateResponse:
        try:
            async with rpc.channel(request.worker_address, self.tls) as channel:
                worker = worker_pb2_grpc.WorkerStub(channel)
                stats = await worker.GetStats(worker_pb2.GetStatsRequest(), timeout=5)
                kv_tokens = stats.kv_blocks_total * stats.block_size
                # probes cover what the engine runs: prefill chunks up to its token budget, batches up to its limit
                probes = default_probes(max_prefill=min(stats.max_num_batched_tokens or 2048, stats.max_model_len - 1),
                                        max_batch=min(64, stats.max_num_seqs or 64), max_context=stats.max_model_len,
                                        kv_tokens=kv_tokens)
                reply = await worker.Profile(worker_pb2.ProfileRequest(
                    probes=[worker_pb2.ProbeSpec(prefill_tokens=p.prefill_tokens, batch=p.batch, context=p.context)
                            for p in probes], repeats=request.repeats or 5), timeout=900)
        except grpc.aio.AioRpcError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE if e.code() == grpc.StatusCode.UNAVAILABLE else e.code(),
                                f"worker {request.worker_address}: {e.details()}")
        fitted, prefill_error, decode_error = fit(probes, [r.step_ms / 1000 for r in reply.results])
        try:
            profile = datasheet_profile(reply.model, reply.gpu_type, reply.executor)
        except KeyError:          # a checkpoint folder or GPU outside the catalog: the fit is all we know
            profile = profiler_pb2.LatencyProfile(model=reply.model, gpu_type=reply.gpu_type, executor=reply.executor)
        profile.source, profile.fitted, profile.kv_capacity_tokens = "calibrated", True, reply.kv_capacity_tokens
        profile.prefill_a0, profile.prefill_a1, profile.prefill_a2 = fitted.a0 * 1000, fitted.a1 * 1000, fitted.a2 * 1000
        profile.decode_c0, profile.decode_c1, profile.decode_c2 = fitted.c0 * 1000, fitted.c1 * 1000, fitted.c2 * 1000
        self.store.put(profile)
        self.calibrations += 1
        return profiler_pb2.CalibrateResponse(profile=profile, probes=len(probes),
                                              prefill_median_error=prefill_error, decode_median_error=decode_error)

    async def ListProfiles(self, request: profiler_pb2.ListProfilesRequest, context: grpc.aio.ServicerContext
                           ) -> profiler_pb2.ListProfilesResponse:
        calibrated = self.store.all()
        return profiler_pb2.ListProfilesResponse(profiles=calibrated + [
            datasheet_profile(m.name, g.name, "sim") for m in MODELS.values() for g in GPUS.values()])

    async def PredictLength(self, request: profiler_pb2.PredictLengthRequest, context: grpc.aio.ServicerContext
                            ) -> common_pb2.LengthPrediction:
        lengths, source = self.predictor.predict(request.slo_class, request.prompt_tokens, request.prompt_feature,
                                                 request.max_tokens)
        self.predictions[source] = self.predictions.get(source, 0) + 1
        return common_pb2.LengthPrediction(quantiles=priors.QUANTILES, lengths=lengths, source=source)

    async def RecordCompletion(self, request: profiler_pb2.CompletionRecord, context: grpc.aio.ServicerContext
                               ) -> profiler_pb2.RecordCompletionResponse:
        self.completions += 1
        if request.finish_reason in ("stop", "length"):   # an aborted answer says nothing about its length
            self.predictor.observe(request.slo_class, request.prompt_tokens_estimate or request.metrics.prompt_tokens,
                                   request.prompt_feature, request.metrics.completion_tokens)
        return profiler_pb2.RecordCompletionResponse()


def main(argv: Sequence[str] = ()) -> None:
    cfg = settings_mod.load(settings_mod.ProfilerSettings, argv, prog="tandem serve profiler")

    async def build() -> ServiceHost:
        host = ServiceHost("profiler", cfg)
        servicer = ProfilerServicer(ProfileStore(cfg.db_path), host.tls)
        host.add_service(profiler_pb2_grpc.add_ProfilerServicer_to_server, servicer,
                         profiler_pb2.DESCRIPTOR.services_by_name["Profiler"].full_name)
        m = host.metrics
        m.counters("tandem_profiler_predictions", "length predictions served, by where they came from",
                   lambda: [(n, {"source": s or "unknown"}) for s, n in sorted(servicer.predictions.items())])
        m.counters("tandem_profiler_completions", "finished requests recorded for the length predictor",
                   lambda: [(servicer.completions, {})])
        m.counters("tandem_profiler_calibrations", "workers calibrated", lambda: [(servicer.calibrations, {})])
        m.gauges("tandem_profiler_profiles", "calibrated latency profiles stored",
                 lambda: [(len(servicer.store.all()), {})])
        return host

    run_service(build)
