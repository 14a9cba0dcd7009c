"""Capacity-aware routing (the heterogeneous-throughput paper): least expected completion time.

Each worker's backlog is the predicted worker-seconds of what is in flight there; the request goes where
backlog plus its own work (priced with that worker's profiled speed) is smallest, among workers whose
unpromised KV holds it. A fast GPU thus takes proportionally more, instead of the equal share round robin gives.
"""

from __future__ import annotations

from typing import Sequence

from balancer.estimate import work_seconds
from balancer.registry import WorkerState
from balancer.routing.base import RouteContext, RoutingPolicy, register
from balancer.routing.filters import kv_headroom


@register
class CapacityAware(RoutingPolicy):
    name = "capacity"

    def pick(self, request: RouteContext, candidates: Sequence[WorkerState]) -> WorkerState:
        return min(kv_headroom(request, candidates),
                   key=lambda w: (w.assigned_work_s + work_seconds(w, request), w.worker_id))
