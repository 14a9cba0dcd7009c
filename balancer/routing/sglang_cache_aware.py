"""SGLang model gateway (sgl-router) cache-aware policy (baseline): cache affinity unless load is imbalanced.

Re-created from the public SGLang router docs ("cache-aware load balancing"). Load is the requests the router
has in flight at a worker. The system is imbalanced when ``max - min > balance_abs_threshold`` (default 64) AND
``max > balance_rel_threshold * min`` (default 1.5); then the least loaded worker takes the request. Otherwise
the worker with the longest prefix match takes it if the match rate exceeds ``cache_threshold`` (default 0.3),
and the least loaded one if not. SGLang matches characters in a radix tree per worker; here the match rate is
in prompt blocks, from the same router-side LRU index llm-d's estimated mode uses. The prompt is recorded at the
chosen worker whichever branch chose it, as SGLang inserts the text into that worker's tree.
"""

from __future__ import annotations

from typing import Sequence

from balancer.registry import WorkerState
from balancer.routing.base import RouteContext, RoutingPolicy, register
from balancer.routing.prefix_index import PrefixIndex


@register
class SglangCacheAware(RoutingPolicy):
    name = "sglang_cache_aware"
    slo_aware = False
    late_binding = False

    def __init__(self, balance_abs_threshold: int = 64, balance_rel_threshold: float = 1.5,
                 cache_threshold: float = 0.3, lru_blocks_per_worker: int = 31250) -> None:
        self.abs_threshold, self.rel_threshold = balance_abs_threshold, balance_rel_threshold
        self.cache_threshold = cache_threshold
        self.index = PrefixIndex(lru_blocks_per_worker)

    def imbalanced(self, candidates: Sequence[WorkerState]) -> bool:
        lo, hi = min(w.outstanding for w in candidates), max(w.outstanding for w in candidates)
        return hi - lo > self.abs_threshold and hi > self.rel_threshold * lo

    def pick(self, request: RouteContext, candidates: Sequence[WorkerState]) -> WorkerState:
        chosen = min(candidates, key=lambda w: (w.outstanding, w.worker_id))
        hashes = request.prefix_hashes
        if hashes and not self.imbalanced(candidates):
            best = min(candidates, key=lambda w: (-self.index.match(w.worker_id, hashes), w.worker_id))
            if self.index.match(best.worker_id, hashes) / len(hashes) > self.cache_threshold:
                chosen = best
        self.index.record(chosen.worker_id, hashes)
        return chosen
