"""Oracle: knows every request's true output length (the simulator sets it), runs the least remaining work
first, and puts requests whose deadline is at risk ahead. An upper reference for predictor-based policies, not
something a real engine can run."""

from __future__ import annotations

from workers.policies.base import EnginePolicy, register
from workers.request import Request


@register
class OraclePolicy(EnginePolicy):
    name = "oracle"
    static_key = False

    def __init__(self, urgency_s: float = 0.5) -> None:
        self.urgency_s = urgency_s

    def key(self, request: Request, now: float) -> tuple:
        true_len = request.predicted_output_len or request.sampling.max_tokens
        remaining = max(0.0, true_len - request.num_output_tokens) + request.num_pending_tokens / 8
        target = request.slo.ttft_s if request.num_output_tokens == 0 and request.slo.ttft_s else request.slo.e2e_s
        slack = (request.arrival_time + target - now) if target else float("inf")
        return (0 if slack < self.urgency_s else 1, remaining, request.arrival_time)
