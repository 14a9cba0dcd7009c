"""Strict priority with aging: higher ``priority`` runs first and preempts lower priority when it must wait.

Aging adds ``aging_per_s`` priority levels per second since arrival, so a low-priority request eventually
outranks a stream of newer high-priority ones and nothing starves. Running requests age too (arrival time
does not reset), which keeps a long job from being preempted again and again. Ties go first come, first served.

Linear aging keeps the order of any two requests fixed over time: priority + a * (now - arrival) sorts like
priority - a * arrival. So the key is static and the scheduler never re-sorts its queues.
"""

from __future__ import annotations

from typing import Callable, Sequence

from workers.policies.base import EnginePolicy, register
from workers.request import Request


@register
class PriorityPolicy(EnginePolicy):
    name = "priority"

    def __init__(self, aging_per_s: float = 0.1) -> None:
        if aging_per_s < 0:
            raise ValueError("aging_per_s must be >= 0")
        self.aging_per_s = aging_per_s

    def key(self, request: Request, now: float) -> tuple:
        return (self.aging_per_s * request.arrival_time - request.priority, request.arrival_time)

    def victim_for_waiting(self, head: Request, running: Sequence[Request], fits: Callable[[Request], bool],
                           now: float) -> Request | None:
        if not running or fits(head):
            return None
        victim = max(running, key=lambda r: self.key(r, now))
        return victim if self.key(head, now) < self.key(victim, now) else None
