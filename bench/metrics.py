"""Metric definitions, exactly as DESIGN.md gives them; tests, benchmarks and reports all use these.

Times are seconds on the client's clock. A request that was refused or failed counts as not meeting its SLO
and scores 0 satisfaction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from services.slo import SloClass, met as targets_met


@dataclass
class RequestRecord:
    request_id: str
    slo_class: str
    slo: SloClass
    arrival: float
    token_times: list[float] = field(default_factory=list)   # delivery time of every token, in order
    ok: bool = False
    error: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    worker_id: str = ""
    preemptions: int = 0
    queue_ms: float = 0.0

    @property
    def completion_tokens(self) -> int:
        return len(self.token_times)


def ttft(r: RequestRecord) -> float | None:
    return r.token_times[0] - r.arrival if r.token_times else None


def tpot(r: RequestRecord) -> float | None:
    """Mean gap between tokens after the first."""
    n = len(r.token_times)
    return (r.token_times[-1] - r.token_times[0]) / (n - 1) if n > 1 else None


def e2e(r: RequestRecord) -> float | None:
    return r.token_times[-1] - r.arrival if r.token_times else None


def slo_met(r: RequestRecord) -> bool:
    if not r.ok or not r.token_times:
        return False
    gaps = tpot(r)
    return targets_met(r.slo, ttft(r) * 1000, None if gaps is None else gaps * 1000, e2e(r) * 1000)


def satisfaction(r: RequestRecord) -> float:
    """DESIGN.md's satisfaction (our reconstruction of SLoB's): weighted on-time share of streamed tokens.

    Expected time of token k: e_1 = arrival + TTFT target, e_k = e_1 + (k-1) * TPOT target; a late token
    scores exp(-lateness / TTFT target). Weights: 0.5 on the first token, 0.5 spread over the rest. A class
    with only an E2E target uses E2E as its TTFT target and no per-token pace (so only lateness past E2E costs).
    """
    n = len(r.token_times)
    if not r.ok or n == 0:
        return 0.0
    if r.slo.ttft_ms:
        ttft_target, tpot_target = r.slo.ttft_ms / 1000, r.slo.tpot_ms / 1000
    else:                                   # E2E class: every token is due by the E2E target
        ttft_target, tpot_target = r.slo.e2e_ms / 1000, 0.0
    e1 = r.arrival + ttft_target
    total = 0.0
    for k, d in enumerate(r.token_times):
        expected = e1 + k * tpot_target
        s = 1.0 if d <= expected else math.exp(-(d - expected) / ttft_target)
        w = 1.0 if n == 1 else (0.5 if k == 0 else 0.5 / (n - 1))
        total += w * s
    return total


def percentiles(values: Sequence[float], qs: Iterable[float] = (50, 90, 99)) -> dict[str, float]:
    if not values:
        return {f"p{int(q)}": float("nan") for q in qs}
    arr = np.asarray(values, dtype=float)
    return {f"p{int(q)}": float(np.percentile(arr, q)) for q in qs}


def summarize(records: Sequence[RequestRecord], duration_s: float) -> dict[str, dict[str, float]]:
    """Per class and ``all``: counts, SLO attainment, TTFT/TPOT/E2E percentiles (ms), satisfaction, throughput."""
    groups: dict[str, list[RequestRecord]] = {"all": list(records)}
    for r in records:
        groups.setdefault(r.slo_class, []).append(r)
    out: dict[str, dict[str, float]] = {}
    for name, rs in groups.items():
        done = [r for r in rs if r.ok and r.token_times]
        row: dict[str, float] = {
            "offered": len(rs), "completed": len(done), "failed": len(rs) - len(done),
            "slo_attainment": sum(map(slo_met, rs)) / len(rs) if rs else float("nan"),
            "satisfaction": float(np.mean([satisfaction(r) for r in rs])) if rs else float("nan"),
            "output_tokens": sum(r.completion_tokens for r in rs),
            "throughput_tok_s": sum(r.completion_tokens for r in rs) / duration_s if duration_s > 0 else 0.0,
            "preemptions": sum(r.preemptions for r in rs),
        }
        for metric, fn in (("ttft_ms", ttft), ("tpot_ms", tpot), ("e2e_ms", e2e)):
            values = [v * 1000 for r in done if (v := fn(r)) is not None]
            for k, v in percentiles(values).items():
                row[f"{metric}_{k}"] = v
            row[f"{metric}_mean"] = float(np.mean(values)) if values else float("nan")
        out[name] = row
    return out
