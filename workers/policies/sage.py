"""SageSched: order by a Gittins index over the predicted output-length distribution, on a compute-and-memory
cost, with triage and bounded preemption.

From the paper (its abstract and secondary summaries; the full text is not public): rank requests by a Gittins
index of their uncertain cost, G(D) = inf over D' of E[min(X, D')] / P(X <= D'), where the cost of a request
with I prompt and O output tokens counts compute and memory, C = O^2/2 + I*O, and re-compute the index on the
remaining distribution (conditioned on the tokens already produced) at bucket boundaries. The paper reports
+28.7% efficiency over length-agnostic schedulers.

Our reconstruction: the distribution is the predictor's quantiles read as ``LengthDistribution``; the infimum
runs over a 12-point discretisation of it; bucket boundaries are powers of two of the tokens produced; a request
that can no longer meet its SLO goes behind (``SloAwarePolicy``); a waiting request may preempt a running one
whose index is ``preempt_ratio`` times worse, each request at most ``max_preemptions`` times.
"""

from __future__ import annotations

from typing import Callable, Sequence
from weakref import WeakKeyDictionary

from services.length_distribution import LengthDistribution
from workers.policies.base import register
from workers.policies.slo_aware import SloAwarePolicy
from workers.request import Request
from workers.step_estimate import StepTimes


def gittins_index(remaining: LengthDistribution, prompt_tokens: int, produced: int, points: int = 12) -> float:
    """The Gittins index of the remaining cost C(produced + X) - C(produced), C(o) = o^2/2 + I*o."""
    def cost(o: float) -> float:
        return o * o / 2 + prompt_tokens * o

    base = cost(produced)
    support = [(cost(produced + x) - base, p) for x, p in remaining.support(points)]
    best = float("inf")
    done_mass = done_cost = 0.0
    for k, (c, p) in enumerate(support):
        done_mass += p
        done_cost += p * c
        expected = done_cost + c * (1.0 - done_mass)       # E[min(C, c_k)]
        best = min(best, expected / done_mass)
    return best


@register
class SagePolicy(SloAwarePolicy):
    name = "sage"

    def __init__(self, latency: StepTimes, preempt_ratio: float = 8.0, **options: object) -> None:
        super().__init__(latency, **options)  # type: ignore[arg-type]
        self.preempt_ratio = preempt_ratio
        self._index: WeakKeyDictionary[Request, tuple[int, float]] = WeakKeyDictionary()

    def index(self, request: Request) -> float:
        return self.per_bucket(self._index, request, lambda r: gittins_index(
            self.distribution(r).remaining(r.num_output_tokens), r.num_prompt_tokens, r.num_output_tokens))

    def rank(self, request: Request, now: float) -> tuple:
        return (self.index(request), request.arrival_time)

    def victim_for_waiting(self, head: Request, running: Sequence[Request], fits: Callable[[Request], bool],
                           now: float) -> Request | None:
        victim = super().victim_for_waiting(head, running, fits, now)
        if victim is not None or head in self.late or self._steps % self.recheck_steps or fits(head):
            return victim                   # (the index comparison scans the batch: every few steps only)
        movable = [r for r in running if r.num_preemptions < self.max_preemptions]
        if not movable:
            return None
        worst = max(movable, key=self.index)
        return worst if self.index(worst) > self.preempt_ratio * self.index(head) else None
