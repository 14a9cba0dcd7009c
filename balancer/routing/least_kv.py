"""Most free KV memory, as a share of each worker's cache (counting what is promised to in-flight requests)."""

from __future__ import annotations

from typing import Sequence

from balancer.estimate import kv_headroom_tokens
from balancer.registry import WorkerState
from balancer.routing.base import RouteContext, RoutingPolicy, register


@register
class LeastKv(RoutingPolicy):
    name = "least_kv"

    def pick(self, request: RouteContext, candidates: Sequence[WorkerState]) -> WorkerState:
        def used_share(w: WorkerState) -> float:
            return 1.0 - kv_headroom_tokens(w) / w.kv_capacity_tokens if w.kv_capacity_tokens else 1.0

        return min(candidates, key=lambda w: (used_share(w), w.worker_id))
