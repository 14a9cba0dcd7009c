"""Iteration-level scheduler: builds each step's batch under a token budget and the KV blocks free.

Shape follows vLLM v1: every request has ``num_computed_tokens``; each step gives a request some new tokens
(one for a decode, a chunk for a prefill), so prefill and decode share one budget. Running requests go first
(in policy order), then waiting ones are admitted while blocks (above the watermark) and budget last. When a
running request cannot grow, the policy names a victim to preempt by recompute: its blocks are freed at once
and it waits again from zero computed tokens.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple

from workers.block_manager import BlockManager
from workers.clock import Clock
from workers.policies.base import EnginePolicy
from workers.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0 or self.max_model_len <= 0:
            raise ValueError("scheduler limits must be positive")


class ScheduledRequest:
    """One request's share of a step, fixed when scheduled (the request itself changes on update).

    A slotted class rather than a frozen dataclass: one is made per running request per step.
    """

    __slots__ = ("request", "num_new_tokens", "context_before", "samples", "is_decode")

    def __init__(self, request: Request, num_new_tokens: int) -> None:
        self.request = request
        self.num_new_tokens = num_new_tokens
        self.context_before = before = request.num_computed_tokens   # tokens already in the KV cache
        # this step completes the pending tokens, so the executor samples a token
        self.samples = samples = before + num_new_tokens == request.num_tokens
        self.is_decode = num_new_tokens == 1 and samples and request.num_tokens > len(request.prompt_token_ids)

    def __repr__(self) -> str:
        return f"ScheduledRequest({self.request.request_id!r}, new={self.num_new_tokens}, ctx={self.context_before})"


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    refused: list[Request] = field(default_factory=list)      # ended before they ran (the policy's triage)

    @property
    def num_decode_tokens(self) -> int:
        return sum(1 for s in self.scheduled if s.is_decode)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled if not s.is_decode)


class RequestOutput(NamedTuple):
    """What one step produced for one request (a named tuple: one is made per token)."""

    request: Request
    new_token_ids: tuple[int, ...]
    finished: bool
    finish_reason: str | None


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, policy: EnginePolicy,
                 clock: Clock) -> None:
        self.config = config
        self.blocks = block_manager
        self.policy = policy
        self.clock = clock
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._by_id: dict[str, Request] = {}
        self.num_finished = 0
        self.num_aborted = 0

    # ----- queue state -------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def get(self, request_id: str) -> Request | None:
        return self._by_id.get(request_id)

    def pending_prefill_tokens(self) -> int:
        """Tokens still to prefill: all of every waiting request's, and running ones' unfinished chunks (read by
        every load report, so the counters are read directly)."""
        waiting = sum([r.num_tokens for r in self.waiting]) - sum([r.num_computed_tokens for r in self.waiting])
        return waiting + sum([n for r in self.running if (n := r.num_tokens - r.num_computed_tokens) > 1])

    def decode_context_tokens(self) -> int:
        return sum(r.num_tokens for r in self.running)

    # ----- entry and exit ----------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self._by_id:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if request.num_prompt_tokens >= self.config.max_model_len:
            raise ValueError(f"prompt of {request.num_prompt_tokens} tokens does not fit the context window "
                             f"of {self.config.max_model_len}")
        request.status = RequestStatus.WAITING
        self._by_id[request.request_id] = request
        self._enqueue_waiting(request)

    def abort_request(self, request_id: str) -> Request | None:
        """Remove a request wherever it is and free its blocks at once."""
        request = self._by_id.get(request_id)
        if request is None or request.is_finished:
            return None
        self._finish(request, RequestStatus.FINISHED_ABORTED)
        return request

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        """End a request for a reason found outside the scheduler (a stop string)."""
        request = self._by_id.get(request_id)
        if request is not None and not request.is_finished:
            self._finish(request, status)

    # ----- one iteration -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        now = self.clock.now()
        out = SchedulerOutput()
        policy = self.policy
        if not policy.static_key:
            self.running.sort(key=lambda r: policy.key(r, now))
            self.waiting.sort(key=lambda r: policy.key(r, now))
        policy.plan(now, self.running, self.waiting)
        for request in policy.take_refused():
            if request.status is RequestStatus.WAITING and request.request_id in self._by_id:
                self._finish(request, RequestStatus.FINISHED_REFUSED, now)
                out.refused.append(request)
        max_seqs = self.config.max_num_seqs if policy.max_running is None else \
            max(1, min(policy.max_running, self.config.max_num_seqs))
        budget = self.config.max_num_batched_tokens if policy.max_batched_tokens is None else \
            max(1, min(policy.max_batched_tokens, self.config.max_num_batched_tokens))

        # 1. the policy may evict running requests in favour of a more important waiting one
        if self.waiting and self.running:
            head = self.waiting[0]
            while (victim := policy.victim_for_waiting(head, self.running, self._fits, now)) is not None:
                self._preempt(victim, now)
                out.preempted.append(victim)

        # 2. running requests first, in policy order; when one cannot grow, evict the policy's victim
        memory_pressure = False
        running = self.running
        grow = self.blocks.grow
        scheduled = out.scheduled
        i = 0
        while i < len(running) and budget > 0:
            request = running[i]
            computed = request.num_computed_tokens
            num_new = request.num_tokens - computed
            if num_new > budget:
                num_new = budget
            while not grow(request.request_id, computed + num_new):
                victim = policy.preemption_victim(running[i:], now)
                self._preempt(victim, now)
                out.preempted.append(victim)
                memory_pressure = True
                if victim is request:
                    break
            else:
                scheduled.append(ScheduledRequest(request, num_new))
                budget -= num_new
                i += 1

        # 3. admit waiting requests while budget, sequence slots and blocks above the watermark last
        if not memory_pressure and self.waiting and len(running) < max_seqs and policy.admission_open(now, running):
            started = list(running)
            admitted: list[Request] = []
            for request in self.waiting:
                if budget <= 0 or len(running) + len(admitted) >= max_seqs:
                    break
                if not policy.admit(request, now, started):
                    continue
                hit = self.blocks.match(request)      # leading blocks in the prefix cache: not prefilled again
                cached = len(hit) * self.blocks.block_size
                num_new = min(request.num_tokens - cached, budget)
                alloc = max(num_new, self.policy.reserve_tokens(request) - cached)
                if not self.blocks.can_allocate(request, alloc, admission=True, hit=hit):
                    break
                request.status = RequestStatus.RUNNING
                if request.first_scheduled_time is None:
                    request.first_scheduled_time = now
                self.blocks.attach(request, hit)
                self._schedule(request, num_new, alloc, out)
                budget -= num_new
                admitted.append(request)
            if admitted:
                gone = set(map(id, admitted))
                self.waiting = [r for r in self.waiting if id(r) not in gone]
                for request in admitted:
                    self._insert_sorted(self.running, request, now)
        return out

    def update(self, out: SchedulerOutput, sampled: Mapping[str, int]) -> list[RequestOutput]:
        """Apply a step's results: advance counters, append sampled tokens, finish what must stop."""
        now = self.clock.now()
        results: list[RequestOutput] = []
        running = RequestStatus.RUNNING
        blocks = self.blocks
        bs = blocks.block_size if blocks.caching else 0
        for item in out.scheduled:
            request = item.request
            if request.status is not running:
                continue          # finished, aborted or preempted while the step ran; its blocks are free
            request.num_computed_tokens = computed = item.context_before + item.num_new_tokens
            if bs and computed // bs > item.context_before // bs:
                blocks.commit(request)      # a block just filled up: cache it for prompts that start the same
            if not item.samples:
                continue          # a prefill chunk that is not the last
            token = sampled[request.request_id]
            request.append_output(token)
            if request.first_token_time is None:
                request.first_token_time = now
            status = self._stop_status(request, token)
            if status is None:
                results.append(RequestOutput(request, (token,), False, None))
            else:
                self._finish(request, status, now)
                results.append(RequestOutput(request, (token,), True, status.finish_reason))
        return results

    # ----- internals ---------------------------------------------------------------------------------
    def _schedule(self, request: Request, num_new: int, alloc_tokens: int, out: SchedulerOutput) -> None:
        self.blocks.allocate(request, alloc_tokens)
        out.scheduled.append(ScheduledRequest(request, num_new))

    def _alloc_tokens(self, request: Request, num_new: int) -> int:
        """Tokens to allocate on admission: this step's, or the policy's up-front reservation if larger."""
        return max(num_new, self.policy.reserve_tokens(request) - request.num_computed_tokens)

    def _fits(self, request: Request) -> bool:
        """Whether a waiting request could be admitted right now (a sequence slot and its first blocks)."""
        if len(self.running) >= self.config.max_num_seqs:
            return False
        num_new = min(request.num_pending_tokens, self.config.max_num_batched_tokens)
        return self.blocks.can_allocate(request, self._alloc_tokens(request, num_new), admission=True)

    def _stop_status(self, request: Request, token: int) -> RequestStatus | None:
        sp = request.sampling
        if not sp.ignore_eos and request.eos_token_id is not None and token == request.eos_token_id:
            return RequestStatus.FINISHED_STOPPED
        if token in sp.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= sp.max_tokens or request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _preempt(self, request: Request, now: float) -> None:
        self.running.remove(request)
        self.blocks.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.preemption_times.append(now)
        self._enqueue_waiting(request)

    def _finish(self, request: Request, status: RequestStatus, now: float | None = None) -> None:
        queue = self.running if request.status is RequestStatus.RUNNING else self.waiting
        queue.remove(request)
        self.blocks.free(request)
        request.status = status
        request.finished_time = self.clock.now() if now is None else now
        del self._by_id[request.request_id]
        if status in (RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_REFUSED):
            self.num_aborted += 1
        else:
            self.num_finished += 1

    def _enqueue_waiting(self, request: Request) -> None:
        self._insert_sorted(self.waiting, request, self.clock.now())

    def _insert_sorted(self, queue: list[Request], request: Request, now: float) -> None:
        key = self.policy.key
        bisect.insort_right(queue, request, key=lambda r: key(r, now))
