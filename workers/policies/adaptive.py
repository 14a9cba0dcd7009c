"""SLoB's multilevel adapter on the engine side: the ordering rule follows the engine's own load level.

From the paper (abstract and secondary summaries only): SLoB switches its scheduling behaviour with the load
level, with hysteresis, so a light load is served plainly and a heavy one with the machinery that saves the most
SLOs. The routing half is ``balancer/routing/adaptive.py``.

Our reconstruction: the level is the waiting queue's length against the batch (``waiting / max(1, running)``),
which rises as soon as the engine falls behind. Light: arrival order (nothing to triage, no one starves).
Medium: earliest deadline first. Heavy: the Gittins index of ``sage`` (cheapest expected cost first). Triage
(late requests last) holds at every level. A level changes only when the load crosses a threshold by a margin
(``up``/``down``); the waiting queue is re-sorted then, which is rare, so keys stay static in between.
"""

from __future__ import annotations

from typing import Sequence

from workers.policies.base import register
from workers.policies.sage import SagePolicy
from workers.request import Request
from workers.step_estimate import StepTimes

LEVELS = ("light", "medium", "heavy")


@register
class AdaptivePolicy(SagePolicy):
    name = "adaptive"

    def __init__(self, latency: StepTimes, up: tuple[float, float] = (0.5, 2.0),
                 down: tuple[float, float] = (0.25, 1.0), **options: object) -> None:
        super().__init__(latency, **options)  # type: ignore[arg-type]
        if not (down[0] < up[0] and down[1] < up[1] and up[0] < up[1]):
            raise ValueError("thresholds: down below up at each level, and up rising")
        self.up, self.down = tuple(up), tuple(down)
        self.level = 0
        self.switches = 0

    def update_level(self, load: float) -> bool:
        """Move between levels with hysteresis; True when the level changed."""
        level = self.level
        while self.level < 2 and load >= self.up[self.level]:
            self.level += 1
        while self.level > 0 and load < self.down[self.level - 1]:
            self.level -= 1
        return self.level != level

    def rank(self, request: Request, now: float) -> tuple:
        if self.level == 0:
            return (request.arrival_time, 0.0)
        if self.level == 1:
            return (self.due(request), request.arrival_time)
        return (self.index(request), request.arrival_time)

    def plan(self, now: float, running: Sequence[Request], waiting: list[Request]) -> None:
        if self.update_level(len(waiting) / max(1, len(running))):
            self.switches += 1
            waiting.sort(key=lambda r: self.key(r, now))
        super().plan(now, running, waiting)
