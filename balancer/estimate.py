"""What a request would cost on a worker, from its latency profile and its load: pure functions.

Routing policies, the SLO filter and the global queue all price requests the same way. Without a profile a
worker is priced from its reported step time, which is coarser but never blocks routing.
"""

from __future__ import annotations

import math

from balancer.registry import WorkerState
from balancer.route_context import RouteContext
from services.engine_traits import PREFILL_CHUNK, TRIAGING_ENGINE_POLICIES
from services.length_distribution import LengthDistribution

FALLBACK_STEP_S = 0.03


def output_tokens(r: RouteContext) -> float:
    """The typical answer: the predicted median (a single request's latency is forecast by it)."""
    return r.predicted_output or float(r.max_tokens or 128)


def expected_output_tokens(r: RouteContext) -> float:
    """The mean of the predicted length distribution, tail included: what a request costs on average, so the
    work a worker is promised adds up to what it will run."""
    if not r.predicted_lengths:
        return output_tokens(r)
    return LengthDistribution.from_quantiles(r.predicted_lengths, r.max_tokens or 1 << 20).mean()


def work_seconds(w: WorkerState, r: RouteContext) -> float:
    """Worker-seconds this request adds at saturation: its prefill plus its share of decode capacity, priced by
    the expected length over the predicted distribution."""
    out = expected_output_tokens(r)
    if w.latency is not None and w.capacity_tok_s > 0:
        return w.latency.prefill_time(max(1, r.prompt_tokens)) + out / w.capacity_tok_s
    step = (w.step_time_ms / 1000) or FALLBACK_STEP_S
    return step * (1 + r.prompt_tokens / 512) + out * step / 8


def expected_times(w: WorkerState, r: RouteContext) -> tuple[float, float]:
    """(TTFT, E2E) in seconds if ``r`` went to ``w`` now, under that worker's engine policy: the prefill queued
    ahead of it first, then decode at its batch size."""
    out = output_tokens(r)
    batch = min(max(1, w.max_num_seqs), max(w.running + w.waiting, w.outstanding) + 1)
    if w.latency is None:
        step = (w.step_time_ms / 1000) or FALLBACK_STEP_S
        ttft = step * (2 + w.waiting)
        return ttft, ttft + (out - 1) * step
    lm = w.latency
    queued = w.pending_prefill_tokens + w.routed_since_report
    context = w.decode_context_tokens / w.running if w.running else r.prompt_tokens
    step = lm.decode_time(batch, int(context + out / 2))
    if w.engine_policy in TRIAGING_ENGINE_POLICIES:
        # an engine that orders by deadline serves about half its backlog before a new request, and prefills in
        # chunks of PREFILL_CHUNK tokens beside its decodes, one chunk a step
        tokens = queued / 2 + max(1, r.prompt_tokens)
        chunk_step = step + lm.prefill_time(PREFILL_CHUNK) - lm.prefill_time(1)
        ttft = math.ceil(tokens / PREFILL_CHUNK) * chunk_step + step
    else:
        ttft = lm.prefill_time(queued + max(1, r.prompt_tokens)) + step
    return ttft, ttft + max(0.0, out - 1) * step


def kv_headroom_tokens(w: WorkerState) -> int:
    """KV tokens not yet promised to outstanding requests."""
    return w.kv_capacity_tokens - w.assigned_tokens


def kv_tokens_needed(r: RouteContext) -> int:
    return int(r.prompt_tokens + output_tokens(r))
