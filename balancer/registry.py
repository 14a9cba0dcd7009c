"""Live workers as the balancer knows them: what they are, their last reported load, and in-flight work.

Soft state only: after a balancer restart, workers re-register and the table rebuilds itself. A worker whose
reports stop for ``timeout_s`` leaves rotation; the clock is injected so tests can move time by hand. Work
routed by gateways is counted at Route and uncounted at Release, so a burst between two load reports does not
all land on one worker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from services.latency import LatencyModel

log = logging.getLogger(__name__)


@dataclass
class WorkerState:
    worker_id: str
    address: str = ""
    model: str = ""
    gpu_type: str = ""
    executor: str = "sim"
    max_model_len: int = 4096
    kv_blocks_total: int = 0
    block_size: int = 16
    engine_policy: str = ""
    max_num_seqs: int = 256
    # last load report
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_free: int = 0
    step_time_ms: float = 0.0
    pending_prefill_tokens: int = 0
    decode_context_tokens: int = 0
    iterations: int = 0
    draining: bool = False
    kv_blocks_cached: int = 0
    prefix_hit_tokens: int = 0
    prefix_queried_tokens: int = 0
    # balancer's own view
    outstanding: int = 0                  # routed by gateways, not yet released
    assigned_work_s: float = 0.0          # predicted worker-seconds of the outstanding requests
    assigned_tokens: int = 0              # predicted KV tokens (prompt + output) of the outstanding requests
    routed_since_report: int = 0          # prompt tokens routed here since its last load report
    last_seen: float = 0.0
    generation: int = 0                   # bumps on every (re-)registration
    capacity_tok_s: float = 0.0           # from the Profiler's latency profile; 0 until known
    profile_source: str = ""
    latency: LatencyModel | None = field(default=None, repr=False)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv_blocks_total * self.block_size


@dataclass(frozen=True)
class Assignment:
    worker_id: str
    work_s: float
    tokens: int
    prompt_tokens: int
    gateway_id: str = ""        # released with the gateway's lease if the gateway dies before releasing it
    tenant: str = ""


LOAD_FIELDS = ("running", "waiting", "kv_blocks_used", "kv_blocks_free", "step_time_ms", "pending_prefill_tokens",
               "decode_context_tokens", "iterations", "draining", "kv_blocks_cached", "prefix_hit_tokens",
               "prefix_queried_tokens")
INFO_FIELDS = ("address", "model", "gpu_type", "executor", "max_model_len", "kv_blocks_total", "block_size",
               "engine_policy", "max_num_seqs")


class Registry:
    def __init__(self, clock: Callable[[], float], timeout_s: float) -> None:
        self.clock = clock
        self.timeout_s = timeout_s
        self.workers: dict[str, WorkerState] = {}
        self.assignments: dict[str, Assignment] = {}
        self.leases: dict[str, float] = {}          # gateway id -> when it last renewed (or routed)
        self.tenant_outstanding: dict[str, int] = {}    # tenant -> requests bound and not yet released

    def register(self, worker_id: str, **info: object) -> WorkerState:
        old = self.workers.get(worker_id)
        state = WorkerState(worker_id, **{k: v for k, v in info.items() if k in INFO_FIELDS})
        state.kv_blocks_free = state.kv_blocks_total
        state.max_num_seqs = state.max_num_seqs or 256
        state.last_seen = self.clock()
        state.generation = old.generation + 1 if old else 1
        if old is not None:               # a re-registration keeps what the balancer already learned
            state.capacity_tok_s, state.profile_source, state.latency = old.capacity_tok_s, old.profile_source, old.latency
            state.outstanding, state.assigned_work_s, state.assigned_tokens = \
                old.outstanding, old.assigned_work_s, old.assigned_tokens
        self.workers[worker_id] = state
        log.info("worker registered", extra={"fields": {"worker_id": worker_id, "gpu_type": state.gpu_type,
                                                          "address": state.address}})
        return state

    def report(self, worker_id: str, **load: object) -> bool:
        state = self.workers.get(worker_id)
        if state is None:
            return False
        for key in LOAD_FIELDS:
            if key in load:
                setattr(state, key, load[key])
        state.routed_since_report = 0
        state.last_seen = self.clock()
        return True

    def remove(self, worker_id: str, reason: str, generation: int | None = None) -> bool:
        state = self.workers.get(worker_id)
        if state is None or (generation is not None and state.generation != generation):
            return False
        del self.workers[worker_id]
        log.warning("worker removed", extra={"fields": {"worker_id": worker_id, "reason": reason}})
        return True

    def expire(self) -> list[str]:
        now = self.clock()
        stale = [w for w, s in self.workers.items() if now - s.last_seen > self.timeout_s]
        for worker_id in stale:
            self.remove(worker_id, f"no load report for {self.timeout_s:.1f}s")
        return stale

    def routable(self, exclude: set[str] | frozenset[str] = frozenset()) -> list[WorkerState]:
        now = self.clock()
        return [s for s in self.workers.values()
                if not s.draining and now - s.last_seen <= self.timeout_s and s.worker_id not in exclude]

    def acquire(self, request_id: str, assignment: Assignment) -> None:
        state = self.workers.get(assignment.worker_id)
        if state is None:
            return
        self.release(request_id)          # a retried request replaces its earlier assignment
        self.assignments[request_id] = assignment
        if assignment.gateway_id:
            self.leases[assignment.gateway_id] = self.clock()
        state.outstanding += 1
        self.tenant_outstanding[assignment.tenant] = self.tenant_outstanding.get(assignment.tenant, 0) + 1
        state.assigned_work_s += assignment.work_s
        state.assigned_tokens += assignment.tokens
        state.routed_since_report += assignment.prompt_tokens

    def renew(self, gateway_id: str) -> int:
        """A gateway says it is alive; returns how many of its requests still count against workers."""
        self.leases[gateway_id] = self.clock()
        return sum(1 for a in self.assignments.values() if a.gateway_id == gateway_id)

    def expire_leases(self, lease_s: float) -> int:
        """Release the bindings of gateways silent for longer than ``lease_s`` (they died without releasing:
        their requests ended with them). Returns how many were released."""
        now = self.clock()
        lapsed = {g for g, seen in self.leases.items() if now - seen > lease_s}
        if not lapsed:
            return 0
        orphans = [rid for rid, a in self.assignments.items() if a.gateway_id in lapsed]
        for rid in orphans:
            self.release(rid)
        for gateway_id in lapsed:
            del self.leases[gateway_id]
        if orphans:
            log.warning("gateway lease lapsed; released its requests",
                        extra={"fields": {"gateways": sorted(lapsed), "released": len(orphans)}})
        return len(orphans)

    def release(self, request_id: str) -> None:
        assignment = self.assignments.pop(request_id, None)
        if assignment is None:
            return
        left = self.tenant_outstanding.get(assignment.tenant, 0) - 1
        if left > 0:
            self.tenant_outstanding[assignment.tenant] = left
        else:
            self.tenant_outstanding.pop(assignment.tenant, None)
        state = self.workers.get(assignment.worker_id)
        if state is not None:
            state.outstanding = max(0, state.outstanding - 1)
            state.assigned_work_s = max(0.0, state.assigned_work_s - assignment.work_s)
            state.assigned_tokens = max(0, state.assigned_tokens - assignment.tokens)
