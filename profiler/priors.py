"""Cold-start output-length priors per SLO class, from the traces' published statistics.

Quantiles 0.1/0.5/0.9 read off the length distributions in ../shared/traces (README table): the Azure
conversation trace for ``interactive``, the Azure code trace for ``code``, ShareGPT for ``batch``. The
learned predictor of a later issue replaces these once history accumulates.
"""

from __future__ import annotations

QUANTILES = (0.1, 0.5, 0.9)

CLASS_PRIORS: dict[str, tuple[float, float, float]] = {
    "interactive": (20.0, 129.0, 450.0),
    "code": (3.0, 13.0, 80.0),
    "batch": (120.0, 415.0, 850.0),
}
FALLBACK = CLASS_PRIORS["interactive"]


def prior(slo_class: str, max_tokens: int) -> tuple[float, ...]:
    """The class prior's lengths at QUANTILES, never above ``max_tokens``."""
    lengths = CLASS_PRIORS.get(slo_class, FALLBACK)
    return tuple(min(v, float(max_tokens)) if max_tokens > 0 else v for v in lengths)
