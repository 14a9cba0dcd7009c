"""Fewest requests in flight: gateways' routed-but-unfinished count, then the worker's own queue."""

from __future__ import annotations

from typing import Sequence

from balancer.registry import WorkerState
from balancer.routing.base import RouteContext, RoutingPolicy, register


@register
class LeastOutstanding(RoutingPolicy):
    name = "least_outstanding"

    def pick(self, request: RouteContext, candidates: Sequence[WorkerState]) -> WorkerState:
        return min(candidates, key=lambda w: (w.outstanding, w.waiting, w.running, w.worker_id))
