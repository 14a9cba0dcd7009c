"""Admission control at the balancer, for requests it binds at once (in front of engines that triage).

Our own rule, extending DESIGN.md's "refuse it (RESOURCE_EXHAUSTED, with a retry hint) when the cluster is saturated
and the request is sheddable". An engine that triages keeps every request it is handed and puts the lost causes
last: under a sustained overload its waiting queue, the gateway's open streams and every client's wait grow for as
long as the overload lasts, and a long request that its policy keeps ranking last is never served in time. With
``admission: slo`` the balancer decides first, from the same forecast it routes by (``estimate.expected_times``):

- *infeasible*: no live worker is forecast to meet the request's targets (TTFT and TPOT, or E2E) within ``slack``
  times them: refused, whatever its class, before it costs anything; otherwise the routing policy chooses among
  the workers forecast to meet them;
- *spare capacity only*: a sheddable request, and a request of a tenant that already holds more than its fair
  share of the requests in flight (their number over the tenants with any in flight or seen lately), may go only
  to a worker that takes new work at once (less than ``busy_s`` of prefill queued, KV cache not full) and, for a
  tenant over its share, keeps the other tenants' share of its KV cache free (with n active tenants, (n-1)/n of
  it); where none does, the cluster is saturated for it and the request is refused. So batch work only fills idle
  capacity, and one tenant's flood fills the cluster only up to the point where the others' requests still start
  at once.

A refusal carries a retry hint: how long the best worker's backlog takes to drop back under the bar.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from balancer.estimate import FALLBACK_STEP_S, expected_times, output_tokens
from balancer.registry import WorkerState
from balancer.route_context import RouteContext
from services.engine_traits import PREFILL_CHUNK, TRIAGING_ENGINE_POLICIES

ADMISSION_MODES = ("off", "slo")


def kv_full(w: WorkerState) -> bool:
    """Requests wait on ``w`` for KV blocks (its cache is all but full): they leave its queue as others finish,
    not at its prefill rate, so ``queue_delay_s`` says too little."""
    return w.waiting > 0 and w.kv_blocks_total > 0 and w.kv_blocks_free < 0.05 * w.kv_blocks_total


def queue_delay_s(w: WorkerState) -> float:
    """Seconds a new request would wait on ``w`` for the prefill queued ahead of it, at the worker's last reported
    step time (which, under load, includes the prefill chunk each step carries, and any CPU contention): all of
    the queue before a first-come engine, half of it before one that triages (``expected_times``' rule)."""
    queued = w.pending_prefill_tokens + w.routed_since_report
    if queued <= 0:
        return 0.0
    step = (w.step_time_ms / 1000) or FALLBACK_STEP_S
    ahead = queued / 2 if w.engine_policy in TRIAGING_ENGINE_POLICIES else queued
    return ahead / PREFILL_CHUNK * step


def expected_tpot(w: WorkerState, r: RouteContext) -> float:
    """Seconds between ``r``'s tokens on ``w``: a decode step at its batch, plus, before an engine that chunks
    prefill beside its decodes, the chunk a step carries while prefill is queued (the queue spread over the
    request's predicted answer)."""
    out = max(1.0, output_tokens(r))
    batch = min(max(1, w.max_num_seqs), max(w.running + w.waiting, w.outstanding) + 1)
    if w.latency is None:
        return (w.step_time_ms / 1000) or FALLBACK_STEP_S
    lm = w.latency
    context = w.decode_context_tokens / w.running if w.running else r.prompt_tokens
    step = lm.decode_time(batch, int(context + out / 2))
    if w.engine_policy not in TRIAGING_ENGINE_POLICIES:
        return step
    queued = w.pending_prefill_tokens + w.routed_since_report
    share = min(1.0, queued / PREFILL_CHUNK / out)
    return step + share * (lm.prefill_time(PREFILL_CHUNK) - lm.prefill_time(1))


def forecast_ratio(w: WorkerState, r: RouteContext) -> float:
    """The forecast over the target, the worst of the request's targets (<= 1: it would meet them on ``w``)."""
    ttft, e2e = expected_times(w, r)
    if r.e2e_ms:
        return e2e * 1000 / r.e2e_ms
    ratio = ttft * 1000 / r.ttft_ms if r.ttft_ms else 0.0
    if r.tpot_ms:
        ratio = max(ratio, expected_tpot(w, r) * 1000 / r.tpot_ms)
    return ratio


@dataclass(frozen=True)
class Refusal:
    reason: str
    retry_s: float


@dataclass
class AdmissionControl:
    busy_s: float = 0.05          # a worker whose queued prefill holds a new request longer than this is busy
    slack: float = 1.0            # admit when the forecast is within slack x the request's target
    tenant_window_s: float = 10.0  # a tenant that sent a request this recently counts toward the fair share
    refused: int = 0

    def __post_init__(self) -> None:
        self.seen: dict[str, float] = {}
        self.feasible: list[WorkerState] = []      # after an admission: the workers forecast to meet its SLO

    def check(self, r: RouteContext, candidates: Sequence[WorkerState], tenant_outstanding: Mapping[str, int],
              now: float) -> Refusal | None:
        """None to admit ``r`` (``feasible`` then holds the workers forecast to meet its SLO, for the routing policy
        to choose from); else why not, and when to try again."""
        self.seen[r.tenant] = now
        if not candidates:
            return None
        pool = list(candidates)
        tenants = self.active_tenants(tenant_outstanding, now)
        over = self.over_share(r.tenant, tenant_outstanding, tenants)
        if r.sheddable or over:
            # spare capacity only: workers that take new work at once; for a tenant over its share, only while the
            # worker keeps the others' share of its KV cache free
            reserve = 1 - 1 / len(tenants) if over else 0.0
            delays = {w.worker_id: queue_delay_s(w) for w in candidates}
            pool = [w for w in candidates if delays[w.worker_id] <= self.busy_s and not kv_full(w)
                    and w.kv_blocks_free >= reserve * w.kv_blocks_total]
            if not pool:
                backlog = min(delays.values())
                why = "sheddable work is refused" if r.sheddable else \
                    f"tenant {r.tenant!r} holds more than its share of the requests in flight"
                return self._refuse(f"cluster saturated (queued prefill {backlog:.1f} s on the least busy worker): "
                                    f"{why}", backlog - self.busy_s)
        feasible = [w for w in pool if self.meets(w, r)]
        if not feasible:
            best = min(forecast_ratio(w, r) for w in pool)
            target = r.e2e_ms or r.ttft_ms
            return self._refuse(f"no worker can meet the request's SLO now (forecast {best:.2f} x its target)",
                                (best - 1) * target / 1000 if target else 1.0)
        self.feasible = feasible
        return None

    def meets(self, w: WorkerState, r: RouteContext) -> bool:
        """Whether ``w`` is forecast to meet ``r``'s targets."""
        return forecast_ratio(w, r) <= self.slack

    def _refuse(self, reason: str, retry_s: float) -> Refusal:
        self.refused += 1
        return Refusal(reason, max(0.1, retry_s))

    def active_tenants(self, outstanding: Mapping[str, int], now: float) -> set[str]:
        """Tenants with requests in flight or seen in the last ``tenant_window_s``."""
        for t, seen in list(self.seen.items()):
            if now - seen > self.tenant_window_s and not outstanding.get(t):
                del self.seen[t]
        return set(self.seen) | {t for t, n in outstanding.items() if n > 0}

    @staticmethod
    def over_share(tenant: str, outstanding: Mapping[str, int], active: set[str]) -> bool:
        """Whether ``tenant`` holds more than an equal share of the requests in flight among the active tenants."""
        if len(active) < 2:
            return False
        return outstanding.get(tenant, 0) > sum(outstanding.values()) / len(active)
