"""The routing policy interface and its name registry.

A policy sees the request and the routable workers (already filtered for liveness and exclusions) and picks
one. It is pure: no I/O, no clock reads, so the live balancer and the simulator run the same object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence, TypeVar

from balancer.registry import WorkerState


@dataclass(frozen=True)
class RouteContext:
    request_id: str = ""
    slo_class: str = ""
    prompt_chars: int = 0
    max_tokens: int = 0
    priority: int = 0
    tenant: str = ""


class RoutingPolicy:
    name: ClassVar[str] = ""

    def pick(self, request: RouteContext, candidates: Sequence[WorkerState]) -> WorkerState:
        raise NotImplementedError


P = TypeVar("P", bound=type[RoutingPolicy])
_REGISTRY: dict[str, type[RoutingPolicy]] = {}


def register(cls: P) -> P:
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"routing policy needs a unique name, got {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def make_policy(name: str, **options: object) -> RoutingPolicy:
    try:
        return _REGISTRY[name](**options)
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(policy_names())}") from None
