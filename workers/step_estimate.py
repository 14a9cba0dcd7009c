"""Step-time estimates for the engine's SLO-aware policies: the worker's own latency model, or what it measured.

A sim worker (and the simulator) has the latency model its executor runs on. A real executor has none, so the
engine learns one from its own iterations: step time as a linear function of the prefill tokens and the number
of decodes in the batch, fitted by exponentially weighted least squares. Both answer the two questions the
policies ask (``prefill_time`` and ``decode_time``) in seconds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from workers.scheduler import SchedulerOutput


class StepTimes(Protocol):
    def prefill_time(self, prompt_tokens: int) -> float: ...

    def decode_time(self, batch: int, context: int) -> float: ...


class ObservedLatency:
    """Step time ~ a + b * prefill tokens + c * decodes, fitted online from the engine's own steps."""

    def __init__(self, default_step_s: float = 0.03, decay: float = 0.98, min_steps: int = 8) -> None:
        self.decay, self.min_steps = decay, min_steps
        self.coef = np.array([default_step_s, 0.0, 0.0])
        self._xtx = np.eye(3) * 1e-6
        self._xty = np.zeros(3)
        self.steps = 0

    def observe(self, out: "SchedulerOutput", step_s: float) -> None:
        x = np.array([1.0, out.num_prefill_tokens, out.num_decode_tokens])
        self._xtx = self.decay * self._xtx + np.outer(x, x)
        self._xty = self.decay * self._xty + x * step_s
        self.steps += 1
        if self.steps >= self.min_steps:
            try:
                coef = np.linalg.solve(self._xtx + np.eye(3) * 1e-9, self._xty)
            except np.linalg.LinAlgError:
                return
            self.coef = np.maximum(coef, [1e-4, 0.0, 0.0])

    def prefill_time(self, prompt_tokens: int) -> float:
        a, b, _ = self.coef
        return float(a + b * prompt_tokens)

    def decode_time(self, batch: int, context: int) -> float:
        a, _, c = self.coef
        return float(a + c * batch)
