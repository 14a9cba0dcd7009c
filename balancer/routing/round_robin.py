"""Round robin over the routable workers, in worker-id order: what a plain load balancer does (baseline)."""

from __future__ import annotations

from typing import Sequence

from balancer.registry import WorkerState
from balancer.routing.base import RouteContext, RoutingPolicy, register


@register
class RoundRobin(RoutingPolicy):
    name = "round_robin"
    slo_aware = False
    late_binding = False

    def __init__(self) -> None:
        self._next = 0

    def pick(self, request: RouteContext, candidates: Sequence[WorkerState]) -> WorkerState:
        ordered = sorted(candidates, key=lambda w: w.worker_id)
        choice = ordered[self._next % len(ordered)]
        self._next += 1
        return choice
