"""Oracle: a clairvoyant reference that knows every replayed request's true output length, runs the least
remaining work first, and puts requests whose deadline is at risk ahead. It prices what a perfect length
predictor would be worth; no real engine can run it.

It gets the true lengths by name (``needs = {"true_lengths"}``: the executor's benchmark-only ``TrueLengths``),
never through ``predicted_output_len``. A request without a known length counts as its ``max_tokens`` cap.
"""

from __future__ import annotations

from workers.policies.base import EnginePolicy, register
from workers.request import Request
from workers.true_lengths import TrueLengths


@register
class OraclePolicy(EnginePolicy):
    name = "oracle"
    static_key = False
    needs = frozenset({"true_lengths"})

    def __init__(self, true_lengths: TrueLengths, urgency_s: float = 0.5) -> None:
        self.true_lengths = true_lengths
        self.urgency_s = urgency_s

    def key(self, request: Request, now: float) -> tuple:
        true_len = self.true_lengths.get(request.request_id) or request.sampling.max_tokens
        remaining = max(0.0, true_len - request.num_output_tokens) + request.num_pending_tokens / 8
        target = request.slo.ttft_s if request.num_output_tokens == 0 and request.slo.ttft_s else request.slo.e2e_s
        slack = (request.arrival_time + target - now) if target else float("inf")
        return (0 if slack < self.urgency_s else 1, remaining, request.arrival_time)
