"""The balancer's bounded global queue: late binding, priority then fairness then deadline, shedding.

A request waits here, not in some worker's queue, when no worker has room for it; it is bound to a worker
only when one does, so it goes to whichever frees up first. Order: priority (higher first), then the tenant's
virtual token counter (VTC: tokens already served to that tenant, so one tenant's flood cannot starve the
others), then the SLO deadline. Sheddable requests may only use the queue below ``shed_at``; when the queue
is full a non-sheddable request evicts the last sheddable one, else it too is refused.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from balancer.admission import AdmissionControl
from balancer.estimate import kv_tokens_needed, work_seconds
from balancer.registry import Assignment, Registry, WorkerState
from balancer.route_context import RouteContext
from balancer.routing.base import RoutingPolicy
from services.engine_traits import TRIAGING_ENGINE_POLICIES


QUEUE_ORDERS = ("fair", "slack")


class QueueFull(Exception):
    """Refused (RESOURCE_EXHAUSTED): the queue is full, or admission control said no (``retry_s``: when to retry,
    None for the balancer's backlog estimate)."""

    def __init__(self, message: str, retry_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_s = retry_s


@dataclass(eq=False)
class Waiter:
    request: RouteContext
    exclude: frozenset[str]
    deadline: float                         # SLO deadline on the balancer's clock
    seq: int
    future: asyncio.Future | None = field(default=None, repr=False)   # the live balancer waits on it


class GlobalQueue:
    def __init__(self, limit: int, shed_at: float = 0.5, order: str = "fair",
                 clock: Callable[[], float] | None = None, admission: AdmissionControl | None = None) -> None:
        """``order``: "fair" (priority, then the tenant's VTC, then deadline) or "slack" (priority, then requests
        whose SLO deadline has passed behind those that can still make it, then deadline; needs ``clock``)."""
        if limit <= 0:
            raise ValueError("queue limit must be positive")
        if order not in QUEUE_ORDERS:
            raise ValueError(f"queue order must be one of {', '.join(QUEUE_ORDERS)}, got {order!r}")
        if order == "slack" and clock is None:
            raise ValueError("a slack-ordered queue needs the balancer's clock")
        self.limit = limit
        self.admission = admission          # checks requests bound at once (None: every one is admitted)
        self.shed_at = shed_at
        self.order = order
        self.clock = clock
        self.waiters: list[Waiter] = []
        self.vtc: dict[str, float] = {}
        self._seq = itertools.count()
        self.shed = 0               # refused (RESOURCE_EXHAUSTED), evicted ones included
        self.evicted = 0

    def __len__(self) -> int:
        return len(self.waiters)

    def key(self, w: Waiter) -> tuple:
        if self.order == "slack":
            return (-w.request.priority, 1 if w.deadline < self.clock() else 0, w.deadline, w.seq)  # type: ignore[misc]
        return (-w.request.priority, self.vtc.get(w.request.tenant, 0.0), w.deadline, w.seq)

    def ordered(self) -> list[Waiter]:
        return sorted(self.waiters, key=self.key)

    def push(self, request: RouteContext, exclude: frozenset[str], deadline: float,
             future: asyncio.Future | None = None) -> tuple[Waiter, list[Waiter]]:
        """Queue ``request``; returns its waiter and any sheddable waiters it evicted. Raises QueueFull."""
        evicted: list[Waiter] = []
        if request.sheddable and len(self.waiters) >= self.shed_at * self.limit:
            self.shed += 1
            raise QueueFull(f"cluster saturated: {len(self.waiters)} requests queued")
        if len(self.waiters) >= self.limit:
            sheddable = [w for w in self.ordered() if w.request.sheddable]
            if request.sheddable or not sheddable:
                self.shed += 1
                raise QueueFull(f"queue full ({self.limit} requests)")
            victim = sheddable[-1]
            self.remove(victim)
            evicted.append(victim)
            self.shed += 1
            self.evicted += 1
        self._activate(request.tenant)
        waiter = Waiter(request, exclude, deadline, next(self._seq), future)
        self.waiters.append(waiter)
        return waiter, evicted

    def remove(self, waiter: Waiter) -> None:
        if waiter in self.waiters:
            self.waiters.remove(waiter)

    def charge(self, tenant: str, tokens: float) -> None:
        """Count tokens served to ``tenant`` (VTC)."""
        self.vtc[tenant] = self.vtc.get(tenant, 0.0) + tokens

    def _activate(self, tenant: str) -> None:
        """A tenant that (re)joins the queue starts from the least counter among queued tenants, not from a
        stale low value that would let it jump ahead of everyone (VTC's lift rule)."""
        active = {w.request.tenant for w in self.waiters}
        if tenant in active or not active:
            return
        floor = min(self.vtc.get(t, 0.0) for t in active)
        self.vtc[tenant] = max(self.vtc.get(tenant, 0.0), floor)


@dataclass
class Admission:
    """What ``admit`` decided: bound to ``worker`` now, or queued as ``waiter`` (evicting ``evicted``)."""

    worker: WorkerState | None = None
    waiter: Waiter | None = None
    evicted: list[Waiter] = field(default_factory=list)


def queue_deadline_s(r: RouteContext) -> float:
    """How long a request may wait in the queue before its SLO is lost: its TTFT target, else its E2E target."""
    return (r.ttft_ms or r.e2e_ms or 60_000) / 1000


def admit(policy: RoutingPolicy, registry: Registry, queue: GlobalQueue, r: RouteContext,
          candidates: Sequence[WorkerState], now: float, exclude: frozenset[str] = frozenset(),
          future: asyncio.Future | None = None) -> Admission:
    """The balancer's one decision for a new request, live and simulated: bind it now, queue it, or shed it.

    A baseline (no late binding) binds at once to any candidate, and so does every policy in front of engines
    that triage (an SLO-aware engine policy): a queue here would hide the backlog from the engines that can
    order it by deadline and put the lost causes last (measured: ``bench/results_doc.py``). Binding at once, the
    queue's admission control (``balancer/admission.py``), when set, may refuse the request (``QueueFull``) or
    narrow the workers it may go to. Otherwise it binds
    only where a worker has room and nobody is queued ahead of it; else it waits in the queue (raises
    ``QueueFull`` when shed).
    """
    if not holds_queue(policy, candidates):
        roomy = list(candidates)        # bind at once: a baseline's way, or engines that triage their own queue
        if queue.admission is not None and roomy:
            refusal = queue.admission.check(r, roomy, registry.tenant_outstanding, now)
            if refusal is not None:
                queue.shed += 1
                raise QueueFull(refusal.reason, refusal.retry_s)
            roomy = queue.admission.feasible
    elif queue.waiters:
        roomy = []
    else:
        need = kv_tokens_needed(r)
        roomy = [w for w in candidates if has_room(w, need)]
    if roomy:
        return Admission(worker=bind(policy, registry, queue, r, roomy))
    waiter, evicted = queue.push(r, exclude, now + queue_deadline_s(r), future)
    return Admission(waiter=waiter, evicted=evicted)


def holds_queue(policy: RoutingPolicy, candidates: Sequence[WorkerState]) -> bool:
    """Whether requests wait at the balancer for room: a late-binding policy's way, unless the engines triage
    (then only when the cluster file asks for it, ``routing: {options: {late_binding: true}}``)."""
    if not policy.late_binding:
        return False
    return policy.binding_set or not any(w.engine_policy in TRIAGING_ENGINE_POLICIES for w in candidates)


def report_interval(policy: RoutingPolicy, configured_s: float) -> float:
    """How often workers report load to this balancer: the policy's own scrape interval when it has one."""
    return policy.report_interval_s if policy.report_interval_s is not None else configured_s


def has_room(w: WorkerState, tokens_needed: int) -> bool:
    """A free sequence slot and unpromised KV for the request; an idle worker always has room."""
    if w.outstanding == 0:
        return True
    return w.outstanding < w.max_num_seqs and w.kv_capacity_tokens - w.assigned_tokens >= tokens_needed


def bind(policy: RoutingPolicy, registry: Registry, queue: GlobalQueue, r: RouteContext,
         candidates: Sequence[WorkerState]) -> WorkerState:
    """Pick a worker for ``r`` and count it there: in-flight work, promised KV, and the tenant's VTC."""
    choice = policy.route(r, candidates)
    need = kv_tokens_needed(r)
    registry.acquire(r.request_id, Assignment(choice.worker_id, work_seconds(choice, r), need, r.prompt_tokens,
                                              r.gateway_id, r.tenant))
    queue.charge(r.tenant, need)
    return choice


def drain(queue: GlobalQueue, candidates_for: Callable[[Waiter], Sequence[WorkerState]]
          ) -> Iterator[tuple[Waiter, list[WorkerState]]]:
    """Queued requests in queue order, each with the workers that have room for it, taken off the queue;
    stops at the first one that fits nowhere (no overtaking, so the order holds). The head is found by one scan
    per bind rather than a sort: most calls bind nothing or one request, and keys move as VTC charges."""
    while queue.waiters:
        waiter = min(queue.waiters, key=queue.key)
        need = kv_tokens_needed(waiter.request)
        roomy = [w for w in candidates_for(waiter) if has_room(w, need)]
        if not roomy:
            return
        queue.remove(waiter)
        yield waiter, roomy
