"""What every SLO-aware engine policy shares: deadlines, a step-time estimate, feasibility and triage.

A request's next SLO milestone (``due``) is its first token by arrival + TTFT target, or its last token by
arrival + E2E target, or, once it streams, its next token at the pace the TPOT target allows; the SLO clock
starts at the client's arrival (``Request.slo_start``), not when this engine first saw the request.
A request is *late* when even an optimistic forecast misses its milestone: its pending prefill, then the
``optimism`` quantile of its predicted remaining length at the current decode step time (the worker's own
latency model). Triage puts late requests behind every request that can still make it: they still run when
there is room, finish, and count as missed, but no longer take the batch from those that can be saved. With
``refuse_sheddable``, a sheddable request that turns late before it ever ran is refused instead (the worker
answers RESOURCE_EXHAUSTED with a retry hint), so the batch does not spend its spare room on it. ``refuse_late``
does the same for a request of any class, and every ``recheck_steps`` steps checks the whole waiting queue, not
only its head: under a sustained overload a request its rank keeps at the back (a long one behind a stream of
shorter ones) is told at once, with a retry hint, instead of waiting unchecked until its client gives up
(measured: ``bench/overload.py``, ``bench/tenant_flood.py``).

Keys are static between steps (the scheduler keeps its queues sorted by insertion); ``plan`` re-checks the
head of the waiting queue every step and moves any request that became late behind the feasible ones. A
policy adds only its ``rank`` among feasible requests (and among late ones).

Every SLO-aware policy has a clairvoyant twin for benchmarks: the engine option ``clairvoyant: true`` hands it
the executor's replayed true lengths (the named path), so it plans by the true length instead of the predicted
distribution; comparing the two prices the predictor's error for that policy.
"""

from __future__ import annotations

import bisect
from typing import Callable, Sequence
from weakref import WeakKeyDictionary, WeakSet

from services.engine_traits import PREFILL_CHUNK
from services.length_distribution import LengthDistribution
from workers.policies.base import EnginePolicy
from workers.request import Request
from workers.step_estimate import StepTimes
from workers.true_lengths import TrueLengths


class SloAwarePolicy(EnginePolicy):
    needs = frozenset({"latency"})
    #: a context length typical of a decoding request, for the step-time estimate before the batch says
    DEFAULT_CONTEXT = 512

    def __init__(self, latency: StepTimes, triage: bool = True, optimism: float = 0.1, window: int = 8,
                 max_preemptions: int = 1, prefill_chunk: int = PREFILL_CHUNK, true_lengths: TrueLengths | None = None,
                 refuse_sheddable: bool = False, refuse_late: bool = False) -> None:
        if not 0 <= optimism <= 1:
            raise ValueError("optimism is a quantile, in [0, 1]")
        self.latency = latency
        self.true_lengths = true_lengths        # set only for a clairvoyant twin (engine option clairvoyant: true)
        self.triage = triage
        self.optimism = optimism
        self.window = window                   # waiting requests re-checked per step
        self.max_preemptions = max_preemptions  # a request is preempted for triage at most this often
        self.prefill_chunk = prefill_chunk      # > 0: prefill tokens a step may add to its decodes
        self._steps = 0
        self.recheck_steps = 16
        self._optimistic: WeakKeyDictionary[Request, tuple[int, float]] = WeakKeyDictionary()
        self.refuse_sheddable = refuse_sheddable  # a sheddable request that turns late is refused, not kept
        self.refuse_late = refuse_late          # any request that turns late before it ever ran is refused
        self._refused: list[Request] = []
        self.late: WeakSet[Request] = WeakSet()
        self._shape = (0, 0)
        self.step_s = latency.decode_time(1, self.DEFAULT_CONTEXT)

    # ----- SLO arithmetic --------------------------------------------------------------------------------
    @staticmethod
    def due(request: Request) -> float:
        """When the request's next SLO milestone falls, on the engine's clock (inf when it has none)."""
        slo = request.slo
        if slo.e2e_s:
            return request.slo_start + slo.e2e_s
        if request.first_token_time is None:
            return request.slo_start + slo.ttft_s if slo.ttft_s else float("inf")
        if slo.tpot_s:
            return request.first_token_time + request.num_output_tokens * slo.tpot_s
        return float("inf")

    def distribution(self, request: Request) -> LengthDistribution:
        """The output-length distribution the policy plans by: the predicted one, or for a clairvoyant twin the
        replayed true length."""
        if self.true_lengths is not None:
            true = self.true_lengths.get(request.request_id)
            if true:
                return LengthDistribution.point(true)
        return request.length_distribution

    def remaining_tokens(self, request: Request, quantile: float = 0.5) -> float:
        """Output tokens still to come at ``quantile`` of the distribution, given those produced."""
        left = request.sampling.max_tokens - request.num_output_tokens
        return max(1.0, min(left, self.distribution(request).remaining(request.num_output_tokens).quantile(quantile)))

    def next_token_at(self, request: Request, now: float) -> float:
        """The earliest the request's next token could come: its pending prefill (or recompute), then a step."""
        pending = request.num_pending_tokens
        return now + (self.latency.prefill_time(pending) if pending > 1 else 0.0) + self.step_s

    @staticmethod
    def per_bucket(cache: "WeakKeyDictionary[Request, tuple[int, float]]", request: Request,
                   compute: Callable[[Request], float]) -> float:
        """``compute(request)``, kept in ``cache`` and computed again only when the tokens the request has
        produced cross a power of two (its remaining distribution moves slowly; the batch is read every step)."""
        bucket = request.num_output_tokens.bit_length()
        cached = cache.get(request)
        if cached is None or cached[0] != bucket:
            cached = cache[request] = (bucket, compute(request))
        return cached[1]

    def optimistic_tokens(self, request: Request) -> float:
        """``remaining_tokens`` at the ``optimism`` quantile, cached while the request produces nothing new."""
        produced = request.num_output_tokens
        cached = self._optimistic.get(request)
        if cached is None or cached[0] != produced:
            cached = self._optimistic[request] = (produced, self.remaining_tokens(request, self.optimism))
        return cached[1]

    def is_late(self, request: Request, now: float) -> bool:
        """Whether even an optimistic forecast misses the request's SLO."""
        slo = request.slo
        if slo.e2e_s:
            finish = self.next_token_at(request, now) + (self.optimistic_tokens(request) - 1) * self.step_s
            return finish > request.slo_start + slo.e2e_s
        if request.first_token_time is None:
            return bool(slo.ttft_s) and self.next_token_at(request, now) > request.slo_start + slo.ttft_s
        if slo.tpot_s:      # streaming: can the mean gap still come in under the target by the end?
            rest = self.optimistic_tokens(request)
            allowed = request.first_token_time + (request.num_output_tokens + rest - 1) * slo.tpot_s
            return self.next_token_at(request, now) + (rest - 1) * self.step_s > allowed
        return False

    # ----- order -----------------------------------------------------------------------------------------
    def rank(self, request: Request, now: float) -> tuple:
        """Order among requests of the same triage group (static while a request waits): earliest due first."""
        return (self.due(request), request.arrival_time)

    def key(self, request: Request, now: float) -> tuple:
        return (1 if request in self.late else 0, *self.rank(request, now))

    def plan(self, now: float, running: Sequence[Request], waiting: list[Request]) -> None:
        self.estimate_step(running)
        if self.prefill_chunk > 0:
            self.max_batched_tokens = len(running) + self.prefill_chunk
        self._steps += 1
        if self.triage and self._steps % self.recheck_steps == 0:
            # running requests that fell behind, flagged every few steps (their forecast moves slowly)
            self.late.update([r for r in running if r not in self.late and self.is_late(r, now)])
        if self.triage:
            self.triage_waiting(now, waiting)
        if self.refuse_late and self._steps % self.recheck_steps == 0:
            # past the head's window too: a request its rank keeps at the back would otherwise wait, never
            # checked, until its client gives up
            late = self.late
            self._refused.extend([r for r in waiting[self.window:] if r not in late and not r.num_output_tokens
                                  and not r.num_preemptions and self.is_late(r, now)])

    def estimate_step(self, running: Sequence[Request]) -> None:
        """The decode step time at the current batch (one more than running), re-estimated when it moves."""
        batch = len(running) + 1
        context = (sum(r.num_tokens for r in running) // len(running)) if running else self.DEFAULT_CONTEXT
        shape = (batch, context // 64)
        if shape != self._shape:
            self._shape = shape
            self.step_s = self.latency.decode_time(batch, context)

    def triage_waiting(self, now: float, waiting: list[Request]) -> None:
        """Move the head's newly late requests behind the feasible ones, keeping ``waiting`` sorted by key."""
        moved: list[Request] = []
        i = checked = 0
        late = self.late
        while i < len(waiting) and checked < self.window:
            request = waiting[i]
            if request in late:
                break                                   # the late group starts here
            checked += 1
            if not self.is_late(request, now):
                i += 1
            elif (self.refuse_late or self.refuse_sheddable and request.slo.sheddable) \
                    and not request.num_output_tokens and not request.num_preemptions:
                self._refused.append(request)           # the scheduler ends it (RESOURCE_EXHAUSTED upstream)
                i += 1
            else:
                late.add(request)
                moved.append(waiting.pop(i))
        for request in moved:
            bisect.insort_right(waiting, request, key=lambda r: self.key(r, now))

    def take_refused(self) -> list[Request]:
        refused, self._refused = self._refused, []
        return refused

    # ----- preemption ------------------------------------------------------------------------------------
    def preemption_victim(self, candidates: Sequence[Request], now: float) -> Request:
        """Out of memory: a late request first, else the one that ranks last."""
        late = [r for r in candidates if r in self.late]
        return max(late or candidates, key=lambda r: self.key(r, now))

    def victim_for_waiting(self, head: Request, running: Sequence[Request], fits: Callable[[Request], bool],
                           now: float) -> Request | None:
        """A feasible head that does not fit may take the place of a late running request, one preemption per
        request at most (recompute is not free; bounded so nothing thrashes)."""
        if not self.triage or head in self.late or fits(head):
            return None
        late = self.late
        victims = [r for r in running if r in late and r.num_preemptions < self.max_preemptions]
        if not victims:
            return None
        return max(victims, key=lambda r: self.key(r, now))
