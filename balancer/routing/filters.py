"""Filters run before a policy scores: each keeps the workers that pass, or all of them when none does."""

from __future__ import annotations

from typing import Sequence

from balancer.estimate import expected_times, kv_headroom_tokens, kv_tokens_needed
from balancer.registry import WorkerState
from balancer.route_context import RouteContext


def slo_feasible(r: RouteContext, candidates: Sequence[WorkerState]) -> list[WorkerState]:
    """Workers predicted to meet the request's SLO (E2E class: E2E; else TTFT), if any is."""
    if not (r.e2e_ms or r.ttft_ms):
        return list(candidates)
    keep = []
    for w in candidates:
        ttft, e2e = expected_times(w, r)
        if (e2e * 1000 <= r.e2e_ms) if r.e2e_ms else (ttft * 1000 <= r.ttft_ms):
            keep.append(w)
    return keep or list(candidates)


def kv_headroom(r: RouteContext, candidates: Sequence[WorkerState]) -> list[WorkerState]:
    """Workers whose unpromised KV holds this request's prompt and predicted output, if any does."""
    need = kv_tokens_needed(r)
    return [w for w in candidates if kv_headroom_tokens(w) >= need] or list(candidates)
