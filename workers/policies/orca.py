"""Orca: iteration-level FCFS batching as engines did it before paged memory, reserving each request's
maximum length (prompt plus ``max_tokens``) when it is admitted. Reservation means it never preempts, and
that memory sits idle for answers that end early, which is what paged KV blocks later fixed."""

from __future__ import annotations

from workers.policies.base import EnginePolicy, register
from workers.request import Request


@register
class OrcaPolicy(EnginePolicy):
    name = "orca"

    def reserve_tokens(self, request: Request) -> int:
        return request.num_prompt_tokens + request.sampling.max_tokens
