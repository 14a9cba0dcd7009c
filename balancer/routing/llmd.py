"""llm-d's default scheduling profile (baseline): weighted scorers, then the highest score wins.

Re-created from the public llm-d inference scheduler docs and the Gateway API Inference Extension (EPP) scorer
plugins, so Tandem can be compared with what llm-d users run:

* ``queue-scorer``: min-max normalised waiting queue, ``(maxQ - Q) / (maxQ - minQ)``, 1 for all when equal;
* ``kv-cache-utilization-scorer``: ``1 - kv_usage``;
* ``prefix-cache-scorer``: matched prompt blocks / prompt blocks, from a router-side LRU index of what was routed
  where ("estimated" mode; 31,250 blocks per server by default);
* ``max-score-picker``: the highest weighted sum, ties broken at random.

The default profile's weights are queue 2, kv-cache 2, prefix 3. Like any plain gateway it routes at once to a
live worker with no SLO filter, from load metrics scraped every 50 ms.
"""

from __future__ import annotations

import random
from typing import Sequence

from balancer.registry import WorkerState
from balancer.routing.base import RouteContext, RoutingPolicy, register
from balancer.routing.prefix_index import PrefixIndex


@register
class LlmD(RoutingPolicy):
    name = "llmd"
    slo_aware = False
    late_binding = False
    needs = frozenset({"seed"})
    report_interval_s = 0.05

    def __init__(self, seed: int = 0, queue_weight: float = 2.0, kv_weight: float = 2.0,
                 prefix_weight: float = 3.0, lru_blocks_per_worker: int = 31250) -> None:
        self.rng = random.Random(seed)
        self.queue_weight, self.kv_weight, self.prefix_weight = queue_weight, kv_weight, prefix_weight
        self.index = PrefixIndex(lru_blocks_per_worker)

    def scores(self, request: RouteContext, candidates: Sequence[WorkerState]) -> dict[str, float]:
        """Each candidate's weighted score, by worker id (read-only: the index is not touched)."""
        lo, hi = min(w.waiting for w in candidates), max(w.waiting for w in candidates)
        blocks = len(request.prefix_hashes)
        out: dict[str, float] = {}
        for w in candidates:
            queue = 1.0 if hi == lo else (hi - w.waiting) / (hi - lo)
            kv = 1.0 - (w.kv_blocks_used / w.kv_blocks_total if w.kv_blocks_total else 0.0)
            prefix = self.index.match(w.worker_id, request.prefix_hashes) / blocks if blocks else 0.0
            out[w.worker_id] = self.queue_weight * queue + self.kv_weight * kv + self.prefix_weight * prefix
        return out

    def pick(self, request: RouteContext, candidates: Sequence[WorkerState]) -> WorkerState:
        scores = self.scores(request, candidates)
        best = max(scores.values())
        tied = sorted((w for w in candidates if scores[w.worker_id] >= best - 1e-9), key=lambda w: w.worker_id)
        chosen = self.rng.choice(tied)
        self.index.record(chosen.worker_id, request.prefix_hashes)
        return chosen
