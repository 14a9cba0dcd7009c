"""The routing policy interface and its name registry: filters, then the policy's scorer and picker.

A policy sees the request and the routable workers (already filtered for liveness and exclusions). Unless it
is a baseline, the SLO filter runs first, so a request is not sent where it is predicted to miss its target
while another worker would meet it. Policies are pure: no I/O, no clock reads, randomness from a seeded
generator, so the live balancer and the simulator run the same objects.
"""

from __future__ import annotations

from typing import ClassVar, Sequence, TypeVar

from balancer.registry import WorkerState
from balancer.route_context import RouteContext
from balancer.routing.filters import slo_feasible
from services.policy_registry import PolicyRegistry


class RoutingPolicy:
    name: ClassVar[str] = ""
    slo_aware: ClassVar[bool] = True          # baselines (round robin, random) route blind, as plain LBs do
    #: Bind a request only to a worker with room, waiting in the balancer's queue otherwise. Baselines route
    #: at once to any live worker and let requests queue there, as a plain load balancer in front of vLLM does.
    late_binding: ClassVar[bool] = True
    #: True when the cluster file set ``late_binding`` for this policy, so the balancer keeps it as given.
    binding_set: bool = False
    #: What the host must supply to the constructor, by name: "seed" (an int for a seeded generator). Options
    #: from a cluster file (``routing: {name: prefix_affinity, slack: 2}``) are passed as keyword arguments too.
    needs: ClassVar[frozenset[str]] = frozenset()
    #: How old the load reports this policy routes from may be, in seconds (llm-d scrapes every 50 ms); None
    #: takes the balancer's configured interval. The live balancer and the simulator both honour it.
    report_interval_s: ClassVar[float | None] = None

    def route(self, request: RouteContext, candidates: Sequence[WorkerState]) -> WorkerState:
        if not candidates:
            raise ValueError("no candidates")
        if self.slo_aware:
            candidates = slo_feasible(request, candidates)
        return self.pick(request, candidates)

    def pick(self, request: RouteContext, candidates: Sequence[WorkerState]) -> WorkerState:
        raise NotImplementedError


P = TypeVar("P", bound=type[RoutingPolicy])
_POLICIES: PolicyRegistry[RoutingPolicy] = PolicyRegistry("routing")


def register(cls: P) -> P:
    return _POLICIES.register(cls)  # type: ignore[return-value]


def policy_names() -> list[str]:
    return _POLICIES.names()


def make_policy(name: str, *, seed: int = 0, late_binding: bool | None = None, **options: object) -> RoutingPolicy:
    """The policy called ``name`` with its options; the seed goes only to policies that declare they need one.
    ``late_binding`` (any policy's option) overrides whether it holds requests in the balancer's queue or binds
    them at once and lets the engines order and triage them."""
    policy = _POLICIES.make(name, {"seed": seed}, **options)
    if late_binding is not None:
        policy.late_binding = bool(late_binding)  # type: ignore[misc]
        policy.binding_set = True
    return policy
