"""Power of two choices: sample two workers, keep the one with fewer requests in flight."""

from __future__ import annotations

import random
from typing import Sequence

from balancer.registry import WorkerState
from balancer.routing.base import RouteContext, RoutingPolicy, register


@register
class PowerOfTwo(RoutingPolicy):
    name = "power_of_two"
    needs = frozenset({"seed"})

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    def pick(self, request: RouteContext, candidates: Sequence[WorkerState]) -> WorkerState:
        ordered = sorted(candidates, key=lambda w: w.worker_id)
        pair = self.rng.sample(ordered, min(2, len(ordered)))
        return min(pair, key=lambda w: (w.outstanding + w.waiting, w.worker_id))
