"""Output-length prediction (SageSched's idea): a distribution, not a point, learned from finished requests.

Empirical quantiles over a hierarchy of keys: the SLO class, then the prompt-length bucket (powers of two),
then a coarse content feature of the prompt. Each level is shrunk toward its parent by its sample count
(weight n / (n + k)), and the root is the class prior, so a cold start or a rare key falls back smoothly.
Recent samples only (a window per key), so the predictor follows drift in the workload.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque

import numpy as np

from profiler import priors

QUANTILES = priors.QUANTILES
CODE_MARKERS = ("```", "def ", "function", "class ", "import ", "#include", "{", "};")
LONG_MARKERS = ("list", "steps", "explain", "describe", "write", "essay", "story", "detail", "compare")


def prompt_feature(prompt: str) -> str:
    """A coarse content class of a prompt, cheap enough for the gateway's request path."""
    if not prompt:
        return ""
    head = prompt[:2000].lower()
    if any(m in head for m in CODE_MARKERS):
        return "code"
    if any(m in head for m in LONG_MARKERS):
        return "long"
    if prompt.rstrip().endswith("?"):
        return "question"
    return "other"


def length_bucket(prompt_tokens: int) -> int:
    return int(math.log2(max(1, prompt_tokens)))


class LengthPredictor:
    def __init__(self, window: int = 1024, shrink: float = 30.0) -> None:
        self.window, self.shrink = window, shrink
        self._samples: dict[tuple, deque[int]] = defaultdict(lambda: deque(maxlen=self.window))
        self.observed = 0

    @staticmethod
    def _keys(slo_class: str, prompt_tokens: int, feature: str) -> list[tuple]:
        bucket = length_bucket(prompt_tokens)
        return [(slo_class,), (slo_class, bucket), (slo_class, bucket, feature)]

    def observe(self, slo_class: str, prompt_tokens: int, feature: str, output_tokens: int) -> None:
        for key in self._keys(slo_class, prompt_tokens, feature):
            self._samples[key].append(output_tokens)
        self.observed += 1

    def predict(self, slo_class: str, prompt_tokens: int, feature: str = "", max_tokens: int = 0
                ) -> tuple[tuple[float, ...], str]:
        """Lengths at QUANTILES and where they came from ("class_prior" or "learned")."""
        q = np.array(priors.prior(slo_class, 0), dtype=float)
        source = "class_prior"
        for key in self._keys(slo_class, prompt_tokens, feature):
            samples = self._samples.get(key)
            if not samples:
                break
            n = len(samples)
            w = n / (n + self.shrink)
            q = w * np.quantile(np.fromiter(samples, float), QUANTILES) + (1 - w) * q
            source = "learned"
        if max_tokens > 0:
            q = np.minimum(q, max_tokens)
        return tuple(float(v) for v in q), source


def pinball_loss(actual: float, predicted: tuple[float, ...]) -> float:
    """Mean quantile (pinball) loss over QUANTILES."""
    total = 0.0
    for q, p in zip(QUANTILES, predicted):
        diff = actual - p
        total += max(q * diff, (q - 1) * diff)
    return total / len(QUANTILES)
