"""Cache-aware capacity routing: least expected completion time, with each worker's prefill priced by the part
of the prompt it does not already cache.

Which prompt blocks a worker caches is estimated router-side, as llm-d's "estimated" prefix-cache mode and
SGLang's router do: an LRU index of the prefix hashes routed to each worker, bounded by that worker's KV
capacity (engines evict least-recently-used blocks too). Pricing the hit instead of weighting it keeps the
trade honest: a cached prefix on a busy slow GPU loses to an idle fast one when the prefill it saves is worth
less than the queue it would join. ``affinity_s`` adds a preference for the cached worker among those about as
good: a hit also spares the KV memory a second copy would take, and keeps the conversation's later turns where
their history is. Tuned in the simulator (``tandem bench prefix``): on the multi-turn workload 0.05 s, 0.3 s,
1 s and 3 s gave cache hits of 53/55/60/65% and TTFT p50 103/98/88/79 ms at the moderate load, with SLO
attainment flat within a point; at twice the load attainment slipped 85.2 -> 83.5% as affinity grew. 1 s is the
default.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from balancer.estimate import work_seconds
from balancer.registry import WorkerState
from balancer.routing.base import RouteContext, RoutingPolicy, register
from balancer.routing.filters import kv_headroom
from balancer.routing.prefix_index import PrefixIndex


@register
class CacheAware(RoutingPolicy):
    name = "cache_aware"

    def __init__(self, affinity_s: float = 1.0, lru_blocks_per_worker: int = 0) -> None:
        """``lru_blocks_per_worker``: the index's bound per worker; 0 sizes it from each worker's KV capacity."""
        self.affinity_s = affinity_s
        self.lru_blocks = lru_blocks_per_worker
        self.index = PrefixIndex(1 << 62)

    def cached_fraction(self, w: WorkerState, request: RouteContext) -> float:
        """The share of the prompt ``w`` is estimated to hold in its prefix cache."""
        hashes = request.prefix_hashes
        return self.index.match(w.worker_id, hashes) / len(hashes) if hashes else 0.0

    def cost(self, w: WorkerState, request: RouteContext) -> float:
        hit = self.cached_fraction(w, request)
        uncached = replace(request, prompt_tokens=round(request.prompt_tokens * (1.0 - hit))) if hit else request
        return w.assigned_work_s + work_seconds(w, uncached) - self.affinity_s * hit

    def pick(self, request: RouteContext, candidates: Sequence[WorkerState]) -> WorkerState:
        chosen = min(kv_headroom(request, candidates), key=lambda w: (self.cost(w, request), w.worker_id))
        hashes = request.prefix_hashes
        if hashes:
            tokens_per_hash = max(1, request.prompt_tokens // len(hashes))
            bound = self.lru_blocks or max(1, chosen.kv_capacity_tokens // tokens_per_hash)
            self.index.record(chosen.worker_id, hashes, bound)
        return chosen
