"""Larry ("half-full" paper): memory-aware admission by projected KV, short requests first, with triage.

From the paper (its abstract and secondary summaries only; the full text is not public): an engine that keeps
the KV cache from overfilling does better than one that fills it and then preempts, since recompute wastes the
work done; it admits by a forecast of the memory requests will need at their end, not what they hold now.

Our reconstruction: every step the policy projects the KV the running batch will need, each request's current
tokens plus the ``quantile`` (0.9) of its predicted remaining output (capped by max_tokens), and admits waiting
requests, shortest predicted total first (prompt + median output, aged linearly so nothing starves), only while
that projection plus the candidate's stays under ``watermark`` of the KV capacity. Hysteresis: once the running
batch's projection passes ``watermark`` (requests outgrew their forecast), nothing joins until it falls below
``low_watermark``. A request that can no longer meet its SLO goes behind (``SloAwarePolicy``); preemption on
OOM is the base's (late first, then the longest predicted). The watermarks, quantile and aging rate are ours.
"""

from __future__ import annotations

from typing import Sequence
from weakref import WeakKeyDictionary

from workers.policies.base import register
from workers.policies.slo_aware import SloAwarePolicy
from workers.request import Request
from workers.step_estimate import StepTimes


@register
class LarryPolicy(SloAwarePolicy):
    name = "larry"
    needs = frozenset({"latency", "kv_tokens"})

    def __init__(self, latency: StepTimes, kv_tokens: int, quantile: float = 0.9, watermark: float = 0.97,
                 low_watermark: float = 0.9, aging_per_s: float = 50.0, **options: object) -> None:
        super().__init__(latency, **options)  # type: ignore[arg-type]
        if kv_tokens <= 0:
            raise ValueError("kv_tokens must be positive")
        if not 0 < low_watermark <= watermark <= 1:
            raise ValueError("need 0 < low_watermark <= watermark <= 1")
        if not 0 <= quantile <= 1 or aging_per_s < 0:
            raise ValueError("quantile must be in [0, 1] and aging_per_s >= 0")
        self.kv_tokens = kv_tokens
        self.quantile = quantile
        self.high = watermark * kv_tokens          # tokens
        self.low = low_watermark * kv_tokens
        self.aging_per_s = aging_per_s             # predicted tokens a second of waiting is worth
        self.projected = 0.0                       # the batch's projected KV, plus this step's admissions
        self.gated = False                         # hysteresis: closed above the high mark until below the low
        self._ends: WeakKeyDictionary[Request, tuple[int, float]] = WeakKeyDictionary()

    def need(self, request: Request) -> float:
        """KV tokens the request will hold at its end: what it has, plus a high quantile of what is to come.
        The projected end is re-computed at bucket boundaries (powers of two of the tokens produced), since the
        batch is summed every step."""
        end = self.per_bucket(self._ends, request,
                              lambda r: r.num_output_tokens + self.remaining_tokens(r, self.quantile))
        return request.num_prompt_tokens + max(end, request.num_output_tokens + 1)

    def rank(self, request: Request, now: float) -> tuple:
        """Shortest predicted total first; aging as ``-aging * (now - arrival)``, written statically."""
        total = request.num_prompt_tokens + self.distribution(request).quantile(0.5)
        return (total + self.aging_per_s * request.arrival_time, request.arrival_time)

    def admission_open(self, now: float, running: Sequence[Request]) -> bool:
        """Project the batch's KV (only in steps where something could join: it sums the whole batch) and
        apply the hysteresis."""
        self.projected = sum([self.need(r) for r in running])
        if self.projected > self.high:
            self.gated = True
        elif self.projected < self.low:
            self.gated = False
        return not self.gated or not running

    def admit(self, request: Request, now: float, running: Sequence[Request]) -> bool:
        """Join only while the projection stays under the watermark; an empty batch always takes one."""
        need = self.need(request)
        if self.projected > 0 and self.projected + need > self.high:
            return False
        self.projected += need
        return True
