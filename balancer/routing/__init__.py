"""Routing policies, found by name. Importing this package registers every built-in policy."""

from balancer.routing import least_outstanding, round_robin  # noqa: F401  (registers)
from balancer.routing.base import RouteContext, RoutingPolicy, make_policy, policy_names, register

__all__ = ["RouteContext", "RoutingPolicy", "make_policy", "policy_names", "register"]
