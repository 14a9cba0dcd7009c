"""A router-side estimate of each worker's prefix cache: the block hashes of the prompts routed there.

Peer routers (llm-d's "estimated" prefix-cache mode, SGLang's cache-aware router) do not ask the engines what
they cache; they remember what they sent where, with an LRU bound per worker standing in for the engine's
eviction. ``prefix_hashes`` are chained, so a worker's match is the run of leading hashes it holds.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence


class PrefixIndex:
    def __init__(self, capacity_per_worker: int = 31250) -> None:
        if capacity_per_worker < 1:
            raise ValueError("capacity_per_worker must be at least 1")
        self.capacity = capacity_per_worker
        self._lru: dict[str, OrderedDict[int, None]] = {}

    def match(self, worker_id: str, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` the worker holds, stopping at the first miss (no refresh)."""
        lru = self._lru.get(worker_id)
        if not lru:
            return 0
        matched = 0
        for h in hashes:
            if h not in lru:
                break
            matched += 1
        return matched

    def record(self, worker_id: str, hashes: Sequence[int], capacity: int = 0) -> None:
        """Mark ``hashes`` cached on the worker (refreshing them); evict its oldest past capacity (``capacity``
        when given: a bound sized from that worker's KV memory)."""
        lru = self._lru.setdefault(worker_id, OrderedDict())
        for h in hashes:
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) > (capacity or self.capacity):
            lru.popitem(last=False)

    def size(self, worker_id: str) -> int:
        return len(self._lru.get(worker_id, ()))
