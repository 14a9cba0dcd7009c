"""Routing policies, found by name. Importing this package registers every built-in policy."""

from balancer.routing import (  # noqa: F401  (registers)
    adaptive, capacity, least_kv, least_outstanding, llmd, power_of_two, prefix_affinity, random_choice,
    round_robin, sglang_cache_aware, token_aware, cache_aware)
from balancer.routing.base import RoutingPolicy, make_policy, policy_names, register
from balancer.route_context import RouteContext

__all__ = ["RouteContext", "RoutingPolicy", "make_policy", "policy_names", "register"]
