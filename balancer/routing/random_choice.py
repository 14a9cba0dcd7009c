"""Uniformly random worker (baseline), from a seeded generator."""

from __future__ import annotations

import random
from typing import Sequence

from balancer.registry import WorkerState
from balancer.routing.base import RouteContext, RoutingPolicy, register


@register
class RandomChoice(RoutingPolicy):
    name = "random"
    slo_aware = False
    late_binding = False
    needs = frozenset({"seed"})

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    def pick(self, request: RouteContext, candidates: Sequence[WorkerState]) -> WorkerState:
        return self.rng.choice(sorted(candidates, key=lambda w: w.worker_id))
