"""What the balancer knows about a request when it routes it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RouteContext:
    request_id: str = ""
    slo_class: str = ""
    prompt_tokens: int = 0
    max_tokens: int = 0
    predicted_output: float = 0.0        # median of the predicted length distribution; 0 unknown
    priority: int = 0
    tenant: str = ""
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    e2e_ms: float = 0.0
    sheddable: bool = False
    prefix_hashes: tuple[int, ...] = ()
    predicted_lengths: tuple[float, ...] = ()   # the whole predicted distribution, at the predictor's quantiles
    gateway_id: str = ""                 # the gateway whose lease the binding lives under; "" none
