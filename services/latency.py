"""The DESIGN.md latency model: predicted engine step time for a batch on a (GPU type, model).

Roofline form from datasheets until calibrated::

    step = overhead + max(flops / (peak * mfu), bytes / (mem_bw * mbu))

Used by the sim executor, the simulator and capacity estimates, so it must stay pure and cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from services.catalog import GpuSpec, ModelSpec, gpu, model
from services.fit import FittedLatency

DEFAULT_MFU = 0.6
DEFAULT_MBU = 0.75
DEFAULT_OVERHEAD_S = 0.0005
GPU_MEMORY_UTILIZATION = 0.9
# tensor-parallel communication (our assumption: NVLink on SXM-class parts, PCIe 4.0 x16 elsewhere)
NVLINK_GPUS = {"H200", "H100-SXM", "A100-80G", "A100-40G", "V100-32G"}
NVLINK_BPS, NVLINK_LATENCY_S = 200e9, 10e-6
PCIE_BPS, PCIE_LATENCY_S = 20e9, 25e-6


@dataclass(frozen=True)
class BatchShape:
    """What a step computes: for each scheduled sequence, new tokens and the context it attends to."""

    new_tokens: tuple[int, ...]
    context_before: tuple[int, ...]   # tokens already in the KV cache for each sequence

    @classmethod
    def of(cls, items: Iterable[tuple[int, int]]) -> "BatchShape":
        pairs = list(items)
        return cls(tuple(n for n, _ in pairs), tuple(c for _, c in pairs))


@dataclass(frozen=True)
class LatencyModel:
    gpu: GpuSpec
    model: ModelSpec
    mfu: float = DEFAULT_MFU
    mbu: float = DEFAULT_MBU
    overhead_s: float = DEFAULT_OVERHEAD_S
    fitted: FittedLatency | None = None      # calibrated coefficients; replace the roofline when set
    tp: int = 1                              # tensor-parallel degree: GPUs one instance spans

    @classmethod
    def from_names(cls, gpu_type: str, model_name: str, **kw: float) -> "LatencyModel":
        return cls(gpu(gpu_type), model(model_name), **kw)

    def step_time(self, shape: BatchShape) -> float:
        """Seconds for one engine iteration over ``shape``."""
        if self.fitted is not None:
            return self.fitted.predict_step(shape.new_tokens, shape.context_before)
        m = self.model
        attended = 0
        for new, ctx in zip(shape.new_tokens, shape.context_before):
            # each new token attends to ctx earlier tokens plus the causal half of its own chunk
            attended += new * ctx + new * (new + 1) // 2
        new_total = sum(shape.new_tokens)
        kv_read = sum(shape.context_before)
        flops = 4.0 * m.n_layers * m.hidden_size * attended + 2.0 * m.n_params * new_total
        bytes_moved = m.weight_bytes + m.kv_bytes_per_token * (kv_read + new_total)
        compute = flops / (self.gpu.peak_tflops * 1e12 * self.mfu * self.tp)
        memory = bytes_moved / (self.gpu.mem_bw_tbs * 1e12 * self.mbu * self.tp)
        return self.overhead_s + max(compute, memory) + self.allreduce_time(new_total)

    def allreduce_time(self, tokens: int) -> float:
        """Two all-reduces of the hidden state per layer when sharded across ``tp`` GPUs (ring, so 2(tp-1)/tp)."""
        if self.tp == 1:
            return 0.0
        link_bps = NVLINK_BPS if self.gpu.name in NVLINK_GPUS else PCIE_BPS
        latency = NVLINK_LATENCY_S if self.gpu.name in NVLINK_GPUS else PCIE_LATENCY_S
        volume = tokens * self.model.hidden_size * self.model.dtype_bytes * 2 * (self.tp - 1) / self.tp
        return 2 * self.model.n_layers * (latency + volume / link_bps)

    @property
    def max_model_len(self) -> int:
        return self.model.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def prefill_time(self, prompt_tokens: int) -> float:
        return self.step_time(BatchShape((prompt_tokens,), (0,)))

    def decode_time(self, batch: int, context: int) -> float:
        return self.step_time(BatchShape((1,) * batch, (context,) * batch))

    def kv_capacity_tokens(self, memory_utilization: float = GPU_MEMORY_UTILIZATION) -> int:
        """Tokens of KV cache that fit beside the weights (across the ``tp`` GPUs of the instance)."""
        free = self.tp * self.gpu.mem_gb * 1e9 * memory_utilization - self.model.weight_bytes
        return max(0, int(free // self.model.kv_bytes_per_token))

    def saturated_decode_tok_s(self, context: int = 1024, max_batch: int = 256) -> float:
        """Decode tokens/s at the largest batch the KV cache holds at ``context`` tokens per sequence.

        A capacity estimate for routing and reports, not a promise: prefill work and length mix lower it.
        """
        batch = max(1, min(max_batch, self.kv_capacity_tokens() // max(1, context)))
        return batch / self.decode_time(batch, context)

    def saturated_throughput(self, mean_input: float, mean_output: float, max_num_seqs: int = 256) -> float:
        """Output tokens/s at saturation for a length mix: a roofline upper bound, at the best batch size.

        With b requests in flight, a cycle runs ``mean_output`` decode steps while the b prefills ride along
        (chunked prefill): it takes at least the larger of all its flops at peak * mfu and all its bytes
        (weights and KV read once per step) at bandwidth * mbu, plus the per-step overhead.
        """
        m = self.model
        I, O = mean_input, mean_output
        most = max(1, min(max_num_seqs, int(self.kv_capacity_tokens() // max(1.0, I + O))))
        context = I + O / 2
        best = 0.0
        for b in sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, most}):
            if b > most:
                continue
            attention = 4.0 * m.n_layers * m.hidden_size * b * (I * I / 2 + O * context)
            flops = 2.0 * m.n_params * b * (I + O) + attention
            moved = O * (m.weight_bytes + m.kv_bytes_per_token * b * context)
            cycle = max(flops / (self.gpu.peak_tflops * 1e12 * self.mfu * self.tp),
                        moved / (self.gpu.mem_bw_tbs * 1e12 * self.mbu * self.tp)) + O * self.overhead_s
            best = max(best, b * O / cycle)
        return best
