"""Multi-SLO simulated annealing: search the waiting order and the batch cap for the most requests on time.

From the paper (abstract and secondary summaries only): on arrivals, or every K steps, a time-boxed simulated
annealing search over the order of waiting requests and the batch size maximises
G = (requests predicted to meet their own SLO) / (sum of predicted latencies), predicted with the worker's own
latency model and the predicted output lengths; moves swap two requests, move one, or change the batch cap by
one; the search starts from the previous solution. It reports up to 5x SLO attainment over vLLM.

Our reconstruction: the search covers the ``window`` most urgent feasible waiting requests (the rest keep
deadline order behind them) and the running batch's TPOT targets; a request's forecast is its start (a free slot
now, or when running requests are forecast to finish), the prefill of those ordered before it and its own, then
its median remaining length at the capped batch's decode step. The time box is a move budget (``moves``), so
the simulator stays deterministic; ``tandem bench schedule`` checks that a search stays under 1 ms. Where no
move improves on it, the starting point stands: deadline order (warm-started with the previous order).
Triage comes from ``SloAwarePolicy``: requests that cannot make it are outside the search, behind the rest.
"""

from __future__ import annotations

import math
import random
from typing import Sequence
from weakref import WeakKeyDictionary

from workers.policies.base import register
from workers.policies.slo_aware import SloAwarePolicy
from workers.request import Request
from workers.step_estimate import StepTimes


@register
class SaSloPolicy(SloAwarePolicy):
    name = "sa_slo"

    def __init__(self, latency: StepTimes, every_steps: int = 8, window: int = 10, moves: int = 16,
                 temperature: float = 0.05, seed: int = 0, **options: object) -> None:
        super().__init__(latency, **options)  # type: ignore[arg-type]
        self.every_steps, self.search_window, self.moves = every_steps, window, moves
        self.temperature = temperature
        self.rng = random.Random(seed)
        self._pos: WeakKeyDictionary[Request, int] = WeakKeyDictionary()   # annealed position, ahead of the rest
        self._waiting_seen = 0
        self.searches = 0

    def rank(self, request: Request, now: float) -> tuple:
        pos = None if request in self.late else self._pos.get(request)
        return (0, pos, 0.0) if pos is not None else (1, self.due(request), request.arrival_time)

    def plan(self, now: float, running: Sequence[Request], waiting: list[Request]) -> None:
        super().plan(now, running, waiting)           # counts the step in self._steps
        arrived = len(waiting) > self._waiting_seen
        self._waiting_seen = len(waiting)
        if waiting and (arrived or self._steps % self.every_steps == 0):
            self.search(now, running, waiting)

    # ----- the search --------------------------------------------------------------------------------
    def search(self, now: float, running: Sequence[Request], waiting: list[Request]) -> None:
        """Anneal the head of ``waiting`` and the batch cap; re-key the head in the order found."""
        self.searches += 1
        head: list[Request] = []
        for request in waiting[:self.search_window]:
            if request in self.late:
                break
            head.append(request)
        if not head:
            return
        start = sorted(head, key=lambda r: (self._pos.get(r, 1 << 30), self.due(r), r.arrival_time))
        # warm start from the previous cap, never below the batch already running (the cap limits growth)
        floor = max(1, len(running))
        cap = max(self.max_running or 0, len(running) + len(head))
        forecast = self._forecaster(now, running, head)
        order, best_cap = start, cap
        value = best = forecast(order, cap)
        current, current_cap = order, cap
        for k in range(self.moves):
            candidate, candidate_cap = list(current), current_cap
            move = self.rng.random()
            i, j = self.rng.randrange(len(candidate)), self.rng.randrange(len(candidate))
            if move < 0.4:
                candidate[i], candidate[j] = candidate[j], candidate[i]
            elif move < 0.8:
                candidate.insert(j, candidate.pop(i))
            else:
                candidate_cap = max(floor, current_cap + (1 if self.rng.random() < 0.5 else -1))
            v = forecast(candidate, candidate_cap)
            heat = self.temperature * (1 - k / self.moves) * max(value, 1e-9)
            if v >= value or (heat > 0 and self.rng.random() < math.exp((v - value) / heat)):
                current, current_cap, value = candidate, candidate_cap, v
                if v > best:
                    order, best_cap, best = candidate, candidate_cap, v
        self._pos = WeakKeyDictionary({r: i for i, r in enumerate(order)})
        # a cap the search did not lower leaves the batch free to grow past the window it looked at
        self.max_running = best_cap if best_cap < len(running) + len(head) else None
        waiting[:len(head)] = order

    def _forecaster(self, now: float, running: Sequence[Request], head: Sequence[Request]):
        """G(order, cap) for this step: the forecast's inputs computed once, each evaluation O(len(head))."""
        context = self._shape[1] * 64 or self.DEFAULT_CONTEXT
        steps: dict[int, float] = {}

        def step_at(batch: int) -> float:
            if batch not in steps:
                steps[batch] = self.latency.decode_time(max(1, batch), context)
            return steps[batch]

        tpots = sorted(r.slo.tpot_s for r in running if r.slo.tpot_s and r.first_token_time is not None)
        sample = running[:16]
        mean_left = (sum(self.remaining_tokens(r) for r in sample) / len(sample)) if sample else 1.0
        prefill = [self.latency.prefill_time(max(1, r.num_pending_tokens)) for r in head]
        left = [self.remaining_tokens(r) for r in head]
        due_first = [r.slo_start + r.slo.ttft_s if r.slo.ttft_s and not r.slo.e2e_s else math.inf for r in head]
        due_last = [r.slo_start + r.slo.e2e_s if r.slo.e2e_s else math.inf for r in head]
        index = {id(r): i for i, r in enumerate(head)}
        n_running = len(running)

        def forecast(order: Sequence[Request], cap: int) -> float:
            batch = min(cap, n_running + len(order))
            step = step_at(batch)
            free = max(0, cap - n_running)
            slot_gap = mean_left * step / max(1, n_running)      # a running request ends about this often
            met = sum(1 for t in tpots if t >= step)
            total, clock = 0.0, now
            for k, r in enumerate(order):
                i = index[id(r)]
                begin = clock if k < free else max(clock, now + (k - free + 1) * slot_gap)
                first = begin + prefill[i] + step
                clock = begin + prefill[i]
                finish = first + (left[i] - 1) * step
                tpot = r.slo.tpot_s
                if first <= due_first[i] and finish <= due_last[i] and (not tpot or step <= tpot):
                    met += 1
                total += finish - r.slo_start
            return met / max(total, 1e-9)

        return forecast
