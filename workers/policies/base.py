"""The engine policy interface and its name registry.

A policy supplies the order in which requests get the batch, whether a waiting request may join, how many
tokens of KV to reserve when it does, and which running request loses its blocks when memory runs out or a
more important request waits. It never sleeps, reads wall time or does I/O: the scheduler passes ``now`` from
its injected clock. Adding a policy is one small file that subclasses ``EnginePolicy`` and is ``@register``ed.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Sequence, TypeVar

from services.policy_registry import PolicyRegistry
from workers.request import Request


class EnginePolicy:
    name: ClassVar[str] = ""
    #: True when ``key`` never changes while a request waits, so the scheduler can keep queues sorted by
    #: insertion instead of sorting every iteration.
    static_key: ClassVar[bool] = True
    #: What the host must hand the constructor, by name: "true_lengths" (the executor's benchmark-only
    #: ``TrueLengths``) for clairvoyant references. Options from a cluster file are keyword arguments too.
    needs: ClassVar[frozenset[str]] = frozenset()

    #: The most requests the batch may hold, below the scheduler's ``max_num_seqs``; None leaves that limit.
    max_running: int | None = None
    #: Tokens a step may run, below the scheduler's ``max_num_batched_tokens`` (a smaller prefill chunk keeps
    #: decode steps short); None leaves that limit.
    max_batched_tokens: int | None = None

    def plan(self, now: float, running: Sequence[Request], waiting: list[Request]) -> None:
        """Called once at the start of every step, before anything is scheduled. A policy whose order depends
        on time (triage) may re-position requests within ``waiting`` here, keeping it sorted by its own
        ``key``, and may set ``max_running``; cheap policies leave it empty."""

    def take_refused(self) -> list[Request]:
        """Waiting requests the policy refuses outright (triage of sheddable ones), taken once, after ``plan``."""
        return []

    def key(self, request: Request, now: float) -> tuple:
        """Sort key: smaller goes first, both for admission and for the running batch."""
        return (request.arrival_time,)

    def admission_open(self, now: float, running: Sequence[Request]) -> bool:
        """Whether anything may join the batch this step (checked once, before any request's ``admit``)."""
        return True

    def admit(self, request: Request, now: float, running: Sequence[Request]) -> bool:
        """Whether ``request`` may join the batch now (blocks permitting); ``running`` as the step began."""
        return True

    def reserve_tokens(self, request: Request) -> int:
        """Tokens of KV to allocate when admitted; 0 means only what each step needs (paged, vLLM-style)."""
        return 0

    def preemption_victim(self, candidates: Sequence[Request], now: float) -> Request:
        """The running request to evict when blocks run out: by default the one that sorts last."""
        return max(candidates, key=lambda r: self.key(r, now))

    def victim_for_waiting(self, head: Request, running: Sequence[Request], fits: Callable[[Request], bool],
                           now: float) -> Request | None:
        """A running request to preempt so that the waiting ``head`` can run; None leaves the batch alone."""
        return None


P = TypeVar("P", bound=type[EnginePolicy])
_POLICIES: PolicyRegistry[EnginePolicy] = PolicyRegistry("engine")


def register(cls: P) -> P:
    return _POLICIES.register(cls)  # type: ignore[return-value]


def policy_names() -> list[str]:
    return _POLICIES.names()


def make_policy(name: str, *, true_lengths: object = None, latency: object = None, kv_tokens: int | None = None,
                **options: object) -> EnginePolicy:
    """The policy called ``name`` with its options; true lengths go only to a policy that declares it needs them,
    ``latency`` (the worker's step-time model) to one that plans by it, and ``kv_tokens`` (the engine's KV
    capacity in tokens, num_blocks * block_size) to one that budgets memory."""
    if options.pop("clairvoyant", False):      # a policy's clairvoyant twin: the named path to true lengths
        if true_lengths is None:
            raise ValueError(f"engine policy {name!r}: clairvoyant needs replayed true lengths")
        options["true_lengths"] = true_lengths
    return _POLICIES.make(name, {"true_lengths": true_lengths, "latency": latency, "kv_tokens": kv_tokens},
                          {"true_lengths": "it is a clairvoyant reference and needs replayed true lengths",
                           "latency": "it plans by the worker's step times",
                           "kv_tokens": "it budgets KV memory and needs the engine's capacity in tokens"}, **options)
