"""Benchmark-only: the true answer lengths of replayed requests, and the stop rule that uses them.

A replayed trace knows how long each answer was; a real client does not, so no scheduling code may either. The
length reaches a worker in the request's ``replay_truth`` field and lands here, in the executor, with exactly two
readers:

- the executor's stop rule (``end_answers``): a request whose answer reaches its true length emits EOS, as the
  model would have, and the scheduler stops it the way it stops any EOS;
- clairvoyant reference policies, which declare ``needs = {"true_lengths"}`` and are handed this object by name
  (the ``oracle`` engine policy), to price what a perfect predictor would be worth.

No scheduler, routing policy, balancer, gateway or length predictor reads it: they see ``max_tokens`` (a cap).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, MutableMapping

if TYPE_CHECKING:        # the scheduler imports the policies, one of which (the oracle) imports this module
    from workers.scheduler import SchedulerOutput


class TrueLengths:
    def __init__(self) -> None:
        self._lengths: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._lengths)

    def set(self, request_id: str, output_tokens: int) -> None:
        if output_tokens > 0:
            self._lengths[request_id] = output_tokens

    def get(self, request_id: str) -> int | None:
        return self._lengths.get(request_id)

    def forget(self, request_id: str) -> None:
        self._lengths.pop(request_id, None)

    def end_answers(self, batch: SchedulerOutput, sampled: MutableMapping[str, int], eos_token_id: int | None) -> None:
        """The stop rule: the token that completes a replayed answer's true length becomes EOS."""
        if not self._lengths or eos_token_id is None:
            return
        lengths = self._lengths
        for item in batch.scheduled:
            if item.samples:
                request = item.request
                n = lengths.get(request.request_id)
                if n is not None and request.num_output_tokens + 1 >= n:
                    sampled[request.request_id] = eos_token_id
