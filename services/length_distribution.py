"""A predicted output-length distribution, as schedulers use it: quantiles, tails, expectations, conditioning.

The predictor sends lengths at a few quantiles (0.1, 0.5, 0.9). We read them as a piecewise-linear CDF through
(0, 0), each (length, quantile), and a tail that ends at ``min(cap, 2 * q90)`` with probability 1: answers longer
than twice the 90th percentile are rare in every trace we replay, and a tail to a 2,048-token cap would make
every request look long. Conditioning on tokens already produced is exact on that CDF; past its end the
remaining length is taken as uniform up to as many tokens as were produced (capped), our assumption.
Pure arithmetic, so the engine policies and the balancer price requests by the same numbers.
"""

from __future__ import annotations

from typing import Sequence

DEFAULT_QUANTILES = (0.1, 0.5, 0.9)


class LengthDistribution:
    __slots__ = ("xs", "ps")

    def __init__(self, xs: Sequence[float], ps: Sequence[float]) -> None:
        """Knots of the CDF: non-decreasing lengths ``xs`` and probabilities ``ps`` from 0 to 1."""
        self.xs, self.ps = tuple(xs), tuple(ps)

    @classmethod
    def from_quantiles(cls, lengths: Sequence[float], cap: float, quantiles: Sequence[float] = DEFAULT_QUANTILES,
                       floor: float = 1.0) -> "LengthDistribution":
        """The distribution that the predicted ``lengths`` at ``quantiles`` describe, never beyond ``cap``; with
        no prediction, uniform over [1, cap]."""
        cap = max(float(cap), floor)
        if not lengths:
            return cls((floor - 1, cap), (0.0, 1.0))
        xs, ps, last = [floor - 1], [0.0], floor - 1
        for q, length in zip(quantiles, lengths):
            x = min(max(float(length), last), cap)
            xs.append(x)
            ps.append(q)
            last = x
        end = min(cap, max(2.0 * last, last + 1.0))
        xs.append(end)
        ps.append(1.0)
        return cls(xs, ps)

    @classmethod
    def point(cls, length: float) -> "LengthDistribution":
        """A length known exactly (a clairvoyant reference's)."""
        return cls((max(0.0, length - 1), length), (0.0, 1.0))

    # ----- reading it ----------------------------------------------------------------------------------
    @property
    def upper(self) -> float:
        return self.xs[-1]

    def cdf(self, x: float) -> float:
        xs, ps = self.xs, self.ps
        if x < xs[0]:
            return 0.0
        for i in range(len(xs) - 1, -1, -1):          # the last knot at or below x (knots may repeat)
            if xs[i] <= x:
                if i == len(xs) - 1:
                    return 1.0
                return ps[i] + (ps[i + 1] - ps[i]) * (x - xs[i]) / (xs[i + 1] - xs[i])
        return 0.0

    def quantile(self, p: float) -> float:
        xs, ps = self.xs, self.ps
        for i in range(1, len(xs)):
            if p <= ps[i]:
                span = ps[i] - ps[i - 1]
                return xs[i] if span <= 0 else min(xs[i], xs[i - 1] + (xs[i] - xs[i - 1]) * (p - ps[i - 1]) / span)
        return xs[-1]

    def mean(self) -> float:
        return sum((self.xs[i] + self.xs[i - 1]) / 2 * (self.ps[i] - self.ps[i - 1]) for i in range(1, len(self.xs)))

    def remaining(self, produced: int) -> "LengthDistribution":
        """Tokens still to come, given ``produced`` tokens so far and no end yet."""
        if produced <= 0:
            return self
        xs, ps = self.xs, self.ps
        if produced >= xs[-1] - 1:
            return LengthDistribution((0.0, max(1.0, min(float(produced), 2048.0))), (0.0, 1.0))
        base = self.cdf(produced)
        alive = 1.0 - base
        new_xs, new_ps = [0.0], [0.0]
        for x, p in zip(xs, ps):
            if x > produced:
                new_xs.append(x - produced)
                new_ps.append((p - base) / alive)
        return LengthDistribution(new_xs, new_ps)

    def support(self, points: int = 12) -> list[tuple[float, float]]:
        """A discrete version: (length, probability) at the midpoints of ``points`` equal-probability slices."""
        step = 1.0 / points
        return [(max(1.0, self.quantile((k + 0.5) * step)), step) for k in range(points)]

    def __repr__(self) -> str:
        return "LengthDistribution(" + ", ".join(f"{x:.0f}@{p:.2f}" for x, p in zip(self.xs, self.ps)) + ")"
