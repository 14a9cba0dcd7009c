"""Latency profiles: the datasheet profile of a (model, GPU type, executor), the latency model a profile
describes, and a bounded fetch from the Profiler service for the workers and the balancer."""

from __future__ import annotations

import grpc
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from services import rpc
from services.catalog import gpu, model
from services.fit import FittedLatency
from services.latency import DEFAULT_MBU, DEFAULT_MFU, DEFAULT_OVERHEAD_S, BatchShape, LatencyModel
from services.rpc import profiler_pb2, profiler_pb2_grpc
from services.tls import Tls


def datasheet_profile(model_name: str, gpu_type: str, executor: str = "sim") -> profiler_pb2.LatencyProfile:
    g, m = gpu(gpu_type), model(model_name)
    return profiler_pb2.LatencyProfile(
        model=m.name, gpu_type=g.name, executor=executor or "sim", source="datasheet",
        peak_tflops=g.peak_tflops, mem_bw_tbs=g.mem_bw_tbs, mem_gb=g.mem_gb, mfu=DEFAULT_MFU, mbu=DEFAULT_MBU,
        overhead_ms=DEFAULT_OVERHEAD_S * 1000)


def from_profile(profile: profiler_pb2.LatencyProfile) -> FittedLatency:
    """The fitted coefficients of a calibrated profile (stored in ms) in seconds."""
    return FittedLatency(profile.prefill_a0 / 1000, profile.prefill_a1 / 1000, profile.decode_c0 / 1000,
                         profile.decode_c1 / 1000, profile.decode_c2 / 1000, profile.prefill_a2 / 1000)


def latency_model(profile: profiler_pb2.LatencyProfile) -> LatencyModel:
    """The model a profile describes; KeyError when its model or GPU is outside the catalog."""
    fitted = from_profile(profile) if profile.fitted else None
    return LatencyModel(gpu(profile.gpu_type), model(profile.model), mfu=profile.mfu or DEFAULT_MFU,
                        mbu=profile.mbu or DEFAULT_MBU, overhead_s=profile.overhead_ms / 1000 or DEFAULT_OVERHEAD_S,
                        fitted=fitted)


async def fetch(address: str, model_name: str, gpu_type: str, executor: str, attempts: int = 10,
                tls: Tls | None = None) -> profiler_pb2.LatencyProfile | None:
    """The Profiler's profile, retried while it starts up; None when it has none for this triple."""
    async with rpc.channel(address, tls) as channel:
        stub = profiler_pb2_grpc.ProfilerStub(channel)
        async for attempt in AsyncRetrying(wait=wait_exponential(multiplier=0.05, max=0.5),
                                           stop=stop_after_attempt(attempts), reraise=True,
                                           retry=retry_if_exception_type(grpc.aio.AioRpcError)):
            with attempt:
                try:
                    return await stub.GetProfile(profiler_pb2.GetProfileRequest(
                        model=model_name, gpu_type=gpu_type, executor=executor), timeout=2)
                except grpc.aio.AioRpcError as e:
                    if e.code() == grpc.StatusCode.NOT_FOUND:
                        return None
                    raise
    return None


class ProfiledLatency:
    """A calibrated worker's latency when its model is outside the catalog (a local checkpoint): the fitted
    coefficients alone, with the interface of ``LatencyModel`` that the simulator and the balancer use."""

    def __init__(self, fitted: FittedLatency, kv_capacity_tokens: int, max_model_len: int,
                 vocab_size: int = 32000) -> None:
        self.fitted = fitted
        self._kv = kv_capacity_tokens
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size

    def step_time(self, shape: BatchShape) -> float:
        return self.fitted.predict_step(shape.new_tokens, shape.context_before)

    def prefill_time(self, prompt_tokens: int) -> float:
        return self.fitted.predict(prompt_tokens, 0, 0)

    def decode_time(self, batch: int, context: int) -> float:
        return self.fitted.predict(0, batch, batch * context)

    def kv_capacity_tokens(self) -> int:
        return self._kv

    def saturated_decode_tok_s(self, context: int = 1024, max_batch: int = 256) -> float:
        batch = max(1, min(max_batch, self._kv // max(1, context)))
        return batch / self.decode_time(batch, context)
