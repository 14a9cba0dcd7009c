"""First come, first served: vLLM's default. Preempts the latest arrival when blocks run out."""

from __future__ import annotations

from workers.policies.base import EnginePolicy, register


@register
class FcfsPolicy(EnginePolicy):
    name = "fcfs"
