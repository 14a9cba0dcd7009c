"""The Profiler service: serves latency profiles and length predictions; keeps finished-request history."""

from __future__ import annotations

import collections
from typing import Sequence

import grpc

from services import settings as settings_mod
from services.profiler import priors
from services.profiler.catalog import GPUS, MODELS
from services.profiler.profiles import datasheet_profile
from services.rpc import common_pb2, profiler_pb2, profiler_pb2_grpc
from services.server import ServiceHost, run_service


class ProfilerServicer(profiler_pb2_grpc.ProfilerServicer):
    def __init__(self, history_size: int = 100_000) -> None:
        self.history: collections.deque[profiler_pb2.CompletionRecord] = collections.deque(maxlen=history_size)

    async def GetProfile(self, request: profiler_pb2.GetProfileRequest, context: grpc.aio.ServicerContext
                         ) -> profiler_pb2.LatencyProfile:
        try:
            return datasheet_profile(request.model, request.gpu_type, request.executor)
        except KeyError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e.args[0]))

    async def ListProfiles(self, request: profiler_pb2.ListProfilesRequest, context: grpc.aio.ServicerContext
                           ) -> profiler_pb2.ListProfilesResponse:
        return profiler_pb2.ListProfilesResponse(
            profiles=[datasheet_profile(m.name, g.name, "sim") for m in MODELS.values() for g in GPUS.values()])

    async def PredictLength(self, request: profiler_pb2.PredictLengthRequest, context: grpc.aio.ServicerContext
                            ) -> common_pb2.LengthPrediction:
        return common_pb2.LengthPrediction(quantiles=priors.QUANTILES,
                                           lengths=priors.prior(request.slo_class, request.max_tokens),
                                           source="class_prior")

    async def RecordCompletion(self, request: profiler_pb2.CompletionRecord, context: grpc.aio.ServicerContext
                               ) -> profiler_pb2.RecordCompletionResponse:
        self.history.append(request)
        return profiler_pb2.RecordCompletionResponse()


def main(argv: Sequence[str] = ()) -> None:
    cfg = settings_mod.load(settings_mod.ProfilerSettings, argv, prog="tandem serve profiler")

    async def build() -> ServiceHost:
        host = ServiceHost("profiler", cfg)
        host.add_service(profiler_pb2_grpc.add_ProfilerServicer_to_server, ProfilerServicer(),
                         profiler_pb2.DESCRIPTOR.services_by_name["Profiler"].full_name)
        return host

    run_service(build)
