"""First come, first served, as vLLM's default scheduler does it.

Requests run in the order they reached the engine. When blocks run out the latest arrival is preempted (by
recompute), nothing new is admitted in that step (the scheduler's rule for every policy), and a preempted
request goes back to the head of the waiting queue, ahead of requests that never ran, as vLLM's ``prepend``.
"""

from __future__ import annotations

from workers.policies.base import EnginePolicy, register
from workers.request import Request


@register
class FcfsPolicy(EnginePolicy):
    name = "fcfs"

    def key(self, request: Request, now: float) -> tuple:
        # static while a request sits in one queue: preemption moves it, and only then its key changes
        return (0 if request.num_preemptions else 1, request.arrival_time)
