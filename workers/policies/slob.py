"""SLoB: a mixed-priority pipeline (prefill first, then aged remaining work) with least-padding batches.

From the paper (its abstract and secondary summaries only; the full text is not public): requests that have not
produced a first token go ahead of decoding ones, since TTFT is the tighter SLO; among the rest, order by aging
and by remaining work, and form batches of similar prompt length so that an executor that pads to the longest
wastes little.

Our reconstruction: the rank is (0 before the first token else 1, predicted remaining tokens at the median
+ ``aging_per_s`` * arrival time, arrival), i.e. remaining work minus tokens credited per second waited, written
so it is static while a request waits. With ``pad_aware`` a step admits only prefills whose length is within
``pad_ratio`` of the first one it admitted; the others wait for a later step (the first candidate is always
admitted). A request that can no longer meet its SLO goes behind (``SloAwarePolicy``).

Padding here is a counterfactual: ``padded_tokens`` counts, per step, what padding each admitted prefill to the
step's longest would add (``padding_waste`` = padded / (padded + useful)). Our executors do not pad prefills: the
torch executor runs prefills one by one and pads only decodes, to the longest context of each group of similar
lengths (workers/executors/torch_executor.py, ``_decode_groups``); the sim executor does not pad at all.
"""

from __future__ import annotations

from typing import Sequence

from workers.policies.base import register
from workers.policies.slo_aware import SloAwarePolicy
from workers.request import Request, RequestStatus
from workers.step_estimate import StepTimes

_NOT_ADMITTED = (RequestStatus.WAITING, RequestStatus.PREEMPTED)


@register
class SlobPolicy(SloAwarePolicy):
    name = "slob"

    def __init__(self, latency: StepTimes, aging_per_s: float = 50.0, pad_aware: bool = True,
                 pad_ratio: float = 2.0, **options: object) -> None:
        super().__init__(latency, **options)  # type: ignore[arg-type]
        if aging_per_s < 0 or pad_ratio < 1:
            raise ValueError("aging_per_s must be >= 0 and pad_ratio >= 1")
        self.aging_per_s = aging_per_s
        self.pad_aware = pad_aware
        self.pad_ratio = pad_ratio
        self.padded_tokens = 0
        self.useful_tokens = 0
        self._step: list[tuple[Request, int]] = []   # (prefill, its length) admitted this step, settled next plan

    @property
    def padding_waste(self) -> float:
        total = self.padded_tokens + self.useful_tokens
        return self.padded_tokens / total if total else 0.0

    def rank(self, request: Request, now: float) -> tuple:
        phase = 0 if request.first_token_time is None else 1
        work = self.remaining_tokens(request) + self.aging_per_s * request.arrival_time
        return (phase, work, request.arrival_time)

    def plan(self, now: float, running: Sequence[Request], waiting: list[Request]) -> None:
        super().plan(now, running, waiting)
        # the last step's admissions; one the scheduler then found no blocks for is still waiting
        lengths = [n for r, n in self._step if r.status not in _NOT_ADMITTED]
        if lengths:
            top = max(lengths)
            self.padded_tokens += sum(top - n for n in lengths)
            self.useful_tokens += sum(lengths)
        self._step = []

    def admit(self, request: Request, now: float, running: Sequence[Request]) -> bool:
        """Under ``pad_aware``, only a prefill within ``pad_ratio`` of the step's first admission joins."""
        if self.pad_aware and self._step:
            first, length = self._step[0][1], request.num_pending_tokens
            if max(first, length) > self.pad_ratio * min(first, length):
                return False
        if not super().admit(request, now, running):
            return False
        self._step.append((request, request.num_pending_tokens))
        return True
