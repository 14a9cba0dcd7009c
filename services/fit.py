"""Least-squares fit of the light-profiling latency form (the heterogeneous-throughput paper's approach).

    prefill(P) = a0 + a1 * P + a2 * P^2      one sequence of P new tokens
    decode(b, C) = c0 + c1 * b + c2 * C      b sequences, C = their cached context tokens in total

DESIGN.md's prefill form is linear; the a2 term is ours: causal attention is quadratic in P, negligible
beside the weights of a large model (a2 comes out near zero) but a fifth of a long prefill on a small model on
a CPU, where the linear form missed measured steps by 13%. A mixed step is predicted as
max(a0, c0) + a1 * P + a2 * P^2 + c1 * b + c2 * C. Rows are weighted by 1 / time, so the
fit minimises relative error: probes span two orders of magnitude, and a plain fit would serve the largest
ones and miss the small steps that dominate serving.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Probe:
    prefill_tokens: int = 0
    batch: int = 0
    context: int = 0          # per sequence, for decode probes

    @property
    def is_prefill(self) -> bool:
        return self.prefill_tokens > 0


@dataclass(frozen=True)
class FittedLatency:
    a0: float
    a1: float
    c0: float
    c1: float
    c2: float
    a2: float = 0.0

    def predict(self, prefill_tokens: int, decode_seqs: int, decode_context_total: int) -> float:
        """Seconds for a step with these new prefill tokens and decodes."""
        prefill = self.a1 * prefill_tokens + self.a2 * prefill_tokens * prefill_tokens
        decode = self.c1 * decode_seqs + self.c2 * decode_context_total
        if decode_seqs == 0:
            return self.a0 + prefill
        if prefill_tokens == 0:
            return self.c0 + decode
        return max(self.a0, self.c0) + prefill + decode

    def predict_step(self, new_tokens: Sequence[int], context_before: Sequence[int]) -> float:
        """Seconds for a step given each sequence's new tokens and cached context (a decode: 1 new, context > 0)."""
        prefill = decode = context = 0
        for new, ctx in zip(new_tokens, context_before):
            if new == 1 and ctx > 0:
                decode, context = decode + 1, context + ctx
            else:
                prefill += new
        return self.predict(prefill, decode, context)

    def predict_probe(self, p: Probe) -> float:
        if p.is_prefill:
            return self.predict(p.prefill_tokens, 0, 0)
        return self.predict(0, p.batch, p.batch * p.context)


def default_probes(max_prefill: int, max_batch: int, max_context: int, kv_tokens: int) -> list[Probe]:
    """A light grid: prefills by powers of two, decodes over batch sizes and contexts that fit the KV cache."""
    probes = [Probe(prefill_tokens=p) for p in (16, 32, 64, 128, 256, 512, 1024, 2048) if p <= max_prefill]
    for b in (1, 2, 4, 8, 16, 32, 64):
        for c in (32, 128, 512, 1024):
            if b <= max_batch and c < max_context and b * (c + 1) <= kv_tokens:
                probes.append(Probe(batch=b, context=c))
    return probes


def fit(probes: Sequence[Probe], seconds: Sequence[float]) -> tuple[FittedLatency, float, float]:
    """The coefficients and the median relative error of each half of the fit on its own probes."""
    pre = [(p, t) for p, t in zip(probes, seconds) if p.is_prefill]
    dec = [(p, t) for p, t in zip(probes, seconds) if not p.is_prefill]
    if len(pre) < 3 or len(dec) < 3:
        raise ValueError(f"need at least 3 prefill and 3 decode probes, got {len(pre)} and {len(dec)}")
    a = _relative_lstsq([[1.0, p.prefill_tokens, p.prefill_tokens ** 2] for p, _ in pre], [t for _, t in pre])
    c = _relative_lstsq([[1.0, p.batch, p.batch * p.context] for p, _ in dec], [t for _, t in dec])
    model = FittedLatency(float(a[0]), float(a[1]), float(c[0]), float(c[1]), float(c[2]), float(a[2]))
    return model, median_error(model, [p for p, _ in pre], [t for _, t in pre]), \
        median_error(model, [p for p, _ in dec], [t for _, t in dec])


def _relative_lstsq(rows: list[list[float]], seconds: list[float]) -> np.ndarray:
    x, y = np.array(rows), np.array(seconds)
    w = 1.0 / np.maximum(y, 1e-9)
    coef, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
    return coef


def median_error(model: FittedLatency, probes: Sequence[Probe], seconds: Sequence[float]) -> float:
    errors = [abs(model.predict_probe(p) - t) / t for p, t in zip(probes, seconds) if t > 0]
    return float(np.median(errors)) if errors else float("nan")
