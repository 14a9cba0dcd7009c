"""Earliest deadline first with triage: the plain SLO-aware reference the seed policies are measured against.

Each request's next SLO milestone orders the queue (``SloAwarePolicy.due``); a request that can no longer meet
its SLO goes behind every request that can. Nothing else: no length ranking, no batch cap.
"""

from __future__ import annotations

from workers.policies.base import register
from workers.policies.slo_aware import SloAwarePolicy


@register
class EdfPolicy(SloAwarePolicy):
    name = "edf"
