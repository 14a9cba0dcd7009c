"""Prefix affinity: requests sharing a prompt prefix go to the same worker (rendezvous hashing on the hash of
the prompt's leading blocks), where its KV could be reused; an imbalance guard sends the request to the least
loaded worker when the preferred one has far more in flight than the least loaded."""

from __future__ import annotations

import hashlib
from typing import Sequence

from balancer.registry import WorkerState
from balancer.routing.base import RouteContext, RoutingPolicy, register

PREFIX_BLOCKS = 4


@register
class PrefixAffinity(RoutingPolicy):
    name = "prefix_affinity"

    def __init__(self, slack: float = 1.5, margin: int = 4) -> None:
        self.slack, self.margin = slack, margin

    def pick(self, request: RouteContext, candidates: Sequence[WorkerState]) -> WorkerState:
        least = min(candidates, key=lambda w: (w.outstanding, w.worker_id))
        if not request.prefix_hashes:
            return least
        key = request.prefix_hashes[min(len(request.prefix_hashes), PREFIX_BLOCKS) - 1]
        preferred = max(candidates, key=lambda w: _score(key, w.worker_id))
        if preferred.outstanding > self.slack * least.outstanding + self.margin:
            return least
        return preferred


def _score(key: int, worker_id: str) -> int:
    """Rendezvous score; a real mixing hash, since CRC32's linearity makes scores of similar keys correlate."""
    return int.from_bytes(hashlib.blake2b(f"{key}:{worker_id}".encode(), digest_size=8).digest(), "big")
