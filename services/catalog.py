"""Datasheet figures for GPU types and architecture figures for models, by name.

GPU figures are DESIGN.md's (dense bf16/fp16 tensor TFLOP/s, memory TB/s, memory GB). Model figures come from
the models' public configs. Names are matched case-insensitively so cluster files can write ``a100-80g``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuSpec:
    name: str
    peak_tflops: float
    mem_bw_tbs: float
    mem_gb: float


@dataclass(frozen=True)
class ModelSpec:
    name: str
    n_params: float
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int
    dtype_bytes: int = 2

    @property
    def weight_bytes(self) -> float:
        return self.n_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        """Key and value vectors of every layer for one token."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.dtype_bytes


GPUS: dict[str, GpuSpec] = {
    g.name.lower(): g
    for g in (
        GpuSpec("H200", 989, 4.8, 141),
        GpuSpec("H100-SXM", 989, 3.35, 80),
        GpuSpec("A100-80G", 312, 2.0, 80),
        GpuSpec("A100-40G", 312, 1.56, 40),
        GpuSpec("L40S", 362, 0.86, 48),
        GpuSpec("A10", 125, 0.6, 24),
        GpuSpec("L4", 121, 0.3, 24),
        GpuSpec("V100-32G", 125, 0.9, 32),
        GpuSpec("T4", 65, 0.32, 16),
        GpuSpec("RTX-4090", 165, 1.0, 24),
    )
}

MODELS: dict[str, ModelSpec] = {
    m.name.lower(): m
    for m in (
        ModelSpec("llama-2-7b", 6.74e9, 32, 4096, 32, 32, 128, 32000, 4096),
        ModelSpec("llama-2-13b", 13.0e9, 40, 5120, 40, 40, 128, 32000, 4096),
        ModelSpec("llama-3-8b", 8.03e9, 32, 4096, 32, 8, 128, 128256, 8192),
        ModelSpec("qwen2.5-7b", 7.62e9, 28, 3584, 28, 4, 128, 152064, 32768),
    )
}


def gpu(name: str) -> GpuSpec:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise KeyError(f"unknown GPU type {name!r}; known: {', '.join(g.name for g in GPUS.values())}") from None


def model(name: str) -> ModelSpec:
    try:
        return MODELS[name.lower()]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(m.name for m in MODELS.values())}") from None
