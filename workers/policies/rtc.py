"""Run to completion: static batches, the classic baseline (SLoB's). A batch forms while the engine is idle
(and grows only while its members are still in prefill); nothing joins it after its first token, so new
arrivals wait until every member has finished."""

from __future__ import annotations

from typing import Sequence

from workers.policies.base import EnginePolicy, register
from workers.request import Request


@register
class RunToCompletionPolicy(EnginePolicy):
    name = "rtc"

    def admission_open(self, now: float, running: Sequence[Request]) -> bool:
        return all(r.num_output_tokens == 0 for r in running)
