"""Token-aware balancing (the half-full paper): load is pending prefill tokens plus weighted decode context,
not a request count. Tokens routed since a worker's last report count as pending prefill, and the load is
divided by the worker's profiled speed so a slow GPU is not handed the same token share as a fast one."""

from __future__ import annotations

from typing import Sequence

from balancer.registry import WorkerState
from balancer.routing.base import RouteContext, RoutingPolicy, register

DECODE_WEIGHT = 0.1        # a decode token's KV is read every step but costs far less than a prefill token


@register
class TokenAware(RoutingPolicy):
    name = "token_aware"

    def __init__(self, decode_weight: float = DECODE_WEIGHT) -> None:
        self.decode_weight = decode_weight

    def load(self, w: WorkerState) -> float:
        tokens = w.pending_prefill_tokens + w.routed_since_report + self.decode_weight * w.decode_context_tokens
        return tokens / (w.capacity_tok_s or 1.0)

    def pick(self, request: RouteContext, candidates: Sequence[WorkerState]) -> WorkerState:
        return min(candidates, key=lambda w: (self.load(w), w.outstanding, w.worker_id))
