"""SLoB's multilevel adapter: choose the routing behaviour by the cluster's load level, with hysteresis.

Load level is the share of the cluster's KV memory promised to in-flight requests. Light load: latency
first (the worker with the earliest expected finish for this request, usually the fastest GPU). Medium:
capacity-aware. Heavy: token-aware, which keeps every worker's queue of prefill work short. The level only
changes when the load crosses a threshold by a margin, so routing does not flap around a boundary.
"""

from __future__ import annotations

from typing import Sequence

from balancer.estimate import expected_times
from balancer.registry import WorkerState
from balancer.routing.base import RouteContext, RoutingPolicy, register
from balancer.routing.capacity import CapacityAware
from balancer.routing.token_aware import TokenAware

LEVELS = ("light", "medium", "heavy")


@register
class Adaptive(RoutingPolicy):
    name = "adaptive"

    def __init__(self, up: tuple[float, float] = (0.3, 0.75), down: tuple[float, float] = (0.2, 0.6)) -> None:
        self.up, self.down = up, down
        self.level = 0
        self.capacity, self.token_aware = CapacityAware(), TokenAware()

    @staticmethod
    def load_level(candidates: Sequence[WorkerState]) -> float:
        total = sum(w.kv_capacity_tokens for w in candidates)
        return sum(w.assigned_tokens for w in candidates) / total if total else 1.0

    def update_level(self, load: float) -> str:
        while self.level < 2 and load >= self.up[self.level]:
            self.level += 1
        while self.level > 0 and load < self.down[self.level - 1]:
            self.level -= 1
        return LEVELS[self.level]

    def pick(self, request: RouteContext, candidates: Sequence[WorkerState]) -> WorkerState:
        level = self.update_level(self.load_level(candidates))
        if level == "light":
            return min(candidates, key=lambda w: (expected_times(w, request)[1], w.worker_id))
        if level == "medium":
            return self.capacity.pick(request, candidates)
        return self.token_aware.pick(request, candidates)
